"""Reading recorded responses for humans and diffs: the JSON value of a body (SSE as its list of events), and
the final assistant text of a run."""

from __future__ import annotations

import json
from typing import Any

from tracetape.collector import genai
from tracetape.collector.records import AttemptRecord, StepRecord
from tracetape.instrumentation import contract


def body_value(body: bytes, content_encoding: str = "", streamed: bool = False) -> Any:
    """The JSON value of a response body: parsed JSON, an SSE stream as the list of its parsed events,
    else the text (or `{"$bytes": len}` when not UTF-8). JSON nested too deep to parse counts as text. Never
    raises."""
    try:
        data = genai.decode_content(body, content_encoding)
    except Exception:
        data = body
    if streamed or data.lstrip()[:6] in (b"event:", b"data: ", b"data:{"):
        out: list[Any] = []
        for payload in genai.sse_data(data):
            try:
                out.append(json.loads(payload))
            except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
                out.append(payload.decode("utf-8", "replace"))
        return out
    try:
        return json.loads(data) if data else None
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes: the text
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return {"$bytes": len(data)}


def assistant_text(value: Any) -> str:
    """The assistant's text in an OpenAI/Anthropic response value (or stream event list); "" if none."""
    parts: list[str] = []
    items = value if isinstance(value, list) else [value]
    for obj in items:
        if not isinstance(obj, dict):
            continue
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict):
                msg = choice.get("message") or choice.get("delta") or {}
                if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                    parts.append(msg["content"])
        if obj.get("type") == "message" or "content" in obj and isinstance(obj.get("content"), list):
            for block in obj.get("content") or []:
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    parts.append(block["text"])
        if obj.get("type") == "content_block_delta" and isinstance(obj.get("delta"), dict):
            text = obj["delta"].get("text")
            if isinstance(text, str):
                parts.append(text)
        if isinstance(obj.get("output_text"), str):
            parts.append(obj["output_text"])
    return "".join(parts)


def final_step(steps: list[StepRecord]) -> tuple[int, StepRecord, AttemptRecord] | None:
    """The last model step with a successful response, its index and last attempt."""
    for i in range(len(steps) - 1, -1, -1):
        step = steps[i]
        last = step.last
        if step.kind == contract.STEP_KIND_MODEL and last is not None and last.status is not None and last.status < 400:
            return i, step, last
    return None
