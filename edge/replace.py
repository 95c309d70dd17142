"""A connect or join sent once more for placement when the worker it went to stays silent.

The broker places a CONNECT or JOIN on a worker heard from in the last ``PLACE_FRESH`` seconds
(broker/router.py), but one whose loop blocks right after it was chosen (a handler in
``time.sleep``, a CPU-bound call) answers only when the block ends, and one that dies never.
The edge does not learn where a request went until the answer comes, so it sends an
unanswered request again, unchanged (same request id, or same join_ref and ref: the client
sees nothing of it), and the broker places the copy on a worker that is still heard from.

The first answer wins (``ConnectRpc.on_reply`` and ``Connection.on_join_reply``): a later
connect answer finds its request gone, a later join ok is an orphan instance that is ended with
TERMINATE.  Pushes buffered and broadcasts held while joining wait on the ``ChannelRef`` and
are released once, by the first reply.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from zchannels.bus.timing import PLACEMENT_RETRY
from zchannels.edge.connection import JOINED
from zchannels.edge.ratelimit import TokenBucket

if TYPE_CHECKING:
    from zchannels.edge.connection import ChannelRef
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)

# Copies sent a second by one edge, at most (burst RETRY_BURST): when every worker is slow
# (overload, not one blocked loop) copies would only double the work.
RETRY_RATE = 100.0
RETRY_BURST = 200


class Replacer:
    """Sends the hub's unanswered connects and joins again; counts them in ``hub.stats``."""

    def __init__(self, hub: "EdgeHub"):
        self.hub = hub
        self.budget = TokenBucket(RETRY_RATE, RETRY_BURST, time.monotonic())

    def connect_sent(self, fut: asyncio.Future, frames: list[bytes]) -> asyncio.TimerHandle:
        """The CONNECT ``frames`` went out and ``fut`` waits for its answer: the timer (the
        caller cancels it when the answer came) that sends it again."""
        return asyncio.get_running_loop().call_later(PLACEMENT_RETRY, self._connect_again, fut, frames)

    def join_sent(self, ch: "ChannelRef", frames: list[bytes]) -> None:
        """The JOIN ``frames`` of ``ch`` went out: send it again if ``ch`` is still joining then
        (the hub calls ``stop`` when the channel is answered or dropped)."""
        ch.retry = asyncio.get_running_loop().call_later(PLACEMENT_RETRY, self._join_again, ch, frames)

    @staticmethod
    def stop(ch: "ChannelRef") -> None:
        if ch.retry is not None:
            ch.retry.cancel()
            ch.retry = None

    def _connect_again(self, fut: asyncio.Future, frames: list[bytes]) -> None:
        if not fut.done() and self._may():
            self._count("connect_retries", "a connect")
            self.hub.bus_send(frames)

    def _join_again(self, ch: "ChannelRef", frames: list[bytes]) -> None:
        ch.retry = None
        if ch.state == JOINED or ch.conn.channels.get(ch.topic) is not ch or not self._may():
            return
        self._count("join_retries", f"join of {ch.topic[:60]!r} by conn {ch.conn.label}")
        self.hub.bus_send(frames)

    def _may(self) -> bool:
        # Without the broker a copy would only queue behind the first one.
        return not self.hub.bus.broker_silent and self.budget.take(time.monotonic())

    def _count(self, stat: str, what: str) -> None:
        stats = self.hub.stats
        stats[stat] += 1
        n = stats[stat]
        if n <= 20 or n % 1000 == 0:
            log.info("%s had no answer in %.1fs (its worker's loop blocked?): sent again for "
                     "placement (%d %s so far)", what, PLACEMENT_RETRY, n, stat.replace("_", " "))
