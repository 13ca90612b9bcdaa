"""`tracetape step RUN N [--base-url URL] [--json]`: re-issue recorded step N's request to the live upstream,
exactly as recorded (method, URL, recorded headers, recorded body), and diff the answer against the recording.

Credentials come from the environment only (`OPENAI_API_KEY` → `Authorization: Bearer`, `ANTHROPIC_API_KEY` →
`x-api-key`, by the step's provider); they are never stored or printed. `--base-url` replaces the recorded
URL's scheme, host and port (e.g. a staging upstream). A body that was redacted at recording is sent as
stored (masked). Exit 0 when the answer is the same JSON as recorded, 1 when it differs, 2 on errors (a bad
`--base-url` or `--timeout`, an upstream that cannot be reached or breaks off its answer).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tracetape.errors import CliError
from tracetape.instrumentation import contract
from tracetape.replayer import jsondiff, responses
from tracetape.replayer.runref import add_store_arguments, open_store, resolve_run

_SKIP = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN")
    parser.add_argument("index", type=int, metavar="N")
    parser.add_argument("--base-url", default=None, help="send to this scheme://host:port instead of the recorded one")
    parser.add_argument("--timeout", type=float, default=120.0)
    add_store_arguments(parser)
    parser.add_argument("--json", action="store_true")


def _host(url: str) -> str:
    try:
        return urlsplit(url).netloc or url
    except ValueError:
        return url


def _rebase(url: str, base_url: str) -> str:
    """`url` with the scheme, host and port (and a path prefix) of `base_url`; CliError when either is bad."""
    try:
        base = urlsplit(base_url)
        base.port  # noqa: B018 - raises ValueError on a port that is not a number or out of range
    except ValueError as err:
        raise CliError(f"invalid --base-url {base_url!r}: {err}", 2) from None
    if base.scheme not in ("http", "https") or not base.netloc:
        raise CliError(f"invalid --base-url {base_url!r}: use http(s)://host[:port][/path]", 2)
    try:
        parts = urlsplit(url)
    except ValueError as err:
        raise CliError(f"the recorded URL {url!r} cannot be parsed: {err}", 2) from None
    return urlunsplit((base.scheme, base.netloc, (base.path.rstrip("/") + parts.path) if base.path else parts.path,
                       parts.query, ""))


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise CliError(f"--timeout must be a number of seconds > 0, got {args.timeout}", 2)
    store = open_store(args.data)
    try:
        rec = resolve_run(store, args.run_id, args.tenant, args.scope)
        steps = store.steps(rec.tenant, rec.scope, rec.run_id)
        if not 0 <= args.index < len(steps):
            raise CliError(f"run {rec.run_id} has steps 0..{len(steps) - 1}", 2)
        step = steps[args.index]
        if step.kind == contract.STEP_KIND_TOOL or not step.attempts:
            raise CliError(f"step {args.index} is a tool call: only HTTP/model steps can be re-issued", 2)
        attempt = step.attempts[-1]
        body = store.blob(rec.tenant, rec.scope, attempt.request_body.digest) if attempt.request_body else b""
        recorded = store.blob(rec.tenant, rec.scope, attempt.response_body.digest) if attempt.response_body else b""
    finally:
        store.close()
    url = attempt.url
    if args.base_url:
        url = _rebase(url, args.base_url)
    headers = {n: v for n, v in attempt.request_headers if n.lower() not in _SKIP}
    provider = step.provider
    if provider == "openai" and os.environ.get("OPENAI_API_KEY"):
        headers["authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    elif provider == "anthropic" and os.environ.get("ANTHROPIC_API_KEY"):
        headers["x-api-key"] = os.environ["ANTHROPIC_API_KEY"]
    try:
        req = urllib.request.Request(url, data=body or None, method=attempt.method or "POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=args.timeout) as resp:
                status, live, live_headers = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as err:
            status, live, live_headers = err.code, err.read(), err.headers
    except UnicodeError:  # not shown: it could quote a character of an API key
        raise CliError("a request header (or the API key from the environment) is not latin-1 text", 2) from None
    except (ValueError, http.client.InvalidURL) as err:  # a URL urllib rejects (`http://h:abc`, no scheme)
        raise CliError(f"cannot send the request to {url!r}: {err}", 2) from None
    except (urllib.error.URLError, OSError) as err:
        raise CliError(f"cannot reach {_host(url)}: {type(err).__name__}", 2) from None
    except http.client.HTTPException as err:  # IncompleteRead, BadStatusLine, ...: the answer broke off
        raise CliError(f"no complete answer from {_host(url)}: {type(err).__name__}", 2) from None
    encoding = (live_headers.get("content-encoding") or "").lower()
    streamed = (live_headers.get("content-type") or "").lower().startswith("text/event-stream")
    a: Any = {"status": attempt.status, "body": responses.body_value(recorded or b"", attempt.content_encoding, attempt.streamed)}
    b: Any = {"status": status, "body": responses.body_value(live, encoding, streamed)}
    changes = [c.to_json(200) for c in jsondiff.diff(a, b, limit=100)]
    out = {"run_id": rec.run_id, "step": args.index, "name": step.name, "same": not changes, "diff": changes}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"step {args.index} ({step.name}) re-issued: {'same answer' if not changes else f'{len(changes)} difference(s)'}")
        for d in changes[:30]:
            print(f"  {d['path']}: {json.dumps(d.get('expected'))[:100]} -> {json.dumps(d.get('received'))[:100]}")
    return 0 if not changes else 1
