"""`redaction` finds secrets from anchors (memchr-speed `find` of one character, then the regex only where a match
could start) instead of searching every pattern over the whole text. That must never change what is masked:
these tests compare it with the previous implementation (every rule searched in order, with its needles as a
pre-check, then substituted) on generated texts with secrets and near-misses at random places, long enough to
take the anchored path and dense enough in anchor characters to take every fallback."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracetape.instrumentation import redaction

# --- the previous implementation, verbatim in behaviour: the reference ---------------------------------------


def _reference(rules: tuple[redaction.Rule, ...], data: bytes | str) -> bytes | str:
    """Each rule in order: skipped when none of its needles is in the text, else searched, and substituted
    when found (a new object only then)."""
    if not data:
        return data
    out = data
    for rule in rules:
        if isinstance(data, bytes):
            regex: re.Pattern = re.compile(rule.pattern.encode())
            needles: tuple = tuple(n.encode() for n in rule.needles)
            star: bytes | str = b"*"
        else:
            regex, needles, star = re.compile(rule.pattern), rule.needles, "*"
        if needles and not any(n in out for n in needles):
            continue
        if regex.search(out) is not None:
            out = regex.sub(lambda m: m.group(0)[:4] + star * (len(m.group(0)) - 4), out)  # type: ignore[operator]
    return out


@contextmanager
def rules(new: tuple[redaction.Rule, ...]) -> Iterator[None]:
    saved = redaction._RULES
    redaction.configure(new)
    try:
        yield
    finally:
        redaction._RULES = saved


OWN_KEY = "tt_live_Q7xK2pZ9"
RULE_SETS: dict[str, tuple[redaction.Rule, ...]] = {
    "default": redaction.DEFAULT_RULES,
    "default+own key+extra": redaction.DEFAULT_RULES
    + (redaction.Rule(r"internal-[0-9]{6}"),  # an extra pattern from TRACETAPE_REDACT_PATTERNS: no hints
       redaction.Rule(re.escape(OWN_KEY), (OWN_KEY,), ((OWN_KEY, 0),))),  # as `_rules_from_env` builds it
    "masks-visible": (redaction.Rule(r"\*{3,}x"),) + redaction.DEFAULT_RULES + (redaction.Rule(r"k\*+"),),
}

# --- generated texts ---------------------------------------------------------------------------------------------

SECRETS = st.one_of(
    st.from_regex(r"sk-[A-Za-z0-9_\-]{16,24}", fullmatch=True),
    st.from_regex(r"sk-ant-[A-Za-z0-9]{20}", fullmatch=True),
    st.from_regex(r"AKIA[0-9A-Z]{16}", fullmatch=True),
    st.from_regex(r"AIza[0-9A-Za-z_\-]{35}", fullmatch=True),
    st.from_regex(r"gh[pousr]_[A-Za-z0-9]{36,40}", fullmatch=True),
    st.from_regex(r"xox[abprs]-[A-Za-z0-9\-]{10,16}", fullmatch=True),
    st.from_regex(r"(?:[Bb]earer|BEARER)[ \t\n]{1,2}[A-Za-z0-9._\-]{16,20}", fullmatch=True),
    st.just(OWN_KEY),
    st.from_regex(r"internal-[0-9]{6}", fullmatch=True),
)
NEAR_MISSES = st.sampled_from([
    "sk-", "sk-short", "sk", "s", "k-", "-", "--", "AKIA", "AKIAshort", "AIza", "AIz", "K", "z", "gh", "ghp", "ghp_",
    "gh_", "_", "__", "snake_case", "xox", "xoxb", "xoxq-abcdefghijkl", "x", "bearer", "Bearer ", "BEARER ", "earer",
    "EARER", "bearer short", "R", "tt_live_", "tt_live_Q7xK2p", "internal-12", "***", "****x", "k**", "é", "\n",
    "lorem ipsum ", "through the night ", '{"role":"user","content":"', '"}', "\\n", "0123456789",
])
FILLER = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABKIRz0123456789 -_.:\"{}\n", max_size=40)
PIECES = st.one_of(SECRETS, NEAR_MISSES, NEAR_MISSES, FILLER, FILLER)


@st.composite
def texts(draw: st.DrawFn) -> str:
    """A text of generated pieces, often repeated past the anchored threshold (and past the density checks)."""
    pieces = draw(st.lists(PIECES, max_size=30))
    text = "".join(pieces)
    repeat = draw(st.sampled_from([1, 1, 8, 64, 400]))
    text *= repeat
    if draw(st.booleans()):  # a secret at a random place in a long text
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(SECRETS) + text[at:]
    return text


def check(rule_set: str, text: str) -> None:
    with rules(RULE_SETS[rule_set]):
        for data in (text, text.encode()):
            expected = _reference(RULE_SETS[rule_set], data)
            got = redaction.redact_text(data) if isinstance(data, str) else redaction.redact_body(data)
            assert got == expected
            assert (got is data) == (expected is data)  # unchanged input comes back as the same object


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(rule_set=st.sampled_from(sorted(RULE_SETS)), text=texts())
def test_same_result_as_the_previous_implementation(rule_set: str, text: str) -> None:
    check(rule_set, text)


@pytest.mark.parametrize("rule_set", sorted(RULE_SETS))
@pytest.mark.parametrize("near_miss", ["-", "_", "x", "K", "z", "R", "sk-", "xox", "bearer ", "Bearer\t", "ghp_",
                                       "AKIA", "AIza", "EARER ", "tt_live_", "internal-1"])
@pytest.mark.parametrize("where", ["start", "middle", "end", "none"])
def test_dense_near_misses_fall_back_without_missing_a_secret(rule_set: str, near_miss: str, where: str) -> None:
    """A long text full of one anchor's near-misses (past every density switch) with one secret of each kind."""
    filler = ("lorem " + near_miss + " ipsum ") * 3000
    secrets = ["sk-ABCDEFGHIJKLMNOPqrst", "AKIAABCDEFGHIJKLMNOP", "AIza" + "B" * 35, "ghp_" + "c" * 36,
               "xoxb-1234567890", "Bearer abcdefghijklmnopq", "BEARER abcdefghijklmnopq", OWN_KEY, "internal-123456"]
    for secret in secrets:
        at = {"start": 0, "middle": len(filler) // 2, "end": len(filler), "none": -1}[where]
        text = filler if at < 0 else filler[:at] + secret + filler[at:]
        check(rule_set, text)


@pytest.mark.parametrize("rule", redaction.DEFAULT_RULES, ids=lambda r: r.pattern[:12])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_anchors_hold_for_every_match_of_the_default_rules(rule: redaction.Rule, data: st.DataObject) -> None:
    """Each anchor is a literal at a fixed offset from the start of every match, and every match of a rule with
    needles contains one: checked on generated matches of each pattern."""
    match = data.draw(st.from_regex(rule.pattern, fullmatch=True))
    assert any(match[offset:offset + len(lit)] == lit for lit, offset in rule.anchors)
    assert not rule.needles or any(n in match for n in rule.needles)


def test_pivots_are_rare_characters() -> None:
    """The anchors are found through their rarest character when it is rare enough (memchr-speed `find`)."""
    compiled = redaction._compile(redaction.DEFAULT_RULES)
    pivots = {rule.rule.pattern: [a.pivot for a in rule.bytes_scan.anchors] for rule in compiled}
    assert pivots[r"sk-[A-Za-z0-9_\-]{16,}"] == [b"-"]
    assert pivots[r"AKIA[0-9A-Z]{16}"] == [b"K"]
    assert pivots[r"AIza[0-9A-Za-z_\-]{35}"] == [b"z"]
    assert pivots[r"(?:[Bb]earer|BEARER)\s+[A-Za-z0-9._\-]{16,}"] == [None, b"R"]  # "earer": all common letters


def test_no_secret_no_copy_and_secrets_masked_in_a_megabyte() -> None:
    body = b'{"messages":[{"role":"user","content":"' + b"lorem ipsum dolor sit amet " * 40000 + b'"}]}'
    assert redaction.redact_body(body) is body
    leaked = body[:500_000] + b"sk-proj-ABCDEFGHIJKLMNOPQRSTUV" + body[500_000:]
    red = redaction.redact_body(leaked)
    assert len(red) == len(leaked) and b"ABCDEFGHIJ" not in red and b"sk-p" + b"*" * 25 in red


def test_current_rules_hand_over_every_hint() -> None:
    """What another process needs to redact exactly (and as fast) as this one: the rules with their hints."""
    with rules(RULE_SETS["default+own key+extra"]):
        handed = redaction.current_rules()
        assert handed == RULE_SETS["default+own key+extra"]
        redaction.configure(handed)
        assert redaction.current_rules() == handed
