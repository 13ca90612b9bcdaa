"""A real MCP server (streamable HTTP, uvicorn) on 127.0.0.1 in a background thread, for tests.

Tools: `add(a, b)`, `store(key, value)` (mutating in spirit), `explode(reason)` (raises), `slow(seconds)`.
`calls` counts how many times each tool body ran, so replay tests can prove a tool did not run.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

calls: Counter[str] = Counter()


def build_server() -> MCPServer:
    server = MCPServer("tracetape-test-tools")

    @server.tool(annotations=ToolAnnotations(read_only_hint=True))
    def add(a: int, b: int) -> int:
        calls["add"] += 1
        return a + b

    @server.tool()
    def store(key: str, value: str) -> str:
        calls["store"] += 1
        return f"stored {key}"

    @server.tool()
    def explode(reason: str) -> str:
        calls["explode"] += 1
        raise ValueError(reason)

    @server.tool()
    async def slow(seconds: float) -> str:
        calls["slow"] += 1
        await asyncio.sleep(seconds)
        return "late"

    return server


@contextmanager
def serve_mcp() -> Iterator[str]:
    """Serve the tools; yields the streamable HTTP endpoint URL (`http://127.0.0.1:PORT/mcp`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    app = build_server().streamable_http_app(host="127.0.0.1")
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("MCP server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
