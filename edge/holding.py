"""Messages that wait for a pending join, so that replies keep the order of their messages.

Phoenix's socket process runs a join to its reply before it reads the next message
(Phoenix.Socket.__in__ -> Phoenix.Channel.Server.join/4 blocks in ``receive``).  The edge
sends joins to workers and answers much by itself (heartbeats, unmatched topics, rate limits),
so a ``Connection`` whose join is pending (``conn.awaiting``) holds what it reads next, in
order, and handles it once the join's reply is written (``Connection.release``).  At most
``MAX_HELD`` messages wait, each batch at most ``MAX_HOLD_SECONDS``: a join is answered (ok,
error, or "no worker available") within a few seconds, and a client pipelining more than this
behind one join is not waiting for it.  Past either bound they go on without it, counted in
``stats["order_given_up"]``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zchannels.edge.connection import Connection
    from zchannels.edge.serializer import Message

log = logging.getLogger(__name__)

MAX_HELD = 256
MAX_HOLD_SECONDS = 5.0


class HeldMessages:
    """The messages one connection read while its join was pending, in order, and the timer
    that bounds their wait."""
    __slots__ = ("conn", "messages", "timer")

    def __init__(self, conn: "Connection"):
        self.conn = conn
        self.messages: deque["Message"] = deque()
        self.timer = asyncio.get_running_loop().call_later(MAX_HOLD_SECONDS, self.give_up)

    def release(self) -> None:
        """The awaited join is answered: handle what waited for it, in order, until one of
        those is a join that is pending in turn."""
        conn = self.conn
        conn.held = None
        self.timer.cancel()
        messages = self.messages
        while messages and not conn.closed:
            conn.dispatch(messages.popleft(), time.monotonic())
            if conn.awaiting is not None and messages:   # the rest waits for that join
                self.timer = asyncio.get_running_loop().call_later(MAX_HOLD_SECONDS, self.give_up)
                conn.held = self
                return

    def give_up(self) -> None:
        """MAX_HOLD_SECONDS passed and the awaited join is still unanswered."""
        order_given_up(self.conn, f"it is unanswered after {MAX_HOLD_SECONDS:g}s")
        self.conn.release()

    def cancel(self) -> None:
        self.timer.cancel()


def hold(conn: "Connection", msg: "Message") -> None:
    """``msg`` arrived while ``conn.awaiting`` is pending: it waits, unless MAX_HELD already do."""
    held = conn.held
    if held is None:
        held = conn.held = HeldMessages(conn)
    elif len(held.messages) >= MAX_HELD:
        order_given_up(conn, f"{MAX_HELD} messages are waiting for it")
        conn.dispatch(msg, time.monotonic())   # handled now, out of order
        return
    held.messages.append(msg)


def order_given_up(conn: "Connection", why: str) -> None:
    stats = conn.hub.stats
    n = stats["order_given_up"] = stats["order_given_up"] + 1
    if n <= 20 or n % 1000 == 0:
        ch = conn.awaiting
        log.info("conn %s: messages no longer wait for the join of %.60r: %s (%d so far)",
                 conn.label, ch.topic if ch is not None else "", why, n)
