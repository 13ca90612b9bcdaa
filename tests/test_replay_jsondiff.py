"""`replayer.jsondiff` and the envelope-level diff built on it: paths, ops, limits, previews."""

from __future__ import annotations

import json

from tracetape.instrumentation import contract
from tracetape.replayer import jsondiff
from tracetape.replayer.envelopes import envelope_diff, received_envelope
from tracetape.replayer.jsondiff import MISSING, Change


def test_identical_values_have_no_differences() -> None:
    doc = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1.0, "ok": True, "x": None}
    assert jsondiff.diff(doc, json.loads(json.dumps(doc))) == []
    assert jsondiff.diff(1, 1.0) == []  # JSON numbers


def test_changed_added_removed_by_json_path() -> None:
    a = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "t": 0.1}
    b = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "B"},
                      {"role": "user", "content": "c"}], "stream": True}
    assert jsondiff.diff(a, b) == [
        Change("messages[1].content", "changed", "b", "B"),
        Change("messages[2]", "added", MISSING, {"role": "user", "content": "c"}),
        Change("stream", "added", MISSING, True),
        Change("t", "removed", 0.1, MISSING),
    ]


def test_type_changes_stop_descent_and_bools_are_not_numbers() -> None:
    assert jsondiff.diff({"a": [1]}, {"a": {"0": 1}}) == [Change("a", "changed", [1], {"0": 1})]
    assert jsondiff.diff({"a": True}, {"a": 1}) == [Change("a", "changed", True, 1)]
    assert jsondiff.diff("x", "y") == [Change("$", "changed", "x", "y")]


def test_keys_that_are_not_identifiers_are_quoted() -> None:
    changes = jsondiff.diff({"x-api": {"a b": 1}}, {"x-api": {"a b": 2}})
    assert [c.path for c in changes] == ['["x-api"]["a b"]']
    assert jsondiff.format_path(["messages", 3, "content"]) == "messages[3].content"
    assert jsondiff.format_path(["a.b", 0]) == '["a.b"][0]'


def test_limit_and_preview() -> None:
    changes = jsondiff.diff(list(range(100)), list(range(1, 101)), limit=5)
    assert len(changes) == 5 and changes[0].path == "[0]"
    out = Change("p", "changed", "x" * 50, "y").to_json(max_chars=10)
    assert out == {"path": "p", "op": "changed", "expected": "x" * 10 + "…", "received": "y"}
    assert "received" not in Change("p", "removed", 1, MISSING).to_json()


def test_envelope_diff_names_request_line_parts_and_body_paths() -> None:
    body_a = json.dumps({"model": "m", "messages": [{"role": "user", "content": "one"}]}).encode()
    body_b = json.dumps({"model": "m", "messages": [{"role": "user", "content": "two"}]}).encode()
    a = contract.http_envelope("POST", "/v1/messages", "", [("anthropic-version", "2023-06-01")], body_a)
    b, _ = received_envelope("POST", "/v1/chat/completions", "beta=1",
                             [("Anthropic-Version", "2024-01-01"), ("Authorization", "Bearer sk-secret")], body_b)
    paths = [c.path for c in envelope_diff(a, b)]
    assert paths == ["$path", '$query.beta', '$headers["anthropic-version"]', "messages[0].content"]


def test_received_envelope_redacts_before_hashing() -> None:
    key = b"sk-live-ABCDEFGHIJKLMNOPQRSTUVWX"
    body = b'{"note":"' + key + b'"}'
    env, redacted = received_envelope("POST", "/v1/x", "", [], body)
    assert key not in redacted and len(redacted) == len(body)
    from tracetape.instrumentation import redaction
    assert contract.envelope_hash(env) == contract.envelope_hash(
        contract.http_envelope("POST", "/v1/x", "", [], redaction.redact_body(body)))
