"""The stand-in provider: a real HTTP server on 127.0.0.1 speaking the OpenAI and Anthropic wire formats.

Endpoints (all deterministic, derived from the request):
- `POST /v1/chat/completions` (OpenAI): `chat.completion`, or with `"stream": true` SSE `data: {chunk}\\n\\n`
  lines of `chat.completion.chunk` objects ending with `data: [DONE]`, plus a usage chunk (empty `choices`)
  when `stream_options.include_usage` is set.
- `POST /v1/responses` (OpenAI Responses): a `response` object, or with `"stream": true` the
  `response.created` ... `response.completed` event sequence (`event: X\\ndata: {...}\\n\\n`).
- `POST /v1/messages` (Anthropic): a `message`, or with `"stream": true` the real event sequence
  `message_start`, `content_block_start`, `ping`, `content_block_delta` x N, `content_block_stop`,
  `message_delta`, `message_stop` (`event: X\\ndata: {...}\\n\\n`), one write per event.
- `GET|POST /echo` and anything else under `/raw/...`: plain JSON echo of the request (for requests/aiohttp).

The answer text is N pieces derived from sha256 of the last message's text, N = `x-standin-chunks`
(default 4). A streamed answer sends one chunk per piece. Controls, as request headers or as `[[name=value]]`
directives inside the last message's text (headers win):
- `x-standin-chunks: N`, `x-standin-delay-ms: N` (sleep before each chunk), `x-standin-gzip: 1`
  (gzip the body, `content-encoding: gzip`; streamed gzip is sync-flushed per chunk);
- `x-standin-fault`: `429-once` / `500-once` (that status, with `retry-after-ms: 1`, the first time this exact
  body is seen, then success), `429` / `500` / any 4xx-5xx (always), `break-after:N` (send N body chunks,
  then drop the connection);
- `[[tool=NAME]]` with optional `[[args={...}]]`: answer with a call of tool NAME (when the request offers it).

Every exchange is recorded (`Standin.exchanges`): method, path, query, headers, the exact body bytes received,
status, response headers and the exact body bytes written (compressed when gzip), chunk by chunk.

Use it threaded (`with Standin() as s:` / `s.start()`), inside a running loop (`await s.astart()`), or as a
process: `python -m tests.support.standin --port 0 [--record FILE.jsonl]` prints the port on its first line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import json
import logging
import re
import signal
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CREATED = 1_700_000_000
"""The fixed `created` timestamp of every answer (answers are deterministic)."""

_DIRECTIVE = re.compile(r"\[\[([a-z\-]+)=(.*?)\]\]")


@dataclass
class Exchange:
    """One request the stand-in received and what it answered, byte for byte."""

    index: int
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    status: int = 0
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_chunks: list[bytes] = field(default_factory=list)
    completed: bool = False
    """The whole response was written (False after `break-after` or a client disconnect)."""
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def response_body(self) -> bytes:
        return b"".join(self.response_chunks)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def to_record(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body_b64": base64.b64encode(self.body).decode(),
            "status": self.status,
            "response_headers": self.response_headers,
            "response_b64": base64.b64encode(self.response_body).decode(),
            "chunks": len(self.response_chunks),
            "completed": self.completed,
        }


@dataclass
class _Controls:
    chunks: int = 4
    delay_ms: int = 0
    gzip: bool = False
    fault: str = ""
    tool: str = ""
    args: str = "{}"


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text/tool-result parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    out.append(part["text"])
                elif "content" in part:
                    out.append(_text_of(part["content"]))
                elif isinstance(part.get("output"), str):
                    out.append(part["output"])
        return "\n".join(out)
    return "" if content is None else json.dumps(content, sort_keys=True)


def _last_message(payload: dict[str, Any], path: str) -> tuple[str, str]:
    """(role, text) of the last message of a chat/messages/responses request."""
    if path.endswith("/responses"):
        items = payload.get("input")
        if isinstance(items, str):
            return "user", items
        if isinstance(items, list) and items:
            last = items[-1]
            if isinstance(last, dict):
                role = str(last.get("role") or last.get("type") or "user")
                return role, _text_of(last.get("content", last.get("output")))
        return "user", ""
    messages = payload.get("messages") or []
    if not messages:
        return "user", ""
    last = messages[-1]
    role = str(last.get("role", "user"))
    content = last.get("content")
    if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") == "tool_result" for p in content):
        role = "tool"
    return role, _text_of(content)


def _controls(request: web.Request, text: str) -> _Controls:
    c = _Controls()
    directives = dict(_DIRECTIVE.findall(text))
    merged = {**directives}
    for name in ("chunks", "delay-ms", "gzip", "fault"):
        value = request.headers.get(f"x-standin-{name}")
        if value is not None:
            merged[name] = value
    c.chunks = max(int(merged.get("chunks", 4)), 1)
    c.delay_ms = max(int(merged.get("delay-ms", 0)), 0)
    c.gzip = str(merged.get("gzip", "")).lower() in ("1", "true", "yes")
    c.fault = str(merged.get("fault", ""))
    c.tool = str(merged.get("tool", ""))
    c.args = str(merged.get("args", "{}"))
    return c


def answer_pieces(text: str, n: int) -> list[str]:
    """The N deterministic pieces of the answer to a last message `text`."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    return [f"w{i}:{digest[i % 56 : i % 56 + 8]} " for i in range(n)]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _tool_names(payload: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for tool in payload.get("tools") or []:
        if not isinstance(tool, dict):
            continue
        if isinstance(tool.get("name"), str):
            names.add(tool["name"])
        fn = tool.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


class Standin:
    """The stand-in server: start it, point SDKs at `openai_base_url` / `anthropic_base_url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record_path: str | None = None) -> None:
        self.host = host
        self.port = port
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._seen_faults: set[str] = set()
        self._record_path = record_path
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._startup_error: BaseException | None = None

    # --- addresses ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return self.url

    # --- records ----------------------------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """How many requests arrived so far."""
        return len(self.exchanges)

    def reset(self) -> None:
        with self._lock:
            self.exchanges.clear()
            self._seen_faults.clear()

    def wait(self, n: int | None = None, timeout: float = 10.0) -> list[Exchange]:
        """The exchanges, once at least `n` (default: all so far) have arrived and finished answering."""
        deadline = time.monotonic() + timeout
        while n is not None and len(self.exchanges) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"stand-in saw {len(self.exchanges)} requests, expected {n}")
            time.sleep(0.002)
        exchanges = list(self.exchanges)
        for ex in exchanges:
            if not ex.done.wait(max(deadline - time.monotonic(), 0.0)):
                raise TimeoutError(f"stand-in exchange {ex.index} did not finish")
        return exchanges

    def last(self, timeout: float = 10.0) -> Exchange:
        """The most recent exchange, once it has finished answering."""
        return self.wait(max(len(self.exchanges), 1), timeout)[-1]

    # --- lifecycle --------------------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def astart(self) -> Standin:
        """Serve from the running event loop."""
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> Standin:
        """Serve from a background thread with its own event loop; returns once the port is bound."""
        self._thread = threading.Thread(target=self._serve_thread, name="standin", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._startup_error is not None:
            raise RuntimeError("stand-in failed to start") from self._startup_error
        return self

    def _serve_thread(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self.astart())
        except BaseException as exc:  # pragma: no cover - reported by start()
            self._startup_error = exc
            self._ready.set()
            return
        self._stop_event = asyncio.Event()
        self._ready.set()
        loop.run_until_complete(self._stop_event.wait())
        loop.run_until_complete(self.astop())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> Standin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the handler ------------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self._lock:
            ex = Exchange(
                index=len(self.exchanges),
                method=request.method,
                path=request.path,
                query=request.query_string,
                headers=[(k, v) for k, v in request.headers.items()],
                body=body,
            )
            self.exchanges.append(ex)
        try:
            return await self._answer(request, ex)
        finally:
            ex.done.set()
            if self._record_path:
                with open(self._record_path, "a") as fh:
                    fh.write(json.dumps(ex.to_record()) + "\n")

    async def _answer(self, request: web.Request, ex: Exchange) -> web.StreamResponse:
        path = request.path
        payload: dict[str, Any] = {}
        if ex.body:
            try:
                parsed = json.loads(ex.body)
                payload = parsed if isinstance(parsed, dict) else {}
            except ValueError:
                payload = {}
        role, text = _last_message(payload, path)
        ctl = _controls(request, text)
        provider = "anthropic" if path.endswith("/messages") else "openai"

        fault = ctl.fault
        if fault and not fault.startswith("break-after"):
            status_text, _, once = fault.partition("-")
            key = hashlib.sha256(ex.body).hexdigest() + fault
            if status_text.isdigit() and (once != "once" or key not in self._seen_faults):
                self._seen_faults.add(key)
                return await self._send_error(request, ex, int(status_text), provider)

        ident = hashlib.sha256(ex.body).hexdigest()[:24]
        stream = bool(payload.get("stream"))
        if path.endswith("/chat/completions"):
            events = self._openai_chat(payload, role, text, ctl, ident, stream)
        elif path.endswith("/responses"):
            events = self._openai_responses(payload, text, ctl, ident, stream)
        elif path.endswith("/messages"):
            events = self._anthropic_messages(payload, role, text, ctl, ident, stream)
        else:
            events = [_dumps({"method": request.method, "path": path, "query": request.query_string,
                              "body_sha256": hashlib.sha256(ex.body).hexdigest(), "pieces": answer_pieces(text, ctl.chunks)})]
            stream = request.headers.get("x-standin-stream") == "1"
            if stream:
                events = [p.encode() for p in answer_pieces(ex.body.decode("latin-1"), ctl.chunks)]
                return await self._send(request, ex, events, ctl, provider, content_type="application/octet-stream",
                                        streamed=True)
        content_type = "text/event-stream; charset=utf-8" if stream else "application/json"
        return await self._send(request, ex, events, ctl, provider, content_type=content_type, streamed=stream)

    def _headers(self, provider: str, content_type: str, ident: str) -> dict[str, str]:
        headers = {"content-type": content_type}
        if provider == "anthropic":
            headers["request-id"] = f"req_{ident}"
            headers["anthropic-organization-id"] = "standin-org"
        else:
            headers["x-request-id"] = f"req_{ident}"
            headers["openai-processing-ms"] = "1"
            headers["set-cookie"] = "__cf_bm=standin-cookie-secret; path=/; HttpOnly"
        return headers

    async def _send_error(self, request: web.Request, ex: Exchange, status: int, provider: str) -> web.StreamResponse:
        kind = "rate_limit_error" if status == 429 else "api_error" if status >= 500 else "invalid_request_error"
        message = f"stand-in fault {status}"
        if provider == "anthropic":
            body = _dumps({"type": "error", "error": {"type": kind, "message": message}})
        else:
            body = _dumps({"error": {"message": message, "type": kind, "param": None, "code": kind}})
        headers = self._headers(provider, "application/json", hashlib.sha256(ex.body).hexdigest()[:24])
        headers["retry-after-ms"] = "1"
        resp = web.Response(status=status, body=body, headers=headers)
        ex.status = status
        ex.response_headers = list(headers.items())
        ex.response_chunks = [body]
        ex.completed = True
        return resp

    async def _send(
        self,
        request: web.Request,
        ex: Exchange,
        chunks: list[bytes],
        ctl: _Controls,
        provider: str,
        *,
        content_type: str,
        streamed: bool,
    ) -> web.StreamResponse:
        ident = hashlib.sha256(ex.body).hexdigest()[:24]
        headers = self._headers(provider, content_type, ident)
        break_after = -1
        if ctl.fault.startswith("break-after"):
            break_after = int(ctl.fault.split(":", 1)[1] or 0)
        if ctl.gzip:
            headers["content-encoding"] = "gzip"
            if streamed:
                comp = zlib.compressobj(wbits=31)
                wire = [comp.compress(c) + comp.flush(zlib.Z_SYNC_FLUSH) for c in chunks]
                wire[-1] += comp.flush(zlib.Z_FINISH)
            else:
                wire = [gzip.compress(b"".join(chunks), mtime=0)]
        else:
            wire = chunks if streamed else [b"".join(chunks)]

        ex.status = 200
        ex.response_headers = list(headers.items())
        if not streamed and break_after < 0 and ctl.delay_ms == 0:
            ex.response_chunks = list(wire)
            ex.completed = True
            return web.Response(status=200, body=wire[0], headers=headers)

        resp = web.StreamResponse(status=200, headers=headers)
        if not streamed:
            resp.content_length = len(wire[0])
            if break_after >= 0:  # a non-streamed body cut in the middle
                half = max(len(wire[0]) // 2, 1)
                wire = [wire[0][:half], wire[0][half:]]
                break_after = 1
        await resp.prepare(request)
        for i, piece in enumerate(wire):
            if i == break_after:
                self._drop(request)
                return resp
            if ctl.delay_ms:
                await asyncio.sleep(ctl.delay_ms / 1000)
            try:
                await resp.write(piece)
            except (ConnectionError, RuntimeError):
                return resp  # the client went away
            ex.response_chunks.append(piece)
        if break_after == len(wire):
            self._drop(request)
            return resp
        await resp.write_eof()
        ex.completed = True
        return resp

    @staticmethod
    def _drop(request: web.Request) -> None:
        """Close the connection mid-body: what was written is flushed first, then EOF (no terminating chunk)."""
        transport = request.transport
        if transport is not None:
            transport.close()

    # --- OpenAI chat completions ------------------------------------------------------------------------------

    def _openai_chat(
        self, payload: dict[str, Any], role: str, text: str, ctl: _Controls, ident: str, stream: bool
    ) -> list[bytes]:
        model = str(payload.get("model", "standin-model"))
        cid = f"chatcmpl-{ident}"
        pieces = answer_pieces(text, ctl.chunks)
        call = ctl.tool if role == "user" and ctl.tool in _tool_names(payload) else ""
        prompt_tokens = max(len(json.dumps(payload.get("messages", ""))) // 4, 1)
        completion_tokens = ctl.chunks
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        call_id = f"call_{ident[:16]}"
        args_pieces = _split(ctl.args, ctl.chunks)
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces), "refusal": None, "annotations": []}
            finish = "stop"
            if call:
                message["content"] = None
                message["tool_calls"] = [
                    {"id": call_id, "type": "function", "function": {"name": call, "arguments": ctl.args}}
                ]
                finish = "tool_calls"
            return [
                _dumps(
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": CREATED,
                        "model": model,
                        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                        "usage": usage,
                        "service_tier": "default",
                        "system_fingerprint": "fp_standin",
                    }
                )
            ]
        include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None, choices: bool = True) -> bytes:
            obj: dict[str, Any] = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model,
                "service_tier": "default",
                "system_fingerprint": "fp_standin",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else [],
            }
            if include_usage:
                obj["usage"] = None
            return b"data: " + _dumps(obj) + b"\n\n"

        out: list[bytes] = []
        if call:
            out.append(
                chunk(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"index": 0, "id": call_id, "type": "function", "function": {"name": call, "arguments": ""}}
                        ],
                        "refusal": None,
                    }
                )
            )
            out.extend(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in args_pieces)
            out.append(chunk({}, "tool_calls"))
        else:
            out.append(chunk({"role": "assistant", "content": "", "refusal": None}))
            out.extend(chunk({"content": p}) for p in pieces)
            out.append(chunk({}, "stop"))
        if include_usage:
            last = json.loads(chunk({}, None, choices=False)[6:])
            last["usage"] = usage
            out.append(b"data: " + _dumps(last) + b"\n\n")
        out.append(b"data: [DONE]\n\n")
        return out

    # --- OpenAI responses ----------------------------------------------------------------------------------------

    def _openai_responses(
        self, payload: dict[str, Any], text: str, ctl: _Controls, ident: str, stream: bool
    ) -> list[bytes]:
        model = str(payload.get("model", "standin-model"))
        pieces = answer_pieces(text, ctl.chunks)
        full = "".join(pieces)
        rid, mid = f"resp_{ident}", f"msg_{ident}"
        input_tokens = max(len(json.dumps(payload.get("input", ""))) // 4, 1)
        usage = {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": ctl.chunks,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + ctl.chunks,
        }
        part_done = {"type": "output_text", "text": full, "annotations": [], "logprobs": []}
        item_done = {"id": mid, "type": "message", "status": "completed", "role": "assistant", "content": [part_done]}

        def response(status: str, output: list[Any], use: Any) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "response",
                "created_at": CREATED,
                "status": status,
                "background": False,
                "error": None,
                "incomplete_details": None,
                "instructions": payload.get("instructions"),
                "max_output_tokens": payload.get("max_output_tokens"),
                "model": model,
                "output": output,
                "parallel_tool_calls": True,
                "previous_response_id": payload.get("previous_response_id"),
                "reasoning": {"effort": None, "summary": None},
                "store": True,
                "temperature": 1.0,
                "text": {"format": {"type": "text"}},
                "tool_choice": "auto",
                "tools": [],
                "top_p": 1.0,
                "truncation": "disabled",
                "usage": use,
                "user": None,
                "metadata": {},
            }

        if not stream:
            return [_dumps(response("completed", [item_done], usage))]
        seq = 0
        out: list[bytes] = []

        def event(name: str, data: dict[str, Any]) -> None:
            nonlocal seq
            out.append(f"event: {name}\n".encode() + b"data: " + _dumps({"type": name, "sequence_number": seq, **data}) + b"\n\n")
            seq += 1

        event("response.created", {"response": response("in_progress", [], None)})
        event("response.in_progress", {"response": response("in_progress", [], None)})
        item = {"id": mid, "type": "message", "status": "in_progress", "role": "assistant", "content": []}
        event("response.output_item.added", {"output_index": 0, "item": item})
        where = {"item_id": mid, "output_index": 0, "content_index": 0}
        event("response.content_part.added", {**where, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}})
        for p in pieces:
            event("response.output_text.delta", {**where, "delta": p, "logprobs": []})
        event("response.output_text.done", {**where, "text": full, "logprobs": []})
        event("response.content_part.done", {**where, "part": part_done})
        event("response.output_item.done", {"output_index": 0, "item": item_done})
        event("response.completed", {"response": response("completed", [item_done], usage)})
        return out

    # --- Anthropic messages ---------------------------------------------------------------------------------------

    def _anthropic_messages(
        self, payload: dict[str, Any], role: str, text: str, ctl: _Controls, ident: str, stream: bool
    ) -> list[bytes]:
        model = str(payload.get("model", "standin-model"))
        mid = f"msg_{ident}"
        pieces = answer_pieces(text, ctl.chunks)
        call = ctl.tool if role == "user" and ctl.tool in _tool_names(payload) else ""
        input_tokens = max(len(json.dumps(payload.get("messages", ""))) // 4, 1)
        tool_id = f"toolu_{ident[:20]}"
        try:
            tool_input = json.loads(ctl.args)
        except ValueError:
            tool_input = {}
        stop_reason = "tool_use" if call else "end_turn"
        if not stream:
            content: list[dict[str, Any]] = (
                [{"type": "tool_use", "id": tool_id, "name": call, "input": tool_input}]
                if call
                else [{"type": "text", "text": "".join(pieces)}]
            )
            return [
                _dumps(
                    {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": content,
                        "stop_reason": stop_reason,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": input_tokens,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                            "output_tokens": ctl.chunks,
                            "service_tier": "standard",
                        },
                    }
                )
            ]

        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\n".encode() + b"data: " + _dumps({"type": name, **data}) + b"\n\n"

        out = [
            event(
                "message_start",
                {
                    "message": {
                        "id": mid,
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": input_tokens,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                            "output_tokens": 1,
                            "service_tier": "standard",
                        },
                    }
                },
            )
        ]
        if call:
            out.append(event("content_block_start", {"index": 0, "content_block": {"type": "tool_use", "id": tool_id, "name": call, "input": {}}}))
            out.append(event("ping", {}))
            out.extend(
                event("content_block_delta", {"index": 0, "delta": {"type": "input_json_delta", "partial_json": p}})
                for p in _split(ctl.args, ctl.chunks)
            )
        else:
            out.append(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
            out.append(event("ping", {}))
            out.extend(
                event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}}) for p in pieces
            )
        out.append(event("content_block_stop", {"index": 0}))
        out.append(
            event(
                "message_delta",
                {"delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": {"output_tokens": ctl.chunks}},
            )
        )
        out.append(event("message_stop", {}))
        return out


def _split(text: str, n: int) -> list[str]:
    """`text` in at most `n` non-empty consecutive pieces."""
    if not text:
        return [""]
    n = max(min(n, len(text)), 1)
    size = -(-len(text) // n)
    return [text[i : i + size] for i in range(0, len(text), size)]


def main(argv: list[str] | None = None) -> int:
    """`python -m tests.support.standin --port 0`: serve until SIGTERM/SIGINT, print the port first."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--record", default=None, help="append one JSON line per exchange to this file")
    args = parser.parse_args(argv)
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    async def serve() -> None:
        standin = await Standin(args.host, args.port, record_path=args.record).astart()
        print(standin.port, flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await standin.astop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
