"""The default history store: each topic's last broadcasts in a deque, in this process.

Nothing survives the broker: each start has a new epoch, so a client that recovers across a
restart is told "epoch changed".  Trimmed to the topic's rule on every append and every read,
and every few seconds for topics nobody touches (``expire``).  A topic's last offset is kept
after its entries expired, so offsets never repeat within an epoch.
"""
from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Sequence

from zchannels.broker.history.store import Rule, new_epoch

Entry = tuple[int, float, bytes]   # (offset, unix time, packed BROADCAST)


class MemoryStore:
    def __init__(self) -> None:
        self.epoch = ""
        self.topics: dict[str, deque[Entry]] = {}
        self.heads: dict[str, int] = {}
        self.rules: dict[str, Rule] = {}     # each topic's rule, for expire
        self.bytes = 0                       # payload bytes held (packed broadcasts)

    async def open(self) -> str:
        self.epoch = new_epoch()
        return self.epoch

    async def last_offset(self, topic: str) -> int:
        return self.heads.get(topic, 0)

    async def append(self, topic: str, rule: Rule, items: Sequence[Entry]) -> None:
        entries = self.topics.get(topic)
        if entries is None:
            entries = self.topics[topic] = deque()
        for item in items:
            entries.append(item)
            self.bytes += len(item[2])
        if items:
            self.heads[topic] = items[-1][0]
            self.rules[topic] = rule
            self._trim(topic, entries, rule, items[-1][1])

    async def read(self, topic: str, after: int, rule: Rule, now: float,
                   limit: int) -> tuple[int, list[tuple[int, bytes]]]:
        entries = self.topics.get(topic)
        head = self.heads.get(topic, 0)
        if entries is not None:
            self._trim(topic, entries, rule, now)
        if not entries:
            return head + 1, []
        first = entries[0][0]
        start = max(0, after + 1 - first)   # offsets are contiguous within a topic's deque
        return first, [(offset, data) for offset, _t, data in islice(entries, start, start + limit)]

    def _trim(self, topic: str, entries: deque[Entry], rule: Rule, now: float) -> None:
        oldest = now - rule.seconds
        while entries and (len(entries) > rule.keep or entries[0][1] < oldest):
            self.bytes -= len(entries.popleft()[2])
        if not entries:
            del self.topics[topic]

    def expire(self, now: float) -> None:
        """Drop what fell out of the window on topics nobody wrote to or read since."""
        for topic in list(self.topics):
            self._trim(topic, self.topics[topic], self.rules[topic], now)

    async def close(self) -> None:
        self.topics.clear()
