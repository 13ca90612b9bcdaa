"""Field-level differences between two JSON values, addressed by JSON path. Pure; no I/O.

Contract:
- `diff(expected, received)` returns the differences in document order (object keys sorted), each a
  `Change(path, op, expected, received)`: `op` is `changed` (both sides have the path, values differ),
  `removed` (only `expected` has it) or `added` (only `received` has it); the missing side is `MISSING`.
- Objects are compared key by key, arrays index by index (an inserted element shows as the changes it
  causes plus one `added` at the end, which is what a reader of a prompt diff expects). Values of
  different JSON types are one `changed` at their path; no descent.
- `True`/`1` and `False`/`0` differ (JSON booleans are not numbers); `1` and `1.0` are equal.
- Paths: `messages[3].content`; a key that is not an identifier is quoted: `headers["x-api"]`; the root
  is `$` (or the `root` argument).
- `limit` caps the number of changes returned (the search stops there); `truncated(changes, limit)` tells.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["MISSING", "Change", "diff", "format_path", "join_key", "join_index", "preview"]


class _Missing:
    """The value on the side of a change where the path does not exist."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Change:
    """One difference: where, what kind, and the two values (`MISSING` on the side that lacks the path)."""

    path: str
    op: str  # "changed" | "added" | "removed"
    expected: Any
    received: Any

    def to_json(self, max_chars: int | None = None) -> dict[str, Any]:
        """A JSON-able dict; the missing side is omitted; values longer than `max_chars` are previewed."""
        out: dict[str, Any] = {"path": self.path, "op": self.op}
        if self.expected is not MISSING:
            out["expected"] = preview(self.expected, max_chars)
        if self.received is not MISSING:
            out["received"] = preview(self.received, max_chars)
        return out


def join_key(path: str, key: str) -> str:
    """`path.key`, or `path["key"]` when `key` is not an identifier; `key` alone at the root (`""`)."""
    if _IDENT.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def join_index(path: str, index: int) -> str:
    return f"{path}[{index}]"


def format_path(parts: list[str | int]) -> str:
    """A JSON path from its parts: keys (str) and array indexes (int)."""
    path = ""
    for part in parts:
        path = join_index(path, part) if isinstance(part, int) else join_key(path, part)
    return path


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def diff(expected: Any, received: Any, *, root: str = "", limit: int = 1000) -> list[Change]:
    """Every difference between `expected` and `received` (see module doc), at most `limit`."""
    out: list[Change] = []
    _walk(expected, received, root, out, limit)
    return out


def _walk(a: Any, b: Any, path: str, out: list[Change], limit: int) -> None:
    if len(out) >= limit:
        return
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        out.append(Change(path or "$", "changed", a, b))
        return
    if ka == "object":
        for key in sorted(set(a) | set(b), key=str):
            if len(out) >= limit:
                return
            sub = join_key(path, str(key))
            if key not in b:
                out.append(Change(sub, "removed", a[key], MISSING))
            elif key not in a:
                out.append(Change(sub, "added", MISSING, b[key]))
            else:
                _walk(a[key], b[key], sub, out, limit)
        return
    if ka == "array":
        for i in range(max(len(a), len(b))):
            if len(out) >= limit:
                return
            sub = join_index(path, i)
            if i >= len(b):
                out.append(Change(sub, "removed", a[i], MISSING))
            elif i >= len(a):
                out.append(Change(sub, "added", MISSING, b[i]))
            else:
                _walk(a[i], b[i], sub, out, limit)
        return
    if a != b:
        out.append(Change(path or "$", "changed", a, b))


def preview(value: Any, max_chars: int | None) -> Any:
    """`value` itself, or when its JSON text is longer than `max_chars`, a string cut to that length + `…`."""
    if max_chars is None:
        return value
    if isinstance(value, str):
        return value if len(value) <= max_chars else value[:max_chars] + "…"
    if isinstance(value, (dict, list)):
        text = json.dumps(value, ensure_ascii=False, sort_keys=True)
        return value if len(text) <= max_chars else text[:max_chars] + "…"
    return value
