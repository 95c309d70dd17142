"""The system topic ``zchannels:status``: every worker's side of the live status page.

Each worker publishes a small JSON snapshot of itself on ``zchannels:status`` once a
second (event ``"worker"``), through its ordinary PUB socket; edges do the same (event
``"edge"``, edge/status.py).  A client that joins the topic, such as the page at
``/status``, receives them through the fast lane like any other broadcast.

Joining must work whatever the user's app declares, so the worker runtime routes the
reserved prefix ``zchannels:`` here before the app's routes are consulted, and
``Socket.channel`` refuses patterns under that prefix.  Only the exact topic
``zchannels:status`` exists; any other ``zchannels:`` topic is unmatched.  The user's
``connect`` still runs for the page's connection (it passes its own query string as
params), so an app that requires a token protects the status topic too.  A join reaches a
worker only with the edge's status token in its payload: the edge answers any other with
``{"reason":"unauthorized"}`` (edge/status.py), so here every join of the exact topic is ok.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING

import orjson

from zchannels.bus import wire
from zchannels.bus.timing import STATUS_SNAPSHOT_INTERVAL
from zchannels.workers.api import Channel, error, ok
from zchannels.workers.routes import Route

if TYPE_CHECKING:
    from zchannels.workers.runner import Worker

STATUS_TOPIC = wire.STATUS_TOPIC

log = logging.getLogger("zchannels.worker")


class StatusChannel(Channel):
    """Accepts joins on exactly ``zchannels:status``; snapshots arrive as broadcasts."""

    def join(self, topic, payload, socket):
        if topic != STATUS_TOPIC:
            return error({"reason": "unmatched topic"})
        return ok({"interval": STATUS_SNAPSHOT_INTERVAL})


_STATUS_ROUTE = Route(STATUS_TOPIC, StatusChannel)


def system_route(topic: str) -> Route | None:
    """The built-in route for a ``zchannels:`` topic, or None (unmatched)."""
    return _STATUS_ROUTE if topic == STATUS_TOPIC else None


def snapshot(worker: "Worker", started: float) -> dict:
    now = time.time()
    return {"id": worker.peer_id.decode(), "pid": os.getpid(), "slot": worker.slot,
            "started": started, "uptime": round(now - started, 1), "ts": now,
            "channels": len(worker.channels), "bad_frames": worker.bad_frames,
            "pub_dropped": worker.pub.dropped}


async def publish_forever(worker: "Worker") -> None:
    """One snapshot a second on the status topic, from the worker's own loop (so a stuck
    loop goes silent here too, and the page drops the worker)."""
    started = time.time()
    while not worker.stopping.is_set():
        try:
            worker.publish(STATUS_TOPIC, "worker", orjson.dumps(snapshot(worker, started)),
                           wire.JSON, b"")
        except Exception:   # never let the status page take a worker down
            log.exception("worker %s: status snapshot failed", worker.slot)
        try:
            await asyncio.wait_for(worker.stopping.wait(), STATUS_SNAPSHOT_INTERVAL)
        except asyncio.TimeoutError:
            pass
