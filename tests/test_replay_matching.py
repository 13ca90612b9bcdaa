"""Matching (envelope hash + occurrence ordinal), sessions and miss diagnostics, on a store filled through the
collector's ingest path with spans made by the real OTel SDK."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.spans import Agent, chat_request
from tracetape.collector import ingest
from tracetape.collector.store import Store
from tracetape.instrumentation import contract as c
from tracetape.replayer.envelopes import received_envelope
from tracetape.replayer.errors import ApiError
from tracetape.replayer.matching import EXHAUSTED, HIT, MISS, MatchIndex
from tracetape.replayer.miss import miss_body
from tracetape.replayer.session import SessionOptions, open_session


def _response(i: int) -> bytes:
    return json.dumps({"id": f"r{i}", "choices": [{"message": {"content": f"answer {i}"}}]}).encode()


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db")
    yield s
    s.close()


def _fill(store: Store, bodies: list[bytes], run_id: str = "run-1", end: bool = True, exit_code: int = 0) -> None:
    agent = Agent(run_id=run_id)
    for i, body in enumerate(bodies):
        agent.model_step(i, body=body, response=_response(i))
    if end:
        agent.run_span(exit_code=exit_code, outcome=c.OUTCOME_COMPLETED if exit_code >= 0 else c.OUTCOME_FAILED)
    batch = ingest.prepare(agent.request(), store)
    assert batch.rejected == 0, batch.errors
    store.apply([batch])
    agent.shutdown()


def _hash(body: bytes) -> str:
    return c.envelope_hash(c.http_envelope("POST", "/v1/chat/completions", "", [], body))


def test_identical_requests_get_their_recorded_occurrences_in_order(store: Store) -> None:
    same = chat_request("same")
    _fill(store, [same, chat_request("other"), same, same])
    session = open_session(store, SessionOptions(run_id="run-1"))
    claims = [session.index.claim(_hash(same)) for _ in range(4)]
    assert [(cl.kind, cl.ordinal, cl.slot.step_index if cl.slot else None) for cl in claims] == [
        (HIT, 0, 0), (HIT, 1, 2), (HIT, 2, 3), (EXHAUSTED, 3, None)]
    assert session.index.claim(_hash(chat_request("never"))).kind == MISS
    assert session.index.claimed(_hash(chat_request("never"))) == 0  # a miss consumes no ordinal


def test_repeat_last_serves_the_last_occurrence_again(store: Store) -> None:
    same = chat_request("same")
    _fill(store, [same, same])
    index = MatchIndex(store.steps("acme", "prod", "run-1"), "repeat_last")
    got = [index.claim(_hash(same)) for _ in range(4)]
    assert [g.slot.step_index for g in got] == [0, 1, 1, 1] and [g.repeated for g in got] == [False, False, True, True]


def test_concurrent_claims_get_distinct_ordinals(store: Store) -> None:
    same = chat_request("same")
    _fill(store, [same] * 64)
    index = MatchIndex(store.steps("acme", "prod", "run-1"))
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait()
        for _ in range(8):
            claim = index.claim(_hash(same))
            with lock:
                results.append(claim.slot.step_index)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(64))
    assert index.claim(_hash(same)).kind == EXHAUSTED


def test_miss_names_expected_step_json_path_and_candidates(store: Store) -> None:
    bodies = [chat_request(f"question {i}") for i in range(4)]
    _fill(store, bodies)
    session = open_session(store, SessionOptions(run_id="run-1"))
    for i in range(2):
        claim = session.index.claim(_hash(bodies[i]))
        session.coverage.tape(claim.slot.step_index, claim.slot.attempt_pos)
    changed = chat_request("question 2, changed")
    env, _ = received_envelope("POST", "/v1/chat/completions", "", [("authorization", "Bearer sk-x")], changed)
    body = miss_body(session, env, c.envelope_hash(env), session.index.claim(c.envelope_hash(env)))
    assert body["error"] == "replay_miss" and body["run"] == "run-1"
    assert body["expected_step"]["index"] == 2 and body["expected_step"]["envelope_hash"] == _hash(bodies[2])
    assert body["diff"] == [{"path": "messages[0].content", "op": "changed", "expected": "question 2",
                             "received": "question 2, changed"}]
    assert body["candidates"][0]["index"] == 2 and body["candidates"][0]["differences"] == 1
    assert "--until-step 2" in body["hint"]
    assert "sk-x" not in json.dumps(body)


def test_recorded_envelopes_recompute_to_their_hashes(store: Store) -> None:
    from tracetape.replayer.envelopes import recorded_envelope

    _fill(store, [chat_request("a"), chat_request("b")])
    session = open_session(store, SessionOptions(run_id="run-1"))
    for step in session.steps:
        a = step.attempts[0]
        assert c.envelope_hash(recorded_envelope(a, session.blob(a.request_body))) == a.envelope_hash


@pytest.mark.parametrize(("end", "exit_code", "reason"), [
    (False, 0, "running"), (True, -9, "execution_incomplete")])
def test_unfinished_runs_are_refused_unless_forced(store: Store, end: bool, exit_code: int, reason: str) -> None:
    _fill(store, [chat_request("a")], end=end, exit_code=exit_code)
    with pytest.raises(ApiError) as err:
        open_session(store, SessionOptions(run_id="run-1"))
    assert err.value.status == 409 and err.value.body["error"] == "not_replayable"
    assert err.value.body["reason"] == reason
    forced = open_session(store, SessionOptions(run_id="run-1", force=True))
    assert forced.forced and forced.refusal == reason


def test_invalidated_and_missing_runs(store: Store) -> None:
    _fill(store, [chat_request("a")])
    store.invalidate("acme", "prod", "run-1", "bad")
    with pytest.raises(ApiError) as err:
        open_session(store, SessionOptions(run_id="run-1"))
    assert err.value.body["reason"] == "manually_invalidated"
    with pytest.raises(ApiError) as err:
        open_session(store, SessionOptions(run_id="nope"))
    assert err.value.status == 404


@pytest.mark.parametrize("bad", [
    [], {"run_id": 3}, {"run_id": "r", "mode": "fast"}, {"run_id": "r", "pace": -1}, {"run_id": "r", "pace": True},
    {"run_id": "r", "mode": "step"}, {"run_id": "r", "until_step": -2}, {"run_id": "r", "force": "yes"},
    {"run_id": "r", "tenant": "a b"}, {"run_id": "r", "typo": 1}, {"run_id": "bad\x00id"},
    {"run_id": "r", "on_exhausted": "loop"}, {"run_id": "r", "allow_mutations": [1]}])
def test_bad_session_options_are_400(bad: object) -> None:
    with pytest.raises(ApiError) as err:
        SessionOptions.from_json(bad)
    assert err.value.status == 400 and err.value.body["error"] == "bad_request"
