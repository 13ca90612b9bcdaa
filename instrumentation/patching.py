"""Replacing methods on library classes, and putting them back: the bookkeeping every hook shares.

`Patches.patch(cls, name, make)` replaces `cls.name` by `make(original)` unless it is already patched
(by any tracetape hook: the wrapper carries `ORIGINAL`), so instrumenting twice is harmless.
`Patches.restore()` puts back every original it replaced, but only where its own wrapper is still in
place (someone patching over us keeps their patch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ORIGINAL = "__tracetape_original__"
"""Attribute of a wrapper naming the function it replaced."""


class Patches:
    """The methods one hook module replaced."""

    def __init__(self) -> None:
        self._patched: list[tuple[type, str, Any]] = []

    def patch(self, cls: type, name: str, make: Callable[[Any], Any]) -> bool:
        """Replace `cls.name` (defined on `cls` itself) by `make(original)`; False when absent or patched."""
        current = cls.__dict__.get(name)
        if current is None or hasattr(current, ORIGINAL):
            return False
        wrapper = make(current)
        setattr(wrapper, ORIGINAL, current)
        setattr(cls, name, wrapper)
        self._patched.append((cls, name, current))
        return True

    def restore(self) -> None:
        """Put back what `patch` replaced, newest first."""
        while self._patched:
            cls, name, original = self._patched.pop()
            current = cls.__dict__.get(name)
            if current is not None and getattr(current, ORIGINAL, None) is original:
                setattr(cls, name, original)

    def __bool__(self) -> bool:
        return bool(self._patched)
