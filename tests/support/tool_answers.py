"""A stand-in for the replay session's tool endpoint (`POST {replay_url}/_tool`, as `tool_replay` speaks it),
on 127.0.0.1 in a thread: answers from a table keyed by (tool name, envelope hash).

    with ToolAnswers({("lookup", h): {"action": "answer", "result": {...}}}) as answers:
        ctx = RunContext(..., mode="replay", replay_url=answers.url)

A key missing from the table gets a 409 miss (`{"hint": ...}`). Every request body is kept in `requests`.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class ToolAnswers:
    def __init__(self, table: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.table = table
        self.requests: list[dict[str, Any]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                owner.requests.append({"path": self.path, **body})
                answer = owner.table.get((body.get("name"), body.get("envelope_hash")))
                status, payload = (200, answer) if answer is not None else (409, {"hint": "no such call"})
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="tool-answers", daemon=True)

    @property
    def url(self) -> str:
        """The replay session's base URL (`TRACETAPE_REPLAY_URL`)."""
        return f"http://127.0.0.1:{self._server.server_port}/s/test"

    def __enter__(self) -> ToolAnswers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
