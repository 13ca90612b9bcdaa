"""`tracetape diff RUN_A RUN_B [--json]`: two runs compared step by step.

Steps are aligned by their route (kind + method and path, or tool name) with a longest-common-subsequence
match (`difflib`), so a changed prompt shows as one `changed` step, not a removal and an addition. Each aligned
pair is `same` (same envelope and same response bytes, or same tool result) or `changed` (request diff by JSON
path from the envelopes, response diff by JSON path from the decoded bodies); unmatched steps are `added` or
`removed`. Token and latency deltas per step and in total. Exit 0 identical, 1 divergent, 2 incomparable
(different canonicalisation profiles: their envelope hashes cannot be compared).
"""

from __future__ import annotations

import argparse
import difflib
import json
from typing import Any

from tracetape.collector.records import AttemptRecord, RunRecord, StepRecord
from tracetape.collector.store import Store
from tracetape.instrumentation import contract
from tracetape.replayer import jsondiff, responses
from tracetape.replayer.envelopes import envelope_diff, recorded_envelope, url_parts
from tracetape.replayer.runref import add_store_arguments, open_store, resolve_run

MAX_CHANGES = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", metavar="RUN_A")
    parser.add_argument("run_b", metavar="RUN_B")
    add_store_arguments(parser)
    parser.add_argument("--json", action="store_true")


def _route(step: StepRecord) -> str:
    if step.kind == contract.STEP_KIND_TOOL:
        return f"tool:{step.tool_name}"
    a = step.attempts[0] if step.attempts else None
    return f"{step.kind}:{a.method if a else ''}:{contract.normalize_path(url_parts(a.url)[0]) if a else ''}"


def _blob(store: Store, run: RunRecord, ref: Any) -> bytes:
    return (store.blob(run.tenant, run.scope, ref.digest) or b"") if ref is not None else b""


def _envelope(store: Store, run: RunRecord, step: StepRecord) -> dict[str, Any]:
    a = step.attempts[0]
    if step.kind == contract.STEP_KIND_TOOL:
        return contract.tool_envelope(step.tool_name, responses.body_value(_blob(store, run, a.tool_arguments)))
    return recorded_envelope(a, _blob(store, run, a.request_body))


def _response(store: Store, run: RunRecord, a: AttemptRecord, tool: bool) -> tuple[bytes, Any]:
    if tool:
        raw = _blob(store, run, a.tool_result)
        return raw + a.error_type.encode(), {"result": responses.body_value(raw), "error": a.error_type or None}
    raw = _blob(store, run, a.response_body)
    return raw, {"status": a.status, "body": responses.body_value(raw, a.content_encoding, a.streamed)}


def _tokens(a: AttemptRecord | None) -> int:
    return ((a.input_tokens or 0) + (a.output_tokens or 0)) if a is not None else 0


def compare(store: Store, run_a: RunRecord, run_b: RunRecord) -> dict[str, Any]:
    """The comparison as a JSON-able dict (see module doc); `result` is identical / divergent / incomparable."""
    out: dict[str, Any] = {"run_a": run_a.run_id, "run_b": run_b.run_id, "steps": [], "first_divergence": None}
    if (run_a.canon_profile or contract.CANON_PROFILE) != (run_b.canon_profile or contract.CANON_PROFILE):
        out.update(result="incomparable", reason=f"canonicalisation profiles differ: {run_a.canon_profile} vs "
                   f"{run_b.canon_profile}")
        return out
    sa = [s for s in store.steps(run_a.tenant, run_a.scope, run_a.run_id) if s.attempts]
    sb = [s for s in store.steps(run_b.tenant, run_b.scope, run_b.run_id) if s.attempts]
    matcher = difflib.SequenceMatcher(a=[_route(s) for s in sa], b=[_route(s) for s in sb], autojunk=False)
    rows: list[dict[str, Any]] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        pairs = list(zip(range(i1, i2), range(j1, j2))) if tag in ("equal", "replace") else []
        for i, j in pairs:
            rows.append(_pair(store, run_a, run_b, i, sa[i], j, sb[j]))
        if tag in ("delete", "replace"):
            rows += [_single("removed", i, sa[i], None) for i in range(i1 + len(pairs), i2)]
        if tag in ("insert", "replace"):
            rows += [_single("added", None, None, (j, sb[j])) for j in range(j1 + len(pairs), j2)]
    out["steps"] = rows
    first = next((r for r in rows if r["status"] != "same"), None)
    out["first_divergence"] = None if first is None else {k: first.get(k) for k in ("status", "a_index", "b_index", "name")}
    totals = {"tokens_a": sum(_tokens(s.last) for s in sa), "tokens_b": sum(_tokens(s.last) for s in sb),
              "latency_ms_a": round(sum(a.duration_ms for s in sa for a in s.attempts), 3),
              "latency_ms_b": round(sum(a.duration_ms for s in sb for a in s.attempts), 3)}
    totals["tokens_delta"] = totals["tokens_b"] - totals["tokens_a"]
    totals["latency_ms_delta"] = round(totals["latency_ms_b"] - totals["latency_ms_a"], 3)
    out["totals"] = totals
    out["result"] = "identical" if first is None else "divergent"
    return out


def _single(status: str, i: int | None, step_a: StepRecord | None, b: tuple[int, StepRecord] | None) -> dict[str, Any]:
    step = step_a if step_a is not None else b[1]  # type: ignore[index]
    return {"status": status, "a_index": i, "b_index": b[0] if b else None, "name": step.name}


def _pair(store: Store, run_a: RunRecord, run_b: RunRecord, i: int, a: StepRecord, j: int, b: StepRecord) -> dict[str, Any]:
    tool = a.kind == contract.STEP_KIND_TOOL
    raw_a, val_a = _response(store, run_a, a.attempts[-1], tool)
    raw_b, val_b = _response(store, run_b, b.attempts[-1], tool)
    same_request = a.envelope_hash == b.envelope_hash
    same = same_request and raw_a == raw_b and len(a.attempts) == len(b.attempts)
    row: dict[str, Any] = {"status": "same" if same else "changed", "a_index": i, "b_index": j, "name": a.name,
                           "tokens_delta": _tokens(b.last) - _tokens(a.last),
                           "latency_ms_delta": round(sum(x.duration_ms for x in b.attempts)
                                                     - sum(x.duration_ms for x in a.attempts), 3)}
    if not same:
        if not same_request:
            row["request_diff"] = [c.to_json(200) for c in envelope_diff(
                _envelope(store, run_a, a), _envelope(store, run_b, b), limit=MAX_CHANGES)]
        if raw_a != raw_b:
            row["response_diff"] = [c.to_json(200) for c in jsondiff.diff(val_a, val_b, limit=MAX_CHANGES)]
        if len(a.attempts) != len(b.attempts):
            row["attempts"] = [len(a.attempts), len(b.attempts)]
    return row


def _text(result: dict[str, Any]) -> str:
    if result["result"] == "incomparable":
        return f"incomparable: {result['reason']}"
    lines = [f"{result['run_a']} -> {result['run_b']}: {result['result']}"]
    fd = result["first_divergence"]
    if fd:
        lines.append(f"first divergence: {fd['status']} step a#{fd['a_index']} / b#{fd['b_index']} ({fd['name']})")
    for row in result["steps"]:
        lines.append(f"  {row['status']:<8} a#{row['a_index']!s:<4} b#{row['b_index']!s:<4} {row['name']}"
                     + (f"  tokens {row['tokens_delta']:+d}, latency {row['latency_ms_delta']:+.1f} ms"
                        if "tokens_delta" in row else ""))
        for key in ("request_diff", "response_diff"):
            for d in row.get(key, [])[:10]:
                lines.append(f"      {key.split('_')[0]} {d['path']}: {json.dumps(d.get('expected'))[:80]} -> "
                             f"{json.dumps(d.get('received'))[:80]}")
    t = result["totals"]
    lines.append(f"tokens {t['tokens_a']} -> {t['tokens_b']} ({t['tokens_delta']:+d}); latency "
                 f"{t['latency_ms_a']:.1f} -> {t['latency_ms_b']:.1f} ms ({t['latency_ms_delta']:+.1f})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    store = open_store(args.data)
    try:
        a = resolve_run(store, args.run_a, args.tenant, args.scope)
        b = resolve_run(store, args.run_b, args.tenant, args.scope)
        result = compare(store, a, b)
    finally:
        store.close()
    print(json.dumps(result) if args.json else _text(result))
    return {"identical": 0, "divergent": 1}.get(result["result"], 2)
