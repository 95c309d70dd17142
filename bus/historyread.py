"""Reading a topic's history from the broker: HISTORY_READ out, HISTORY chunks back.

Edges (recovery on join, edge/recovery.py) and workers (``Channel.history``) read through
this: one future per read, answer chunks put back together, a deadline so a lost answer (the
broker restarted meanwhile) ends as an error instead of a wait forever.
"""
from __future__ import annotations

import asyncio
import itertools
from typing import Callable, NamedTuple

from zchannels.bus import wire

READ_TIMEOUT = 5.0


class HistoryResult(NamedTuple):
    status: bytes                       # wire.HISTORY_OK / HISTORY_NONE / HISTORY_ERROR
    epoch: str
    first: int                          # the oldest offset still kept (head + 1 when none)
    head: int                           # the topic's last offset
    entries: list[tuple[int, bytes]]    # (offset, packed BROADCAST), in order


class HistoryUnavailable(Exception):
    """The broker did not answer a history read in time."""


class HistoryReads:
    def __init__(self, send: Callable[[list[bytes]], object], loop: asyncio.AbstractEventLoop,
                 timeout: float = READ_TIMEOUT):
        self.send = send
        self.loop = loop
        self.timeout = timeout
        self._ids = itertools.count(1)
        self.pending: dict[bytes, tuple[asyncio.Future, list[tuple[int, bytes]]]] = {}
        self.malformed = 0

    def read(self, topic: str, after: int | None, limit: int) -> asyncio.Future:
        """A future of the HistoryResult of the entries of ``topic`` after ``after`` (None:
        the last ``limit``); it fails with HistoryUnavailable after ``timeout``."""
        request_id = str(next(self._ids)).encode()
        future = self.loop.create_future()
        self.pending[request_id] = (future, [])
        self.send(wire.history_read(request_id, topic.encode(), after, limit))
        self.loop.call_later(self.timeout, self._expire, request_id)
        return future

    def _expire(self, request_id: bytes) -> None:
        item = self.pending.pop(request_id, None)
        if item is not None and not item[0].done():
            item[0].set_exception(HistoryUnavailable("the broker did not answer the history read"))

    def on_answer(self, a: wire.HistoryAnswer) -> None:
        """A HISTORY chunk from the broker; BusFrameError / ValueError if malformed."""
        item = self.pending.get(a.request_id)
        if item is None:
            return      # expired meanwhile
        future, entries = item
        entries.extend(wire.unpack_history_entries(a.entries))
        if a.more:
            return
        del self.pending[a.request_id]
        if not future.done():
            future.set_result(HistoryResult(a.status, a.epoch.decode(), int(a.first), int(a.head),
                                            entries))
