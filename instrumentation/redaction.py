"""Secret removal, applied in the recording process before anything is hashed, exported or stored.

Contract:
- `drop_secret_headers` removes credential headers entirely (by name, case-insensitive).
- `redact_body` masks every match of the body patterns with a same-length mask, so byte offsets
  (stream chunk boundaries) and the JSON shape of the body are preserved. A masked key keeps its
  first four characters (`sk-a****…`), enough to tell which key family it was, never enough to use it.
- `redact_text` does the same for strings (URLs, error messages, tool arguments).
- `redact_encoded` does it for a compressed response body: inflated to be scanned, and stored decoded
  (identity) only when it held a secret.

Extra patterns come from `TRACETAPE_REDACT_PATTERNS` (a `;`-separated list of regular expressions). The
process's own tracetape key (`TRACETAPE_API_KEY`, 8 characters or more) is always masked too, wherever the
application might echo it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

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

@dataclass(frozen=True)
class Rule:
    """One secret shape: its regex, and literal needles at least one of which every match contains.

    Python's `re` scans quickly for a pattern that starts with a literal (`sk-`, `AKIA`), but tries every
    position for one that starts with a character class, about 10x slower. Such a pattern gets needles: a
    plain substring pre-check, and the regex runs only on text that contains one. No needles: the regex
    always runs (patterns are searched one by one; joined into one alternation none of them scans fast).
    """

    pattern: str
    needles: tuple[str, ...] = ()


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule(r"sk-[A-Za-z0-9_\-]{16,}"),  # OpenAI / Anthropic style keys (sk-..., sk-ant-..., sk-proj-...)
    Rule(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    Rule(r"AIza[0-9A-Za-z_\-]{35}"),  # Google API key
    Rule(r"gh[pousr]_[A-Za-z0-9]{36,}"),  # GitHub tokens
    Rule(r"xox[abprs]-[A-Za-z0-9\-]{10,}"),  # Slack tokens
    Rule(r"(?:[Bb]earer|BEARER)\s+[A-Za-z0-9._\-]{16,}", ("earer", "EARER")),  # bearer tokens pasted into bodies
)
DEFAULT_BODY_PATTERNS: tuple[str, ...] = tuple(r.pattern for r in DEFAULT_RULES)

_KEEP = 4


@dataclass(frozen=True)
class _Compiled:
    bytes_re: re.Pattern[bytes]
    text_re: re.Pattern[str]
    bytes_needles: tuple[bytes, ...]
    text_needles: tuple[str, ...]


def _compile(rules: Iterable[Rule]) -> tuple[_Compiled, ...]:
    return tuple(
        _Compiled(re.compile(r.pattern.encode()), re.compile(r.pattern),
                  tuple(n.encode() for n in r.needles), r.needles)
        for r in rules
    )


def _rules_from_env() -> tuple[Rule, ...]:
    extra = os.environ.get("TRACETAPE_REDACT_PATTERNS", "")
    rules = DEFAULT_RULES + tuple(Rule(p) for p in extra.split(";") if p)
    own_key = os.environ.get("TRACETAPE_API_KEY", "").strip()
    if len(own_key) >= 8:
        rules += (Rule(re.escape(own_key), (own_key,)),)
    return rules


_RULES = _compile(_rules_from_env())


def configure(patterns: Iterable[str | Rule]) -> None:
    """Replace the body rules (the defaults are not kept unless passed again); a plain string has no needles."""
    global _RULES
    _RULES = _compile(p if isinstance(p, Rule) else Rule(p) for p in patterns)


def _mask_bytes(match: re.Match[bytes]) -> bytes:
    s = match.group(0)
    return s[:_KEEP] + b"*" * (len(s) - _KEEP)


def _mask_text(match: re.Match[str]) -> str:
    s = match.group(0)
    return s[:_KEEP] + "*" * (len(s) - _KEEP)


def redact_body(body: bytes) -> bytes:
    """`body` with every secret masked, same length; the same object when nothing matched."""
    if not body:
        return body
    out = body
    for rule in _RULES:
        if rule.bytes_needles and not any(n in out for n in rule.bytes_needles):
            continue
        if rule.bytes_re.search(out) is not None:
            out = rule.bytes_re.sub(_mask_bytes, out)
    return out


def redact_text(text: str) -> str:
    """`text` with every secret masked, same length; the same object when nothing matched."""
    if not text:
        return text
    out = text
    for rule in _RULES:
        if rule.text_needles and not any(n in out for n in rule.text_needles):
            continue
        if rule.text_re.search(out) is not None:
            out = rule.text_re.sub(_mask_text, out)
    return out


MAX_INFLATE = 64 << 20
"""The most a compressed body is inflated to be scanned; a larger one is kept as it came."""


def redact_encoded(body: bytes, encoding: str) -> tuple[bytes, str]:
    """A content-encoded body (gzip, deflate, zstd) scanned for secrets: `(body, encoding)` unchanged when it
    holds none (the wire bytes are kept), else `(decoded body with secrets masked, "")`.

    A body in an encoding this cannot read (br), or inflating past `MAX_INFLATE`, is returned unchanged."""
    from tracetape.instrumentation import encodings

    try:
        decoded = encodings.decode(body, encoding, MAX_INFLATE)
    except encodings.EncodingError:  # br, corrupt, or too large to scan: kept as it came
        return body, encoding
    redacted = redact_body(decoded)
    return (body, encoding) if redacted is decoded else (redacted, "")


def drop_secret_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without credential headers, names lower-cased, values redacted."""
    return [
        (name.lower(), redact_text(value))
        for name, value in headers
        if name.lower() not in SECRET_HEADERS
    ]
