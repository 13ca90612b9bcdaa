"""MCP tool calls as tool steps, with no code change: wraps `mcp.client.session.ClientSession.call_tool`.

Every `ClientSession.call_tool(name, arguments, ...)` (which `mcp.Client.call_tool` also goes through, once
per round) is recorded like `tools.tool_call` with `TOOL_SOURCE` = `mcp`: the arguments dict (`{}` when
None), and as the result the returned `CallToolResult` (or other result model) dumped to JSON as on the
wire (`model_dump(mode="json", by_alias=True, exclude_none=True)`). A tool error the server reports
(`isError`) is a result, not an exception; an exception (timeout, protocol error) is recorded and
re-raised. In replay, the recorded result is returned as a `CallToolResult` without calling the server
(see `tools`).

The MCP transport's own HTTP traffic is not a step: the httpx2 client a streamable-HTTP session sends
with (`StreamableHTTPTransport`) sends with instrumentation suppressed, so the HTTP hooks skip it; what
it reads back and delivers to the session is not suppressed (a sampling callback the server triggers is
recorded as usual).

`instrument()` does not import mcp (that costs most of a second): it patches at once when
`mcp.client.session` is already imported, else right after it is (a post-import hook).

`TOOL_MUTATING` follows the tool's annotations from this session's latest `list_tools`: False only when
the server declared `readOnlyHint: true`; True otherwise, including for a tool never listed (MCP's own
default is that a tool may modify its environment).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import threading
import weakref
from types import ModuleType
from typing import Any

from opentelemetry.instrumentation.utils import suppress_instrumentation

from tracetape.instrumentation import tools

TARGET_MODULE = "mcp.client.session"
TRANSPORT_MODULE = "mcp.client.streamable_http"
_TRANSPORT_METHODS = ("post_writer", "handle_get_stream", "terminate_session")  # each receives the client
_originals: dict[str, Any] = {}
_read_only: weakref.WeakKeyDictionary[Any, dict[str, bool]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()
_wanted = False
_hook_registered = False


def _dump(result: Any) -> Any:
    dump = getattr(result, "model_dump", None)
    if callable(dump):
        return dump(mode="json", by_alias=True, exclude_none=True)
    return result


def _load(value: Any) -> Any:
    """A recorded result (replay) back as a `CallToolResult`."""
    from mcp.types import CallToolResult

    return CallToolResult.model_validate(value)


def _note_listing(session: Any, result: Any) -> None:
    try:
        hints = _read_only.setdefault(session, {})
        for tool in getattr(result, "tools", None) or ():
            annotations = getattr(tool, "annotations", None)
            hints[tool.name] = bool(getattr(annotations, "read_only_hint", None))
    except TypeError:  # a session class that cannot be weakly referenced
        pass


def _mutating(session: Any, name: str) -> bool:
    try:
        read_only = _read_only.get(session, {}).get(name)
    except TypeError:
        read_only = None
    return not read_only


def instrument() -> None:
    """Wrap `ClientSession.call_tool` and `list_tools` (now or once mcp is imported); idempotent.

    ModuleNotFoundError when mcp is not installed.
    """
    global _wanted, _hook_registered
    if importlib.util.find_spec("mcp") is None:
        raise ModuleNotFoundError("No module named 'mcp'", name="mcp")
    with _lock:
        _wanted = True
        register = not _hook_registered
        _hook_registered = True
    for name, patch in ((TARGET_MODULE, _patch), (TRANSPORT_MODULE, _patch_transport)):
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
        elif register:
            from wrapt.importer import register_post_import_hook

            register_post_import_hook(patch, name)


def _patch(module: ModuleType) -> None:
    with _lock:
        if not _wanted or "call_tool" in _originals:
            return
        _patch_class(module.ClientSession)


def _quiet_client(client: Any) -> None:
    """Make `client` (an httpx2.AsyncClient) send with instrumentation suppressed; idempotent."""
    if getattr(client, "_tracetape_quiet", False):
        return
    send = client.send

    async def quiet_send(*args: Any, **kwargs: Any) -> Any:
        with suppress_instrumentation():
            return await send(*args, **kwargs)

    try:
        client.send = quiet_send
        client._tracetape_quiet = True
    except AttributeError:  # a client type that does not take attributes: its traffic gets recorded
        pass


def _patch_transport(module: ModuleType) -> None:
    with _lock:
        cls = getattr(module, "StreamableHTTPTransport", None)
        if not _wanted or cls is None or "transport" in _originals:
            return
        originals = {}
        for attr in _TRANSPORT_METHODS:
            original = getattr(cls, attr, None)
            if original is None:
                continue
            originals[attr] = original
            setattr(cls, attr, _quieting(original))
        _originals["transport"] = (cls, originals)


def _quieting(method: Any) -> Any:
    @functools.wraps(method)
    async def wrapper(self: Any, client: Any, *args: Any, **kwargs: Any) -> Any:
        _quiet_client(client)
        return await method(self, client, *args, **kwargs)

    return wrapper


def _patch_class(cls: Any) -> None:
    call_tool = cls.call_tool
    list_tools = cls.list_tools

    @functools.wraps(call_tool)
    async def traced_call_tool(self: Any, name: str, arguments: dict[str, Any] | None = None, *args: Any,
                               **kwargs: Any) -> Any:
        return await tools.record_async_call(
            name,
            {} if arguments is None else arguments,
            lambda: call_tool(self, name, arguments, *args, **kwargs),
            mutating=_mutating(self, name),
            source=tools.SOURCE_MCP,
            result_json=_dump,
            result_from_json=_load,
        )

    @functools.wraps(list_tools)
    async def traced_list_tools(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = await list_tools(self, *args, **kwargs)
        _note_listing(self, result)
        return result

    _originals["call_tool"] = call_tool
    _originals["list_tools"] = list_tools
    cls.call_tool = traced_call_tool
    cls.list_tools = traced_list_tools


def uninstrument() -> None:
    """Restore the original methods (and stop a pending post-import patch)."""
    global _wanted
    with _lock:
        _wanted = False
        transport = _originals.pop("transport", None)
        if transport is not None:
            cls, methods = transport
            for attr, original in methods.items():
                setattr(cls, attr, original)
        if _originals:
            cls = sys.modules[TARGET_MODULE].ClientSession
            for attr, original in _originals.items():
                setattr(cls, attr, original)
        _originals.clear()
