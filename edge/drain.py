"""Closing an edge's client connections gently, in batches spread over a period.

Closing every connection at once sends every client back through the load balancer in the
same few milliseconds (phoenix.js reconnects 10 ms after a close), and every one of them
rejoins its channels at once on the remaining edges: a thundering herd.  Phoenix's socket
drainer closes connections in batches instead (``drainer: [batch_size: 10_000,
batch_interval: 2_000, shutdown: 30_000]``); here the batches are sized so that all of them
fit in one period, ``BATCH_INTERVAL`` apart.

Used on SIGTERM (``--drain-period``, edge/app.py) and when the edge has lost the bus
(edge/busloss.py).  A WebSocket gets close code 1012 ("service restart"); a LongPoll session
ends, so its next request gets ``{"status":410}`` and phoenix.js starts a new session.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)

CLOSE_SERVICE_RESTART = 1012
BATCH_INTERVAL = 0.5    # seconds between batches
MIN_BATCH = 10          # so few clients that they are no herd: closed together, the edge stops at once
CLOSED_WAIT = 3.0       # after the last batch: the clients' close frames (wsproto.CLOSE_WAIT) and a margin


async def drain(hub: "EdgeHub", period: float, reason: str,
                stop: Callable[[], bool] = lambda: False,
                hurry: asyncio.Event | None = None) -> int:
    """Close every connection of ``hub`` within ``period`` seconds, a batch (at least
    MIN_BATCH) every BATCH_INTERVAL; ``period`` 0 closes them all at once.  Connections that arrive meanwhile
    are closed too.  Returns early, leaving the rest open, once ``stop()`` is true; closes the
    rest at once when ``hurry`` is set.  Returns the number of connections closed."""
    conns = hub.connections
    batches = max(1, math.floor(period / BATCH_INTERVAL) + 1) if period > 0 else 1
    size = max(MIN_BATCH, math.ceil(len(conns) / batches))
    if conns:
        log.info("closing %d connection(s) with %d (%s) over %.1fs, %d per %.1fs",
                 len(conns), CLOSE_SERVICE_RESTART, reason, period, size, BATCH_INTERVAL)
    told: set[bytes] = set()
    started = time.monotonic()
    while True:
        if stop():
            kept = sum(1 for c in conns.values() if c.conn_id not in told)
            log.info("%d connection(s) closed, %d kept: %s no longer applies", len(told), kept, reason)
            return len(told)
        left = [c for c in conns.values() if c.conn_id not in told]
        if not left:
            break
        if hurry is not None and hurry.is_set():
            size = len(left)
        for conn in left[:size]:
            told.add(conn.conn_id)
            conn.shut_down(CLOSE_SERVICE_RESTART, reason, b"closed")
        await _wait(hurry, BATCH_INTERVAL)
    if told:
        log.info("%d connection(s) closed in %.1fs (%s)", len(told), time.monotonic() - started, reason)
    return len(told)


async def wait_closed(hub: "EdgeHub", timeout: float = CLOSED_WAIT) -> None:
    """Wait (bounded) until every connection told to close has finished closing, so their
    channels' TERMINATEs are on the bus before it closes."""
    deadline = time.monotonic() + timeout
    while hub.connections and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


async def _wait(event: asyncio.Event | None, seconds: float) -> None:
    if event is None:
        await asyncio.sleep(seconds)
        return
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except asyncio.TimeoutError:
        pass
