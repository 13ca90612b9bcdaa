"""Tool calls in replay: ask the replay session for the recorded answer; the tool body does not run.

Runs inside the agent, so it uses only the standard library (urllib). Contract:
- `answer_tool(ctx, name, envelope_hash, mutating)` POSTs `{"name", "envelope_hash", "mutating", "allowed"}`
  to `{ctx.replay_url}/_tool` (the session's base URL, `http://HOST:PORT/s/{session}`) and returns
  - a `ToolAnswer` (the recorded result, or the recorded exception) when the call must be answered from the
    tape: the caller must NOT run the tool and must return `answer.value()` (which re-raises a recorded
    exception);
  - None when the tool may run live: a mutating tool named in `ctx.allow_mutations` (or `*`), or a
    non-mutating tool in `step`/`live` mode past the tape.
- A mutating tool that is not allowed never runs: it is answered from the tape (the replayer counts it as a
  suppressed mutation and shows it on the replay trace, `ToolAnswer.suppressed_mutation` is True), or, when
  the tape has no answer, `ToolReplayMiss` is raised.
- Fail-closed: a miss in exact mode raises `ToolReplayMiss` (the 409 diagnostics in `.details`); a replayer
  that cannot be reached raises `ToolReplayError`. Neither ever runs the tool.
- A recorded exception is re-raised as its own class when that class is a builtin exception (any
  `BaseException`) or is defined in a module already imported and can be built from one message, with the
  recorded message as its `str()` (`KeyError('Rome')` recorded as `'Rome'` is rebuilt from the literal);
  otherwise as `RecordedToolError` carrying the recorded `error_type` and message.
- A recorded cancellation (`asyncio.CancelledError`: the caller's timeout, or another task, cancelled the
  call) is `ReplayedCancellation`: an async tool waits as the recorded call did (up to its recorded duration
  plus `CANCEL_GRACE_S`), so whatever cancelled it cancels the wait the same way, then ends cancelled.
"""

from __future__ import annotations

import ast
import builtins
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from tracetape.instrumentation import runtime

TIMEOUT_S = 30.0
CANCEL_GRACE_S = 1.0
CANCELLED = "asyncio.exceptions.CancelledError"


class ToolReplayError(RuntimeError):
    """The replayer could not answer a tool call (unreachable, or an unexpected answer)."""


class ToolReplayMiss(ToolReplayError):
    """The tape holds no answer for this tool call and it must not run live."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.details = details


class RecordedToolError(Exception):
    """A recorded tool exception whose class cannot be rebuilt in this process."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}" if message else error_type)
        self.error_type = error_type
        self.recorded_message = message


class ReplayedCancellation(BaseException):
    """The recorded call was cancelled after `seconds` (see module doc); async callers wait, then cancel."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


@dataclass(frozen=True)
class ToolAnswer:
    """The recorded outcome of one tool call."""

    name: str
    step: int
    result: Any
    error_type: str = ""
    error_message: str = ""
    suppressed_mutation: bool = False
    replayed_from: str = ""
    """The recorded attempt's `{trace id hex}-{span id hex}` (`contract.REPLAYED_FROM_HEADER` format)."""
    duration_s: float = 0.0

    def value(self) -> Any:
        """The recorded result (JSON value), or raise the recorded exception (`ReplayedCancellation` for a
        recorded cancellation)."""
        if self.error_type == CANCELLED:
            raise ReplayedCancellation(self.duration_s)
        if self.error_type:
            raise rebuild_exception(self.error_type, self.error_message)
        return self.result


def rebuild_exception(error_type: str, message: str) -> BaseException:
    """The recorded exception as an instance (see module doc)."""
    module, _, qualname = error_type.rpartition(".")
    cls: Any = None
    if not module:
        cls = getattr(builtins, error_type, None)
    elif module in sys.modules:
        cls = sys.modules[module]
        for part in qualname.split("."):
            cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            exc = cls(message)
        except Exception:
            return RecordedToolError(error_type, message)
        if str(exc) != message:  # a class whose str() is not its argument: KeyError('Rome') says 'Rome'
            try:
                literal = cls(ast.literal_eval(message))
                if str(literal) == message:
                    return literal
            except Exception:
                pass
        return exc
    return RecordedToolError(error_type, message)


def _allowed(ctx: runtime.RunContext, name: str) -> bool:
    return name in ctx.allow_mutations or "*" in ctx.allow_mutations


def answer_tool(ctx: runtime.RunContext, name: str, envelope_hash: str, mutating: bool) -> ToolAnswer | None:
    """The tape's answer to this call, or None when the tool may run live (see module doc)."""
    if not ctx.replay_url:
        raise ToolReplayError("replay mode without a replay session URL (TRACETAPE_REPLAY_URL)")
    payload = json.dumps({"name": name, "envelope_hash": envelope_hash, "mutating": bool(mutating),
                          "allowed": bool(mutating) and _allowed(ctx, name)}).encode()
    req = urllib.request.Request(f"{ctx.replay_url.rstrip('/')}/_tool", data=payload, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            body = json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            details = json.loads(err.read() or b"{}")
        except ValueError:
            details = {}
        if err.code == 409:
            raise ToolReplayMiss(f"tool {name!r}: no recorded answer ({details.get('hint', 'replay miss')})",
                                 details) from None
        raise ToolReplayError(f"tool {name!r}: the replayer answered {err.code} {details.get('error', '')}".strip()) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise ToolReplayError(f"tool {name!r}: cannot reach the replayer: {type(err).__name__}") from None
    action = body.get("action") if isinstance(body, dict) else None
    if action == "run":
        return None
    if action != "answer":
        raise ToolReplayError(f"tool {name!r}: unexpected answer from the replayer")
    return ToolAnswer(name=name, step=int(body.get("step", -1)), result=body.get("result"),
                      error_type=str(body.get("error_type") or ""), error_message=str(body.get("error_message") or ""),
                      suppressed_mutation=bool(body.get("suppressed_mutation")),
                      replayed_from=str(body.get("replayed_from") or ""),
                      duration_s=_seconds(body.get("duration_ms")))


def _seconds(duration_ms: Any) -> float:
    """A recorded duration in seconds, within 0 and an hour."""
    if isinstance(duration_ms, bool) or not isinstance(duration_ms, (int, float)) or duration_ms != duration_ms:
        return 0.0
    return min(max(0.0, float(duration_ms)) / 1000, 3600.0)
