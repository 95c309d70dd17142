"""The history store interface, and the rules deciding which topics keep history.

The broker's sequencer (broker/sequencer.py) is the one writer: it appends each sequenced
broadcast of a history topic, and answers the edges' and workers' reads from here.  A store
keeps, per topic, ``(offset, unix time, packed BROADCAST)`` entries in offset order, trimmed to
the topic's rule (``keep`` entries, none older than ``seconds``).  Implementations:
broker/history/memory.py (default) and broker/history/redisstore.py (``redis://``).

``Rule`` and its parser live in bus/history.py (every publisher matches topics against
the announced table); they are re-exported here for the stores.
"""
from __future__ import annotations

import secrets
from typing import Protocol, Sequence

from zchannels.bus.history import Rule, format_position, match, merge, parse_position, parse_rule

__all__ = ["Rule", "Store", "parse_rule", "match", "merge", "new_epoch", "format_position",
           "parse_position"]

EPOCH_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
EPOCH_LENGTH = 8


class Store(Protocol):
    async def open(self) -> str:
        """Connect; return the epoch (a new one for a store that kept nothing)."""

    async def last_offset(self, topic: str) -> int:
        """The last offset stored for ``topic`` in this epoch, 0 when none (the sequencer
        asks once per topic after start)."""

    async def append(self, topic: str, rule: Rule,
                     items: Sequence[tuple[int, float, bytes]]) -> None:
        """Store ``(offset, unix time, packed BROADCAST message with its position)`` entries,
        in offset order, then trim to ``rule.keep`` / ``rule.seconds``."""

    async def read(self, topic: str, after: int, rule: Rule, now: float,
                   limit: int) -> tuple[int, list[tuple[int, bytes]]]:
        """(oldest offset still kept -- last + 1 when empty --, the entries with offset >
        ``after`` still inside the window at ``now``, in order, at most ``limit``)."""

    async def close(self) -> None:
        """Release connections; the store is not used afterwards."""


def new_epoch() -> str:
    """A short random epoch token: 8 characters of [a-z0-9]."""
    return "".join(secrets.choice(EPOCH_ALPHABET) for _ in range(EPOCH_LENGTH))

