"""Reads the GenAI facts (model, response id, finish reasons, token usage) out of a recorded response.

Done at ingest, not in the agent: the recording process keeps raw bytes only. Understands OpenAI chat
completions / responses and Anthropic messages, plain JSON and SSE streams, gzip/deflate encodings.
Anything it cannot read gives empty fields, never an error.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode
_MAX_INFLATE = 256 << 20


@dataclass
class ResponseInfo:
    model: str = ""
    response_id: str = ""
    finish_reasons: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None


def decode_content(body: bytes, content_encoding: str) -> bytes:
    """The body with its content-encoding removed (gzip/deflate); unchanged for identity or unknown."""
    enc = content_encoding.strip().lower()
    if enc in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(body, _MAX_INFLATE)
    if enc == "deflate":
        try:
            return zlib.decompressobj().decompress(body, _MAX_INFLATE)
        except zlib.error:
            return zlib.decompressobj(-zlib.MAX_WBITS).decompress(body, _MAX_INFLATE)
    return body


def sse_data(body: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, one per event, `[DONE]` excluded."""
    out: list[bytes] = []
    current: list[bytes] = []
    for line in body.splitlines():
        if not line:
            if current:
                out.append(b"\n".join(current))
                current = []
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            current.append(value[1:] if value.startswith(b" ") else value)
    if current:
        out.append(b"\n".join(current))
    return [d for d in out if d.strip() != b"[DONE]"]


def _usage(info: ResponseInfo, usage: Any) -> None:
    if not isinstance(usage, dict):
        return
    for key in ("input_tokens", "prompt_tokens"):
        if isinstance(usage.get(key), int):
            info.input_tokens = usage[key]
            break
    for key in ("output_tokens", "completion_tokens"):
        if isinstance(usage.get(key), int):
            info.output_tokens = usage[key]
            break


def _absorb(info: ResponseInfo, obj: Any) -> None:
    """Fold one JSON object (a whole response or one stream event) into `info`."""
    if not isinstance(obj, dict):
        return
    kind = obj.get("type")
    if kind == "message_start" and isinstance(obj.get("message"), dict):  # anthropic stream
        _absorb(info, obj["message"])
        return
    if kind == "message_delta":  # anthropic stream
        delta = obj.get("delta") or {}
        if isinstance(delta, dict) and delta.get("stop_reason"):
            info.finish_reasons = [str(delta["stop_reason"])]
        usage = obj.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("output_tokens"), int):
            info.output_tokens = usage["output_tokens"]
            if isinstance(usage.get("input_tokens"), int) and info.input_tokens is None:
                info.input_tokens = usage["input_tokens"]
        return
    if isinstance(obj.get("response"), dict) and str(kind).startswith("response."):  # openai responses stream
        _absorb(info, obj["response"])
        return
    if isinstance(obj.get("model"), str) and obj["model"]:
        info.model = obj["model"]
    if isinstance(obj.get("id"), str) and obj["id"] and not info.response_id:
        info.response_id = obj["id"]
    if obj.get("stop_reason"):  # anthropic message
        info.finish_reasons = [str(obj["stop_reason"])]
    choices = obj.get("choices")
    if isinstance(choices, list):  # openai chat completion (or chunk)
        reasons = [str(c["finish_reason"]) for c in choices if isinstance(c, dict) and c.get("finish_reason")]
        if reasons:
            info.finish_reasons = reasons
    if isinstance(obj.get("status"), str) and obj.get("object") == "response":  # openai responses
        info.finish_reasons = [obj["status"]]
    _usage(info, obj.get("usage"))


def read_response(body: bytes, content_encoding: str = "", streamed: bool = False) -> ResponseInfo:
    """GenAI facts of one recorded response body."""
    info = ResponseInfo()
    if not body:
        return info
    try:
        data = decode_content(body, content_encoding)
    except zlib.error:
        return info
    payloads = sse_data(data) if streamed or data.lstrip()[:6] in (b"event:", b"data: ", b"data:{") else [data]
    for payload in payloads:
        try:
            _absorb(info, _decode(payload))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
            continue  # not JSON we can read (or nested past the decoder's depth): no facts, never an error
    return info
