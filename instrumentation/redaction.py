"""Secret removal, applied in the recording process before anything is hashed, exported or stored.

Contract:
- `drop_secret_headers` removes credential headers entirely (by name, case-insensitive).
- `redact_body` masks every match of the body patterns with a same-length mask, so byte offsets
  (stream chunk boundaries) and the JSON shape of the body are preserved. A masked key keeps its
  first four characters (`sk-a****…`), enough to tell which key family it was, never enough to use it.
- `redact_text` does the same for strings (URLs, error messages, tool arguments).

Extra patterns come from `TRACETAPE_REDACT_PATTERNS` (a `;`-separated list of regular expressions).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

SECRET_HEADERS: frozenset[str] = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "cookie",
        "set-cookie",
        "x-amz-security-token",
        "openai-api-key",
    }
)
"""Header names that carry credentials; never stored, hashed or exported."""

DEFAULT_BODY_PATTERNS: tuple[str, ...] = (
    r"sk-[A-Za-z0-9_\-]{16,}",  # OpenAI / Anthropic style keys (sk-..., sk-ant-..., sk-proj-...)
    r"AKIA[0-9A-Z]{16}",  # AWS access key id
    r"AIza[0-9A-Za-z_\-]{35}",  # Google API key
    r"gh[pousr]_[A-Za-z0-9]{36,}",  # GitHub tokens
    r"xox[abprs]-[A-Za-z0-9\-]{10,}",  # Slack tokens
    r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._\-]{16,}",  # bearer tokens pasted into bodies
)

_KEEP = 4


def _compile(patterns: Iterable[str]) -> tuple[re.Pattern[bytes], re.Pattern[str]]:
    joined = "|".join(f"(?:{p})" for p in patterns)
    return re.compile(joined.encode()), re.compile(joined)


def _patterns_from_env() -> tuple[str, ...]:
    extra = os.environ.get("TRACETAPE_REDACT_PATTERNS", "")
    return DEFAULT_BODY_PATTERNS + tuple(p for p in extra.split(";") if p)


_BYTES_RE, _TEXT_RE = _compile(_patterns_from_env())


def configure(patterns: Iterable[str]) -> None:
    """Replace the body patterns (the defaults are not kept unless passed again)."""
    global _BYTES_RE, _TEXT_RE
    _BYTES_RE, _TEXT_RE = _compile(patterns)


def _mask_bytes(match: re.Match[bytes]) -> bytes:
    s = match.group(0)
    return s[:_KEEP] + b"*" * (len(s) - _KEEP)


def _mask_text(match: re.Match[str]) -> str:
    s = match.group(0)
    return s[:_KEEP] + "*" * (len(s) - _KEEP)


def redact_body(body: bytes) -> bytes:
    """`body` with every secret masked, same length; the same object when nothing matched."""
    if not body or _BYTES_RE.search(body) is None:
        return body
    return _BYTES_RE.sub(_mask_bytes, body)


def redact_text(text: str) -> str:
    """`text` with every secret masked, same length."""
    if not text or _TEXT_RE.search(text) is None:
        return text
    return _TEXT_RE.sub(_mask_text, text)


def drop_secret_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without credential headers, names lower-cased, values redacted."""
    return [
        (name.lower(), redact_text(value))
        for name, value in headers
        if name.lower() not in SECRET_HEADERS
    ]
