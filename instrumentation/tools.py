"""Tool calls as recorded steps: the `@tracetape.tool` decorator and the `tracetape.tool_call` context manager.

Each call is one step of one attempt: a span `execute_tool {name}` (current while the tool runs, so what the
tool does nests under it) with `GEN_AI_OPERATION_NAME` = `execute_tool`, `GEN_AI_TOOL_NAME`,
`GEN_AI_TOOL_CALL_ID` (when known), `SPAN_KIND` = `step`, `STEP_KIND` = `tool`, `STEP_ID`,
`STEP_STARTED_NS`, `STEP_INDEX`, `STEP_ATTEMPT` = 0, `TOOL_MUTATING`, `TOOL_SOURCE`, and:
- `TOOL_ARGUMENTS`: the canonical JSON (`contract.canonical_bytes`) of the arguments, redacted;
- `ENVELOPE_HASH` over `contract.tool_envelope(name, A)` where A is the JSON value of those redacted bytes
  (`tool_request` computes both; a replayer hashing a live call uses it too), `ENVELOPE_PROFILE`;
- on return: `TOOL_RESULT`, the JSON (keys sorted) of the result, redacted (`null` when a `tool_call` body
  never called `set_result`);
- on an exception (any `BaseException`, cancellation included): `error.type` (the class, module-qualified
  unless builtin), `ERROR_MESSAGE` (redacted) and status ERROR; the exception is re-raised unchanged. No
  exception event is added (its message would escape redaction).

Decorated functions have their arguments bound by parameter name (`inspect.signature`, defaults applied;
`*args` kept as a list under its name, `**kwargs` merged in; a leading `self`/`cls` left out, as are the
names in `exclude`). A `tool_call_id` or `call_id` keyword argument gives `GEN_AI_TOOL_CALL_ID` and is left
out of the arguments, so the envelope of a call does not depend on the id the model picked.
A failure of the recorder itself never reaches the tool: it is noted in `RECORDING_ERROR`.

When this process is not recording (`runtime.recording()` is None) the function runs untouched.

Replay (`TRACETAPE_MODE=replay`): each call first asks `_replayed_result` (the replay session, through
`tool_replay.answer_tool`). A recorded answer is returned (or the recorded exception raised) without running
the function, and recorded on this run's step like a live result; `NOT_REPLAYED` runs it live; a miss raises
(fail-closed). A `tool_call` body always runs: it must check `call.replayed` and then use `call.result`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, NoReturn, TypeVar, overload

import msgspec
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from tracetape.instrumentation import contract, ids, redaction, runtime, tool_replay

F = TypeVar("F", bound=Callable[..., Any])

SOURCE_DECORATOR = "decorator"
SOURCE_CONTEXT = "context"
SOURCE_MCP = "mcp"
CALL_ID_KWARGS = ("tool_call_id", "call_id")
OPERATION_EXECUTE_TOOL = "execute_tool"
AWAITABLE_FROM_SYNC = ("result: the tool is not an async function but returned an awaitable (an async function "
                       "behind a sync wrapper, or an async __call__); a replay could not return one: decorate the "
                       "async function itself")


class _NotReplayed:
    def __repr__(self) -> str:
        return "NOT_REPLAYED"


NOT_REPLAYED: Any = _NotReplayed()
"""What `_replayed_result` returns when the call must run live."""

_encode_sorted = msgspec.json.Encoder(order="sorted").encode
_decode = msgspec.json.Decoder().decode
_NULL = b"null"


def tool_request(name: str, arguments: Any) -> tuple[bytes, str]:
    """(redacted canonical JSON of `arguments`, envelope hash) of a call to tool `name`."""
    value = contract.to_jsonable(arguments)
    raw = _encode_sorted(value)
    redacted = redaction.redact_body(raw)
    if redacted is not raw:
        value = _decode(redacted)
    return redacted, contract.envelope_hash(contract.tool_envelope(name, value))


def encode_result(result: Any) -> bytes:
    """The redacted JSON (keys sorted) recorded as a tool's result."""
    return redaction.redact_body(_encode_sorted(contract.to_jsonable(result)))


def _replayed_result(
    ctx: runtime.RunContext, name: str, envelope_hash: str, mutating: bool, span: trace.Span
) -> Any:
    """Replay mode: the recorded result of this call (the tool must not run), `NOT_REPLAYED` (run it live),
    or raise: the recorded exception, or `tool_replay.ToolReplayMiss` / `ToolReplayError` (fail-closed).

    Asks the replay session at `ctx.replay_url` through `tool_replay.answer_tool`, which also decides
    whether a mutating tool may run live (`ctx.allow_mutations`). An answer from the tape is marked on the
    tool's span (`TOOL_REPLAYED`, a link to the recorded call, and for a mutating tool
    `TOOL_MUTATION_SUPPRESSED` plus an event), so the replay's trace shows what did not run.
    """
    answer = tool_replay.answer_tool(ctx, name, envelope_hash, mutating)
    if answer is None:
        return NOT_REPLAYED
    span.set_attribute(contract.TOOL_REPLAYED, True)
    ids = contract.parse_replayed_from(answer.replayed_from)
    if ids is not None:
        span.add_link(SpanContext(trace_id=ids[0], span_id=ids[1], is_remote=True,
                                  trace_flags=TraceFlags(TraceFlags.SAMPLED)),
                      {contract.LINK_KIND: contract.LINK_REPLAY_OF})
    if answer.suppressed_mutation:
        span.set_attribute(contract.TOOL_MUTATION_SUPPRESSED, True)
        span.add_event(contract.EVENT_MUTATION_SUPPRESSED, {contract.GEN_AI_TOOL_NAME: name})
    return answer.value()


def _error_type(exc: BaseException) -> str:
    cls = type(exc)
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


class _Step:
    """One recorded tool call: its span, current from its start until it ends (`succeed`/`fail`/`abandon`)."""

    __slots__ = ("span", "_token", "arguments_bytes", "envelope_hash", "_ctx", "_name", "_mutating")

    def __init__(
        self,
        ctx: runtime.RunContext,
        name: str,
        arguments: Any,
        *,
        mutating: bool,
        call_id: str | None,
        source: str,
    ) -> None:
        started_ns = time.time_ns()
        attributes: dict[str, Any] = {
            contract.GEN_AI_OPERATION_NAME: OPERATION_EXECUTE_TOOL,
            contract.GEN_AI_TOOL_NAME: name,
            contract.SPAN_KIND: contract.SPAN_KIND_STEP,
            contract.STEP_KIND: contract.STEP_KIND_TOOL,
            contract.STEP_ID: ids.new_step_id(),
            contract.STEP_STARTED_NS: started_ns,
            contract.STEP_INDEX: runtime.next_step_index(),
            contract.STEP_ATTEMPT: 0,
            contract.TOOL_MUTATING: bool(mutating),
            contract.TOOL_SOURCE: source,
            contract.ENVELOPE_PROFILE: contract.CANON_PROFILE,
        }
        if call_id:
            attributes[contract.GEN_AI_TOOL_CALL_ID] = str(call_id)
        self.arguments_bytes = b""
        self.envelope_hash = ""
        try:
            self.arguments_bytes, self.envelope_hash = tool_request(name, arguments)
            attributes[contract.TOOL_ARGUMENTS] = self.arguments_bytes
            attributes[contract.ENVELOPE_HASH] = self.envelope_hash
        except Exception as err:  # noqa: BLE001 - the tool runs whatever the recorder thinks of its arguments
            attributes[contract.RECORDING_ERROR] = f"arguments: {type(err).__name__}: {err}"
        self.span = runtime.tracer().start_span(
            contract.step_span_name(contract.STEP_KIND_TOOL, tool=name),
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=started_ns,
        )
        self._token = context_api.attach(trace.set_span_in_context(self.span))
        self._ctx, self._name, self._mutating = ctx, name, mutating

    def replay(self) -> Any:
        """In replay mode, `_replayed_result` for this call; else `NOT_REPLAYED`. An exception it raises
        (the recorded one, or a miss) ends this step with it, then propagates: the tool must not run."""
        if self._ctx.mode != runtime.MODE_REPLAY:
            return NOT_REPLAYED
        try:
            return _replayed_result(self._ctx, self._name, self.envelope_hash, self._mutating, self.span)
        except tool_replay.ReplayedCancellation:
            raise  # the caller reproduces it: `cancelled_as_recorded` (async) or `cancelled_now` (sync)
        except BaseException as exc:
            self.fail(exc)
            raise

    async def cancelled_as_recorded(self, seconds: float) -> NoReturn:
        """A recorded cancellation, in an async call: wait as the recorded call did (whatever cancelled it then,
        the caller's timeout or another task, cancels this wait now), then end cancelled either way."""
        try:
            await asyncio.sleep(seconds + tool_replay.CANCEL_GRACE_S)
        except asyncio.CancelledError as exc:
            self.fail(exc)
            raise
        self.cancelled_now()

    def cancelled_now(self) -> NoReturn:
        """A recorded cancellation with nothing left to wait for (a sync call): end cancelled, raise it."""
        exc = asyncio.CancelledError()
        self.fail(exc)
        raise exc

    def _detach(self) -> None:
        try:
            context_api.detach(self._token)
        except Exception:  # noqa: BLE001 - ended in another context than it started in
            pass

    def succeed(self, result: Any, *, has_result: bool = True) -> None:
        self._detach()
        try:
            self.span.set_attribute(contract.TOOL_RESULT, encode_result(result) if has_result else _NULL)
        except Exception as err:  # noqa: BLE001
            self.span.set_attribute(contract.RECORDING_ERROR, f"result: {type(err).__name__}: {err}")
        self.span.end()

    def abandon(self, reason: str) -> None:
        """End the span with a recording error and no result."""
        self._detach()
        self.span.set_attribute(contract.RECORDING_ERROR, reason)
        self.span.end()

    def when_awaited(self, awaitable: Awaitable[Any]) -> Awaitable[Any]:
        """For a tool that looked synchronous but returned an awaitable: the awaitable the caller gets, whose
        result (or exception) ends this step when awaited, the span current meanwhile. Replaying such a call
        could not hand back an awaitable, so the step says the run is not replayable."""
        self._detach()
        self.span.set_attribute(contract.RECORDING_ERROR, AWAITABLE_FROM_SYNC)
        return self._await(awaitable)

    async def _await(self, awaitable: Awaitable[Any]) -> Any:
        self._token = context_api.attach(trace.set_span_in_context(self.span))
        try:
            result = await awaitable
        except BaseException as exc:
            self.fail(exc)
            raise
        self.succeed(result)
        return result

    def fail(self, exc: BaseException) -> None:
        self._detach()
        try:
            message = redaction.redact_text(str(exc))
        except Exception:  # noqa: BLE001 - an exception whose __str__ fails: the tool's own exception still wins
            message = ""
        self.span.set_attributes({contract.ERROR_TYPE: _error_type(exc), contract.ERROR_MESSAGE: message})
        self.span.set_status(Status(StatusCode.ERROR, message or _error_type(exc)))
        self.span.end()


def _start(
    name: str, arguments: Any, *, mutating: bool, call_id: str | None, source: str
) -> _Step | None:
    ctx = runtime.recording()
    if ctx is None:
        return None
    try:
        return _Step(ctx, name, arguments, mutating=mutating, call_id=call_id, source=source)
    except Exception:  # noqa: BLE001 - e.g. the run was deactivated between the two calls
        return None


# --- the context manager ---------------------------------------------------------------------------------
class ToolCall:
    """One tool call inside `with tool_call(...) as call:` (or `async with`); give it the result with
    `call.set_result(x)`. In replay mode, when `call.replayed` is True, `call.result` already holds the
    recorded result and the body must not run the tool; entering raises the recorded exception, or a miss."""

    __slots__ = ("name", "arguments", "mutating", "call_id", "result", "replayed", "_has_result", "_step", "_source")

    def __init__(
        self,
        name: str,
        arguments: Any = None,
        *,
        mutating: bool = False,
        call_id: str | None = None,
        source: str = SOURCE_CONTEXT,
    ) -> None:
        self.name = name
        self.arguments = {} if arguments is None else arguments
        self.mutating = mutating
        self.call_id = call_id
        self.result: Any = None
        self.replayed = False
        """True when `result` holds the recorded result (replay): the body must not run the tool."""
        self._has_result = False
        self._step: _Step | None = None
        self._source = source

    @property
    def recording(self) -> bool:
        return self._step is not None

    def set_result(self, result: Any) -> None:
        self.result = result
        self._has_result = True

    def __enter__(self) -> ToolCall:
        step = self._start()
        replayed = NOT_REPLAYED
        if step is not None:
            try:
                replayed = step.replay()  # raises the recorded exception (or a miss): the body never runs
            except tool_replay.ReplayedCancellation:
                step.cancelled_now()
        return self._opened(step, replayed)

    def _start(self) -> _Step | None:
        return _start(self.name, self.arguments, mutating=self.mutating, call_id=self.call_id, source=self._source)

    def _opened(self, step: _Step | None, replayed: Any) -> ToolCall:
        if replayed is not NOT_REPLAYED:
            self.set_result(replayed)
            self.replayed = True
        self._step = step
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        step, self._step = self._step, None
        if step is None:
            return
        if exc is not None:
            step.fail(exc)
        else:
            step.succeed(self.result, has_result=self._has_result)

    async def __aenter__(self) -> ToolCall:
        step = self._start()
        replayed = NOT_REPLAYED
        if step is not None:
            try:
                replayed = step.replay()
            except tool_replay.ReplayedCancellation as cancelled:
                await step.cancelled_as_recorded(cancelled.seconds)
        return self._opened(step, replayed)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def tool_call(
    name: str, arguments: Any = None, mutating: bool = False, call_id: str | None = None
) -> ToolCall:
    """Record the tool call made in the `with` / `async with` body; see `ToolCall`."""
    return ToolCall(name, arguments, mutating=mutating, call_id=call_id)


# --- the decorator ---------------------------------------------------------------------------------------
class _Binder:
    """Turns a call's (args, kwargs) into (arguments by name, call id)."""

    def __init__(self, func: Callable[..., Any], exclude: Iterable[str]) -> None:
        self._exclude = frozenset(exclude)
        try:
            self._sig: inspect.Signature | None = inspect.signature(func)
        except (TypeError, ValueError):
            self._sig = None
        params = list(self._sig.parameters.values()) if self._sig is not None else []
        self._skip_first = bool(params) and params[0].name in ("self", "cls") and params[0].kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        call_id = next((kwargs[k] for k in CALL_ID_KWARGS if kwargs.get(k)), None)
        if self._sig is None:
            named = {"args": list(args), "kwargs": dict(kwargs)}
        else:
            bound = self._sig.bind(*args, **kwargs)
            bound.apply_defaults()
            named = {}
            for index, (pname, value) in enumerate(bound.arguments.items()):
                if index == 0 and self._skip_first:
                    continue
                if self._sig.parameters[pname].kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                else:
                    named[pname] = list(value) if isinstance(value, tuple) and (
                        self._sig.parameters[pname].kind is inspect.Parameter.VAR_POSITIONAL
                    ) else value
        for key in (*CALL_ID_KWARGS, *self._exclude):
            named.pop(key, None)
        return named, (str(call_id) if call_id is not None else None)


@overload
def tool(func: F, /) -> F: ...


@overload
def tool(
    *, mutating: bool = False, name: str | None = None, exclude: Iterable[str] = ()
) -> Callable[[F], F]: ...


def tool(
    func: Callable[..., Any] | None = None,
    /,
    *,
    mutating: bool = False,
    name: str | None = None,
    exclude: Iterable[str] = (),
) -> Any:
    """Record every call of a sync or async function as a tool step: `@tool` or `@tool(mutating=True,
    name="search", exclude=("ctx",))`. `name` defaults to the function's `__name__`; `exclude` names
    parameters left out of the recorded arguments (contexts, clients: anything whose JSON form is not
    the call's meaning). Generator functions are refused (record them with `tool_call`)."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(f"tracetape.tool cannot record generator function {fn.__qualname__}; use tool_call")
        tool_name = name or getattr(fn, "__name__", None) or "tool"
        binder = _Binder(fn, exclude)

        def start(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Step | None:
            if runtime.recording() is None:
                return None
            try:
                arguments, call_id = binder.bind(args, kwargs)
            except TypeError:
                return None  # the call itself is wrong: let the function raise its own TypeError
            return _start(tool_name, arguments, mutating=mutating, call_id=call_id, source=SOURCE_DECORATOR)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                step = start(args, kwargs)
                if step is None:
                    return await fn(*args, **kwargs)
                try:
                    replayed = step.replay()
                except tool_replay.ReplayedCancellation as cancelled:
                    await step.cancelled_as_recorded(cancelled.seconds)
                if replayed is not NOT_REPLAYED:
                    step.succeed(replayed)
                    return replayed
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    step.fail(exc)
                    raise
                step.succeed(result)
                return result

            return async_wrapper

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            step = start(args, kwargs)
            if step is None:
                return fn(*args, **kwargs)
            try:
                replayed = step.replay()
            except tool_replay.ReplayedCancellation:
                step.cancelled_now()
            if replayed is not NOT_REPLAYED:
                step.succeed(replayed)
                return replayed
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                step.fail(exc)
                raise
            if inspect.isawaitable(result):  # an async function behind a sync wrapper, or an async __call__
                return step.when_awaited(result)
            step.succeed(result)
            return result

        return wrapper

    if func is not None:
        return decorate(func)
    return decorate


async def record_async_call(
    name: str,
    arguments: Any,
    call: Callable[[], Awaitable[Any]],
    *,
    mutating: bool,
    source: str,
    call_id: str | None = None,
    result_json: Callable[[Any], Any] | None = None,
    result_from_json: Callable[[Any], Any] | None = None,
) -> Any:
    """Await `call()` recorded as one tool step (used by hooks such as MCP's); `result_json` turns the
    result into what is recorded (default: the result itself). In replay, a recorded result is turned back
    into the library's type by `result_from_json` (default: as is) and `call()` is not awaited."""
    step = _start(name, arguments, mutating=mutating, call_id=call_id, source=source)
    if step is None:
        return await call()
    try:
        replayed = step.replay()
    except tool_replay.ReplayedCancellation as cancelled:
        await step.cancelled_as_recorded(cancelled.seconds)
    if replayed is not NOT_REPLAYED:
        step.succeed(replayed)
        return result_from_json(replayed) if result_from_json is not None else replayed
    try:
        result = await call()
    except BaseException as exc:
        step.fail(exc)
        raise
    try:
        recorded = result_json(result) if result_json is not None else result
    except Exception as err:  # noqa: BLE001
        step.abandon(f"result: {type(err).__name__}: {err}")
        return result
    step.succeed(recorded)
    return result
