"""tracetape: record and replay AI agents through OpenTelemetry.

The public in-process API is small: `tool` (a decorator) and `tool_call` (a context manager) mark tool calls
so that they are recorded and, in replay, answered from the tape.
"""

from tracetape.instrumentation.tools import tool, tool_call

__all__ = ["tool", "tool_call"]
__version__ = "0.1.0"
