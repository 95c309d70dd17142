"""History on the bus: the rules ``room:*=1000/300`` deciding which topics keep it, the table
the broker announces, and positions ``"<epoch>:<offset>"``.

A rule is an exact topic or a prefix ending in ``*`` (like channel routes) with how many
broadcasts to keep and for how many seconds.  The first matching rule of a table wins; the
broker's table lists the operator's rules before the apps'.  It lives in the bus because every
publisher (workers, edges, ``zchannels.Publisher``) matches topics against the table the broker
announces, and the broker parses the operator's flags with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import orjson

__all__ = ["Rule", "parse_rule", "match", "merge", "pack_rules", "unpack_rules", "RuleTable",
           "format_position", "parse_position"]

# Topics of zchannels itself never keep history (their publishers bypass the sequencer).
_SYSTEM_PREFIX = "zchannels:"
MAX_KEEP = 1_000_000
MAX_SECONDS = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Rule:
    """Keep the last ``keep`` broadcasts of each topic matching ``pattern``, none older than
    ``seconds``."""
    pattern: str
    keep: int
    seconds: float

    def __post_init__(self):
        check_rule(self.pattern, self.keep, self.seconds)
        object.__setattr__(self, "seconds", float(self.seconds))

    def matches(self, topic: str) -> bool:
        if self.pattern.endswith("*"):
            return topic.startswith(self.pattern[:-1])
        return topic == self.pattern

    def __str__(self) -> str:
        seconds = int(self.seconds) if self.seconds == int(self.seconds) else self.seconds
        return f"{self.pattern}={self.keep}/{seconds}"


def check_rule(pattern, keep, seconds) -> None:
    """ValueError naming the mistake in a rule's fields."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a history pattern must be a non-empty string, got {pattern!r}")
    if "*" in pattern[:-1]:
        raise ValueError(f"history pattern {pattern!r}: '*' is allowed only once, as the last "
                         "character (\"room:*\")")
    if pattern.startswith(_SYSTEM_PREFIX) or _SYSTEM_PREFIX.startswith(pattern.rstrip("*")):
        raise ValueError(f"history pattern {pattern!r} covers the reserved {_SYSTEM_PREFIX!r} topics")
    if type(keep) is not int or not 1 <= keep <= MAX_KEEP:
        raise ValueError(f"history pattern {pattern!r}: keep must be an integer from 1 to "
                         f"{MAX_KEEP}, got {keep!r}")
    if type(seconds) not in (int, float) or not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"history pattern {pattern!r}: seconds must be a number above 0 and at "
                         f"most {MAX_SECONDS:.0f}, got {seconds!r}")


def parse_rule(text: str) -> Rule:
    """``"room:*=1000/300"`` -> Rule("room:*", 1000, 300.0); ValueError naming the mistake."""
    pattern, eq, sizes = str(text).strip().rpartition("=")
    keep, slash, seconds = sizes.partition("/")
    if not eq or not slash:
        raise ValueError(f"a history rule looks like 'room:*=1000/300' (pattern=keep/seconds), "
                         f"got {text!r}")
    try:
        keep_n, seconds_n = int(keep), float(seconds)
    except ValueError:
        raise ValueError(f"history rule {text!r}: keep must be an integer and seconds a number") from None
    return Rule(pattern, keep_n, seconds_n)


def match(rules: Sequence[Rule], topic: str) -> Rule | None:
    """The first rule of ``rules`` matching ``topic``, or None."""
    for rule in rules:
        if rule.matches(topic):
            return rule
    return None


def merge(*tables: Iterable[Rule]) -> tuple[Rule, ...]:
    """The tables one after the other (operator first), each pattern kept at its first place."""
    seen, out = set(), []
    for table in tables:
        for rule in table:
            if rule.pattern not in seen:
                seen.add(rule.pattern)
                out.append(rule)
    return tuple(out)


def pack_rules(rules: Sequence[Rule]) -> bytes:
    """The table as it travels on the bus: JSON ``[[pattern, keep, seconds], ...]``."""
    return orjson.dumps([[r.pattern, r.keep, r.seconds] for r in rules])


def unpack_rules(data: bytes) -> tuple[Rule, ...]:
    """Inverse of pack_rules; ValueError for anything else."""
    try:
        items = orjson.loads(data)
        return tuple(Rule(p, k, float(s)) for p, k, s in items)
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed history rule table: {exc}") from None


class RuleTable:
    """A table as a publisher knows it: ``known`` is False until the broker announced one
    (until then every broadcast goes to the sequencer, which passes non-history topics
    through).  ``has_history(topic)`` memoises per topic, bounded."""
    __slots__ = ("rules", "known", "_cache")
    _CACHE_MAX = 10_000

    def __init__(self, rules: Sequence[Rule] | None = None):
        self.rules: tuple[Rule, ...] = tuple(rules or ())
        self.known = rules is not None
        self._cache: dict[str, bool] = {}

    def update(self, rules: Sequence[Rule]) -> bool:
        """Install an announced table; True when it differs from the one known."""
        rules = tuple(rules)
        changed = not self.known or rules != self.rules
        if changed:
            self.rules, self.known = rules, True
            self._cache.clear()
        return changed

    def rule(self, topic: str) -> Rule | None:
        return match(self.rules, topic)

    def needs_sequencer(self, topic: str) -> bool:
        """Whether a broadcast on ``topic`` must go through the sequencer."""
        if not self.known:
            return not topic.startswith(_SYSTEM_PREFIX)
        if not self.rules:
            return False
        hit = self._cache.get(topic)
        if hit is None:
            hit = match(self.rules, topic) is not None
            if len(self._cache) >= self._CACHE_MAX:
                self._cache.clear()
            self._cache[topic] = hit
        return hit


def format_position(epoch: str, offset: int) -> str:
    return f"{epoch}:{offset}"


def parse_position(text) -> tuple[str, int] | None:
    """``"<epoch>:<offset>"`` -> (epoch, offset); None when malformed."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    epoch, colon, offset = text.partition(":")
    if not colon or not epoch or not offset.isdigit() or not offset.isascii() or len(offset) > 18:
        return None
    return epoch, int(offset)
