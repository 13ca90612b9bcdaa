"""The exact-bytes fast path of matching (`replayer/exact.py`): whatever it answers is what the full path
(redact, canonicalise, hash: `envelopes.received_envelope` + `contract.envelope_hash`) answers, on runs recorded
through the real SDKs and the real instrumentation, and replayed through the proxy over real sockets."""

from __future__ import annotations

import json
import re
import urllib.request

import anthropic
import openai
from multidict import CIMultiDict

from tests.replay_support import API_KEY, open_session as open_http_session, recording, start_replayer
from tests.replay_support import standin, store  # noqa: F401 - fixtures
from tests.support.standin import Exchange, Standin
from tracetape.collector.records import AttemptRecord, RunRecord, StepRecord
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c
from tracetape.instrumentation import redaction
from tracetape.replayer.envelopes import received_envelope
from tracetape.replayer.exact import EMPTY_DIGEST, ExactIndex, attempt_key, redaction_is_default, request_key
from tracetape.replayer.matching import HIT, MISS
from tracetape.replayer.session import SessionOptions, open_session

SECRET = "sk-proj-" + "Q" * 40


def _agent(store: Store, standin: Standin, run_id: str, prompts: list[str]) -> list[Exchange]:
    """Record, through the SDKs: openai calls (one per prompt), a streamed one, an anthropic call with semantic
    headers, and a GET with a query string and no body. Returns the exchanges as the stand-in received them."""
    first = len(standin.exchanges)
    with recording(store, run_id):
        oc = openai.OpenAI(base_url=standin.openai_base_url, api_key=API_KEY, max_retries=0)
        for prompt in prompts:
            oc.chat.completions.create(model="gpt-x", messages=[{"role": "user", "content": prompt}])
        for _ in oc.chat.completions.create(model="gpt-x", stream=True, messages=[{"role": "user", "content": "s"}]):
            pass
        ac = anthropic.Anthropic(base_url=standin.anthropic_base_url, api_key=API_KEY, max_retries=0)
        ac.messages.create(model="claude-x", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
                           extra_headers={"anthropic-beta": "tools-2024-04-04"})
        oc.get("/models", cast_to=object, options={"params": {"limit": 2, "order": "desc"}})
    return standin.wait(first + len(prompts) + 3)[first:]


def _full_path(ex: Exchange, body: bytes | None = None) -> str:
    envelope, _ = received_envelope(ex.method, c.normalize_path(ex.path), ex.query, ex.headers,
                                    ex.body if body is None else body)
    return c.envelope_hash(envelope)


def _key(ex: Exchange, body: bytes | None = None) -> tuple[bytes, str, str, str, tuple[tuple[str, str], ...]]:
    return request_key(ex.method, c.normalize_path(ex.path), ex.query, CIMultiDict(ex.headers),
                       ex.body if body is None else body)


def test_recorded_bytes_get_the_hash_the_full_path_computes(store: Store, standin: Standin) -> None:
    exchanges = _agent(store, standin, "run-x", ["plain question", f"my key is {SECRET}, keep it"])
    session = open_session(store, SessionOptions(run_id="run-x"))
    assert session.exact is not None and session.exact.trusted and redaction_is_default()
    recorded = {a.envelope_hash for s in session.steps for a in s.attempts}
    answered = 0
    for ex in exchanges:
        full = _full_path(ex)
        assert full in recorded  # the full path matches every request the agent sent
        fast = session.exact.lookup(_key(ex))
        if SECRET.encode() in ex.body:
            assert fast is None  # stored masked: these bytes are no recording's, the full path answers
        else:
            assert fast == full
            answered += 1
    assert answered == len(exchanges) - 1
    assert any(ex.method == "GET" and ex.query and not ex.body for ex in exchanges)
    assert any(ex.header("anthropic-beta") for ex in exchanges)


def test_the_same_json_serialised_otherwise_takes_the_full_path_to_the_same_answer(store: Store,
                                                                                    standin: Standin) -> None:
    exchanges = _agent(store, standin, "run-y", ["question one"])
    session = open_session(store, SessionOptions(run_id="run-y"))
    assert session.exact is not None
    ex = exchanges[0]
    reserialised = json.dumps(json.loads(ex.body), indent=1, sort_keys=True).encode()
    assert reserialised != ex.body
    assert session.exact.lookup(_key(ex, reserialised)) is None
    assert _full_path(ex, reserialised) == _full_path(ex) == session.exact.lookup(_key(ex))
    other_header = CIMultiDict(ex.headers)
    other_header["openai-beta"] = "assistants=v2"  # a semantic header the recording did not send
    assert session.exact.lookup(request_key(ex.method, ex.path, ex.query, other_header, ex.body)) is None


def test_the_proxy_answers_byte_identical_reserialised_and_secret_requests_alike(store: Store,
                                                                                 standin: Standin) -> None:
    exchanges = _agent(store, standin, "run-z", ["first", f"second {SECRET}", "third"])
    replayer = start_replayer(store, standin)
    try:
        session = open_http_session(replayer, "run-z", on_exhausted="repeat_last", record=False)
        base = f"{replayer.url}/s/{session['session_id']}"
        upstream_before = len(standin.exchanges)
        for ex in exchanges:
            profile = "anthropic" if ex.path.endswith("/messages") else "openai"
            tail = ex.path[len("/v1/"):] if profile == "openai" else ex.path.lstrip("/")
            semantic = {k: v for k, v in ex.headers if k.lower() in c.SEMANTIC_HEADERS or k.lower() == "content-type"}
            bodies = [ex.body] + ([json.dumps(json.loads(ex.body), indent=2).encode()] if ex.body else [])
            for body in bodies:
                url = f"{base}/{profile}/{tail}" + (f"?{ex.query}" if ex.query else "")
                req = urllib.request.Request(url, data=body or None, method=ex.method, headers=semantic)
                with urllib.request.urlopen(req, timeout=30) as resp:
                    assert resp.status == ex.status
                    assert resp.read() == ex.response_body  # the recorded bytes, whichever path matched
        assert len(standin.exchanges) == upstream_before  # nothing reached an upstream
    finally:
        replayer.stop()


def test_with_other_redaction_rules_the_index_only_repeats_the_full_path(store: Store, standin: Standin) -> None:
    """A replayer masking more than the recorder did (here `question-NN`) must not call the recording's bytes a
    match: the full path masks them and misses. Such an index is not trusted; it learns each key's answer from
    the full path."""
    exchanges = _agent(store, standin, "run-r", ["question-42 please"])
    saved = redaction._RULES  # noqa: SLF001 - restored below, as tests/test_redaction_equivalence.py does
    redaction.configure(redaction.DEFAULT_RULES + (redaction.Rule(r"question-[0-9]+"),))
    try:
        assert not redaction_is_default()
        session = open_session(store, SessionOptions(run_id="run-r"))
        exact = session.exact
        assert exact is not None and not exact.trusted
        ex = exchanges[0]
        key = _key(ex)
        assert exact.lookup(key) is None and exact.needs_confirmation(key)
        full = _full_path(ex)
        assert session.index.claim(full).kind == MISS  # masked differently from the recording
        exact.confirm(key, full)
        assert exact.lookup(key) == full and not exact.needs_confirmation(key)
    finally:
        redaction._RULES = saved  # noqa: SLF001


def _attempt(body_digest: bytes | None, envelope_hash: str, url: str = "https://x/v1/chat/completions",
             headers: list[tuple[str, str]] | None = None) -> AttemptRecord:
    from tracetape.collector.records import PayloadRef

    return AttemptRecord(attempt=0, trace_id=b"\x01" * 16, span_id=b"\x02" * 8, started_ns=1, ended_ns=2,
                         envelope_hash=envelope_hash, method="post", url=url, request_headers=headers or [],
                         request_body=None if body_digest is None else PayloadRef(body_digest, 10), status=200)


def _step(*attempts: AttemptRecord, kind: str = c.STEP_KIND_MODEL) -> StepRecord:
    return StepRecord(step_id="00000000000000a1", started_ns=1, kind=kind, name="chat", envelope_hash="e" * 64,
                      attempts=list(attempts))


def test_the_index_trusts_only_runs_it_can_vouch_for() -> None:
    steps = [_step(_attempt(b"\x03" * 32, "a" * 64))]
    assert ExactIndex(steps, RunRecord(run_id="r", tenant="t", scope="s")).trusted
    assert not ExactIndex(steps, RunRecord(run_id="r", tenant="t", scope="s", canon_profile="tracetape.envelope/1")).trusted
    assert not ExactIndex(steps, RunRecord(run_id="r", tenant="t", scope="s", replay_of="orig")).trusted
    untrusted = ExactIndex(steps, RunRecord(run_id="r", tenant="t", scope="s", replay_of="orig"))
    key = attempt_key(steps[0].attempts[0])
    assert untrusted.lookup(key) is None and untrusted.needs_confirmation(key)


def test_keys_of_records_mirror_keys_of_requests_and_disagreeing_records_are_verified() -> None:
    body = b'{"a": 1}'
    digest = __import__("hashlib").sha256(body).digest()
    a = _attempt(digest, "a" * 64, url="https://x/v1//chat/completions/?b=2&a=1",
                 headers=[("Anthropic-Version", "2023-06-01"), ("content-type", "application/json")])
    assert attempt_key(a) == request_key("POST", "/v1/chat/completions", "b=2&a=1",
                                         CIMultiDict([("anthropic-version", "2023-06-01"), ("x", "y")]), body)
    assert attempt_key(_attempt(None, "b" * 64))[0] == EMPTY_DIGEST
    clash = ExactIndex([_step(a), _step(_attempt(digest, "c" * 64, url=a.url, headers=a.request_headers))],
                       RunRecord(run_id="r", tenant="t", scope="s"))
    assert clash.trusted and clash.lookup(attempt_key(a)) is None and clash.needs_confirmation(attempt_key(a))
    tools = ExactIndex([_step(_attempt(digest, "d" * 64), kind=c.STEP_KIND_TOOL)], RunRecord(run_id="r", tenant="t", scope="s"))
    assert len(tools) == 0


def test_a_hit_found_by_bytes_is_claimed_like_any_other(store: Store, standin: Standin) -> None:
    exchanges = _agent(store, standin, "run-c", ["again", "again"])
    session = open_session(store, SessionOptions(run_id="run-c"))
    assert session.exact is not None
    hashes = [session.exact.lookup(_key(ex)) for ex in exchanges[:2]]
    assert hashes[0] is not None and hashes[0] == hashes[1]
    first, second = session.index.claim(hashes[0]), session.index.claim(hashes[1])
    assert (first.kind, second.kind) == (HIT, HIT) and first.slot != second.slot  # two recorded occurrences
    assert re.fullmatch(r"[0-9a-f]{64}", hashes[0])


def test_a_step_whose_recording_failed_is_stored_and_makes_the_run_not_replayable(
        store: Store, standin: Standin) -> None:
    """The recorder failing on a request (here a bytes header value, which `requests` accepts) leaves a step
    span without an envelope hash: the collector keeps it, counts the recording error, and the run is not
    replayable (`recording_failure`). Forced anyway, nothing can match that step, by hash or exact bytes."""
    from tracetape.instrumentation import steps

    with recording(store, "run-broken"):
        openai.OpenAI(base_url=standin.openai_base_url, api_key=API_KEY).chat.completions.create(
            model="gpt-x", messages=[{"role": "user", "content": "hi"}])
        attempt = steps.start_http_attempt(method="GET", url="http://127.0.0.1:9/", headers=[("X-Trace", b"abc")],
                                           body=b"")
        assert attempt is not None
        attempt.finish(c.END_EXHAUSTED)
    run = store.run("default", "default", "run-broken")
    assert run is not None and (run.step_count, run.recording_errors) == (2, 1)
    assert (run.replayable, run.reason) == (False, "recording_failure")
    broken = store.steps("default", "default", "run-broken")[1]
    assert broken.attempts[0].recording_error and not broken.attempts[0].envelope_hash
    session = open_session(store, SessionOptions(run_id="run-broken", force=True))
    assert "" not in session.index and len(session.exact) == 1
