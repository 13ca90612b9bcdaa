"""Secret removal, applied in the recording process before anything is hashed, exported or stored.

Contract:
- `drop_secret_headers` removes credential headers entirely, by name (`is_secret_header`): the known ones
  (`SECRET_HEADERS`) and any whose last word is `key`, `token`, `secret`, `password`, `signature`,
  `credential(s)` or `auth` (`x-rapidapi-key`, `private-token`, `ocp-apim-subscription-key`), except the
  few such names that never carry one (`idempotency-key`, `sec-websocket-key`).
- A query parameter (or any `name=value` in a text) whose name says it is a credential (`is_secret_param`:
  `key`, `api_key`, `access_token`, `token`, `client_secret`, `password`, `sig`, `x-amz-signature`, …)
  has its whole value masked, whatever it looks like: in texts by `redact_text`, in the envelope's query by
  `contract.canonical_query` (as one fixed mask, so the hash never depends on the credential).
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
from typing import Any, NamedTuple

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
"""Header names that carry credentials; never stored, hashed or exported. Others are by their last word:
`is_secret_header`."""

_SECRET_HEADER_NAME = re.compile(r"(?:.*[-_])?(?:api[-_]?key|apikey|key|token|secret|password|passwd|signature"
                                 r"|credentials?|auth)")
_NOT_SECRET_HEADERS = frozenset({"idempotency-key", "sec-websocket-key", "sec-websocket-accept"})
_header_verdicts: dict[str, bool] = {}

_SECRET_PARAM_NAMES = (r"(?:x[-_]amz[-_](?:signature|credential|security[-_]token)|x[-_]goog[-_](?:signature|credential)"
                       r"|(?:x[-_])?api[-_]?key|apikey|(?:access|auth|id|refresh|private|session)[-_]?token|token"
                       r"|key|auth|(?:client[-_]?)?secret|password|passwd|pwd|sig|signature|subscription[-_]?key)")
_SECRET_PARAM_NAME = re.compile(_SECRET_PARAM_NAMES, re.IGNORECASE)
_SECRET_PARAM = re.compile(r"(?:(?<![\w.\-])|(?<=--))(" + _SECRET_PARAM_NAMES + r")=([^&#\s\"'<>]+)",
                           re.IGNORECASE)  # a name on its own (`?key=`, `&sig=`, `--password=`), not `monkey=`


def is_secret_header(name: str) -> bool:
    """Whether a header (its name lower-case) carries a credential (see module doc)."""
    verdict = _header_verdicts.get(name)
    if verdict is None:
        verdict = name in SECRET_HEADERS or (
            _SECRET_HEADER_NAME.fullmatch(name) is not None and name not in _NOT_SECRET_HEADERS)
        if len(_header_verdicts) < 4096:  # names repeat; a client sending arbitrary ones costs no memory
            _header_verdicts[name] = verdict
    return verdict


def is_secret_param(name: str) -> bool:
    """Whether a query parameter's name says its value is a credential (see module doc)."""
    return _SECRET_PARAM_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class Rule:
    """One secret shape: its regex, and optional hints that make "does it match anywhere?" cheap to answer.

    Hints never change what is masked, only how fast a text without secrets is passed over. They must hold for
    every match of `pattern` (else matches may be missed):
    - `anchors`: `(literal, offset)` pairs such that every match has, for at least one pair, `literal` at
      `offset` from the match's start. A literal is found with `find` of its rarest character alone when that
      one is rare (memchr speed: ~30x faster than `re`'s literal scan or any multi-character `find` in
      CPython, ~0.7 ms per MB), and with `find` of the whole literal in a text where the character turns out
      common; the regex is only tried where a match could start (`match` there). Used from `_ANCHORED_FROM`
      characters on. When near-misses turn out dense, a rule without needles hands over to `re`'s own search,
      so a text full of near-misses costs about what a plain search does.
    - `needles`: literal substrings at least one of which every match contains; a plain search runs the
      regex only on text containing one. A rule with needles is taken to be slow for `re` to search (it
      starts with a character class, scanned ~10x slower than a literal): all its anchor candidates are tried.
    No hints: the regex always runs. Patterns are searched one by one; joined into one alternation none of
    them scans fast.
    """

    pattern: str
    needles: tuple[str, ...] = ()
    anchors: tuple[tuple[str, int], ...] = ()


DEFAULT_RULES: tuple[Rule, ...] = (
    # OpenAI / Anthropic style keys (sk-..., sk-ant-..., sk-proj-...)
    Rule(r"sk-[A-Za-z0-9_\-]{16,}", anchors=(("sk-", 0),)),
    Rule(r"AKIA[0-9A-Z]{16}", anchors=(("AKIA", 0),)),  # AWS access key id
    Rule(r"AIza[0-9A-Za-z_\-]{35}", anchors=(("AIza", 0),)),  # Google API key
    Rule(r"gh[pousr]_[A-Za-z0-9]{36,}", anchors=(("_", 3),)),  # GitHub tokens
    Rule(r"xox[abprs]-[A-Za-z0-9\-]{10,}", anchors=(("xox", 0),)),  # Slack tokens
    # bearer tokens pasted into bodies
    Rule(r"(?:[Bb]earer|BEARER)\s+[A-Za-z0-9._\-]{16,}", needles=("earer", "EARER"),
         anchors=(("earer", 1), ("EARER", 1))),
)
DEFAULT_BODY_PATTERNS: tuple[str, ...] = tuple(r.pattern for r in DEFAULT_RULES)

_KEEP = 4

_ANCHORED_FROM = 2048
"""Texts shorter than this are searched the plain way (needles, regex): setting up the anchors costs more."""
_DENSE = 9
"""An anchor is "dense" in a text when it has more than one miss per 2**_DENSE characters scanned; checked every
32 misses. A dense pivot character gives way to `find` of the whole literal; dense near-misses of a rule that
`re` scans fast (one without needles) give way to its regex."""

_BY_FREQUENCY = " etaoinsrhldcu\"m:,fpgwyb.vk0_-1T2IS/ACE3M=P4RD5BN6L7F8H9OW()G{}[]xU;jV'qYK\\zJXQZ"
"""Characters roughly from most to least frequent in JSON bodies of prose and code; unlisted ones are rarer."""
_RARE_FROM = _BY_FREQUENCY.index("k")
"""A multi-character literal whose rarest character ranks before this is found with `find` of the literal."""


class _Anchor(NamedTuple):
    literal: Any  # bytes or str
    offset: int
    pivot: Any  # the literal's rarest character (found at memchr speed), or None: `find` the whole literal
    pivot_at: int


class _Scan(NamedTuple):
    """One rule on one side (bytes or str), in the form the scanning functions use."""

    regex: re.Pattern[Any]
    needles: tuple[Any, ...]
    anchors: tuple[_Anchor, ...]


@dataclass(frozen=True)
class _Compiled:
    rule: Rule
    bytes_scan: _Scan
    text_scan: _Scan


def _pivot(literal: str) -> int:
    """Index of the literal's rarest character by `_BY_FREQUENCY`, or -1 when all of them are common."""
    rank = [_BY_FREQUENCY.find(c) % (len(_BY_FREQUENCY) + 1) for c in literal]  # unlisted (-1): the rarest
    best = max(range(len(literal)), key=rank.__getitem__)
    return best if len(literal) == 1 or rank[best] >= _RARE_FROM else -1


def _anchor(literal: str, offset: int, encode: bool) -> _Anchor:
    at = _pivot(literal) if (literal.isascii() or not encode) else -1  # a UTF-8 pivot would be one byte of many
    lit: Any = literal.encode() if encode else literal
    return _Anchor(lit, offset, None if at < 0 else lit[at:at + 1], at)


def _compile(rules: Iterable[Rule]) -> tuple[_Compiled, ...]:
    out = []
    for r in rules:
        bytes_scan = _Scan(re.compile(r.pattern.encode()), tuple(n.encode() for n in r.needles),
                           tuple(_anchor(lit, at, True) for lit, at in r.anchors))
        text_scan = _Scan(re.compile(r.pattern), r.needles, tuple(_anchor(lit, at, False) for lit, at in r.anchors))
        out.append(_Compiled(r, bytes_scan, text_scan))
    return tuple(out)


def _rules_from_env() -> tuple[Rule, ...]:
    extra = os.environ.get("TRACETAPE_REDACT_PATTERNS", "")
    rules = DEFAULT_RULES + tuple(Rule(p) for p in extra.split(";") if p)
    own_key = os.environ.get("TRACETAPE_API_KEY", "").strip()
    if len(own_key) >= 8:
        rules += (Rule(re.escape(own_key), (own_key,), ((own_key, 0),)),)
    return rules


_RULES = _compile(_rules_from_env())


def current_rules() -> tuple[Rule, ...]:
    """The rules in force, hints included (to hand to another process, which passes them to `configure`)."""
    return tuple(c.rule for c in _RULES)


def configure(patterns: Iterable[str | Rule]) -> None:
    """Replace the body rules (the defaults are not kept unless passed again); a plain string has no hints."""
    global _RULES
    _RULES = _compile(p if isinstance(p, Rule) else Rule(p) for p in patterns)


def _mask_bytes(match: re.Match[bytes]) -> bytes:
    s = match.group(0)
    return s[:_KEEP] + b"*" * (len(s) - _KEEP)


def _mask_text(match: re.Match[str]) -> str:
    s = match.group(0)
    return s[:_KEEP] + "*" * (len(s) - _KEEP)


def _anchored(scan: _Scan, anchor: _Anchor, data: Any) -> bool | None:
    """Whether `scan.regex` matches at a start that `anchor` allows; None: near-misses are dense, the caller
    must search `data` with the regex instead (only for a rule without needles)."""
    literal, offset, pivot, pivot_at = anchor
    match, find = scan.regex.match, data.find
    check = pivot is not None and len(literal) > 1
    misses = near = 0
    at = offset - 1  # the literal must start at `offset` or later for the match to start at 0 or later
    while True:
        if pivot is None:
            at = find(literal, at + 1)
            if at < 0:
                return False
        else:
            at = find(pivot, at + 1 + pivot_at)
            if at < 0:
                return False
            at -= pivot_at
            if check and not data.startswith(literal, at):
                misses += 1
                if not misses & 31 and misses << _DENSE > at:
                    pivot = None  # the pivot is common in this text: `find` the whole literal from here on
                continue
        if match(data, at - offset) is not None:
            return True
        near += 1
        if not near & 31 and near << _DENSE > at and not scan.needles:
            return None


def _matches_anchored(scan: _Scan, data: Any) -> bool:
    """Exactly `scan.regex.search(data) is not None` for a rule with anchors, given hints that hold."""
    for anchor in scan.anchors:
        found = _anchored(scan, anchor, data)
        if found is None:
            return scan.regex.search(data) is not None
        if found:
            return True
    return False


def redact_body(body: bytes) -> bytes:
    """`body` with every secret masked, same length; the same object when nothing matched.

    The rules apply in order, each to the previous one's output, and a rule substitutes only where it matches:
    a body without secrets is scanned, never copied."""
    return _redact(body, [rule.bytes_scan for rule in _RULES], _mask_bytes) if body else body


def redact_text(text: str) -> str:
    """`text` with every secret masked, same length: the rules' shapes, and the value of every `name=value`
    whose name is a credential's (`is_secret_param`); the same object when nothing matched (as `redact_body`)."""
    if not text:
        return text
    out = _redact(text, [rule.text_scan for rule in _RULES], _mask_text)
    if "=" in out:
        out = _SECRET_PARAM.sub(_mask_param, out)
    return out


def _mask_param(m: re.Match[str]) -> str:
    return f"{m.group(1)}={'*' * len(m.group(2))}"


def _redact(value: Any, scans: list[_Scan], mask: Any) -> Any:
    """`value` (bytes or str) with each scan's rule applied in order; the same object when nothing matched."""
    out = value
    anchored = len(value) >= _ANCHORED_FROM
    for scan in scans:
        if anchored and scan.anchors:
            if not _matches_anchored(scan, out):
                continue
        else:
            if scan.needles and not any(n in out for n in scan.needles):
                continue
            if scan.regex.search(out) is None:
                continue
        out = scan.regex.sub(mask, out)
    return out


MAX_INFLATE = 64 << 20
"""The most a compressed body is inflated to be scanned; a larger one is kept as it came."""


def redact_encoded(body: bytes, encoding: str) -> tuple[bytes, str]:
    """A content-encoded body (gzip, deflate, zstd) scanned for secrets: `(body, encoding)` unchanged when it
    holds none (the wire bytes are kept), else `(decoded body with secrets masked, "")`.

    A truncated or corrupt stream (a response read only in part) is scanned as far as it decodes, and when
    that part holds a secret it is what is stored, decoded and masked. A body in an encoding this cannot read
    (br), or inflating past `MAX_INFLATE`, is returned unchanged."""
    from tracetape.instrumentation import encodings

    try:
        decoded = encodings.decode(body, encoding, MAX_INFLATE)
    except encodings.CorruptEncoding:
        try:
            decoded = encodings.decode(body, encoding, MAX_INFLATE, partial=True)
        except encodings.EncodingError:
            return body, encoding
    except encodings.EncodingError:  # br, or too large to scan: kept as it came
        return body, encoding
    redacted = redact_body(decoded)
    return (body, encoding) if redacted is decoded else (redacted, "")


def without_userinfo(url: str) -> str:
    """`url` for a message: a `user:password@` before the host becomes `***@` (even when unparseable)."""
    return _USERINFO.sub(lambda m: f"{m.group(1) or ''}***@", url.strip())


_USERINFO = re.compile(r"^([^/?#@]*//)?[^/?#]*@")


def drop_secret_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers without credential headers, names lower-cased, values redacted."""
    return [
        (name.lower(), redact_text(value))
        for name, value in headers
        if not is_secret_header(name.lower())
    ]
