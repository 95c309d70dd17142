"""The edge's side of the live status page: its own snapshot on ``zchannels:status``, and
the page itself at ``/status``.

Once a second the edge publishes what it knows about itself (connections, joined channels,
its busiest topics, frame and join counters, workers the broker reported down) through its PUB
socket, event ``"edge"``; workers publish theirs (workers/status.py).  The page
(edge/static_status/status.html) is a phoenix.js client of this very system: it joins the
topic, keeps the latest snapshot per process, drops processes silent for 5 s, derives
rates from consecutive snapshots and charts the cluster's totals over the last 5 minutes.  No process keeps a cluster-wide view, so nothing needs
to agree: a dead process simply stops publishing.

Topic names, ids and pids are for the operator only: the page and joins of the topic need
the edge's status token (``--status-token`` or env ``ZCHANNELS_STATUS_TOKEN``, ``StatusAccess``).
Without a token the page answers 404 and every join gets ``{"reason":"unauthorized"}``.
"""
from __future__ import annotations

import asyncio
import hmac
import heapq
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
from tornado import web

from zchannels.bus import wire
from zchannels.bus.timing import STATUS_SNAPSHOT_INTERVAL

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)

STATUS_TOPIC = wire.STATUS_TOPIC   # reserved; joined through workers/status.py
TOP_TOPICS = 10
WORKER_DOWNS_KEPT = 20              # the most recent ones, ...
WORKER_DOWNS_MAX_AGE = 600.0        # ... heard of in the last 10 minutes
PAGE = Path(__file__).resolve().parent / "static_status" / "status.html"
TOKEN_ENV = "ZCHANNELS_STATUS_TOKEN"
TOKEN_PARAM = "status_token"        # in the page's query string and in the join payload
UNAUTHORIZED = b'{"reason":"unauthorized"}'


class StatusAccess:
    """Who may see the status page and join ``zchannels:status``: whoever gives the token.
    No token configured = nobody (the page is off)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token else None
        self.stats = {"status_refused": 0}   # the hub puts its own here (edge/metrics.py reads it)

    @classmethod
    def from_options(cls, flag: str | None) -> "StatusAccess":
        return cls(flag or os.environ.get(TOKEN_ENV) or None)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def allows(self, given: object) -> bool:
        if self._token is None or not isinstance(given, str):
            return False
        return hmac.compare_digest(given.encode(), self._token)   # no timing hint

    def refuse(self, who: str, what: str) -> None:
        """Count a refusal and log it, rate-limited (a refused client may retry forever)."""
        self.stats["status_refused"] += 1
        n = self.stats["status_refused"]
        if n <= 20 or n % 1000 == 0:
            log.info("%s: %s refused: %s (%d refused so far)", who, what,
                     "wrong or missing status token" if self.enabled else "the status page is off "
                     "(no --status-token)", n)


class EdgeStatus:
    def __init__(self, hub: "EdgeHub") -> None:
        self.hub = hub
        self.started = time.time()
        self._task = asyncio.get_running_loop().create_task(self._publish_forever())

    def snapshot(self) -> dict:
        hub = self.hub
        now = time.time()
        index = hub.fastlane.index
        busiest = heapq.nlargest(TOP_TOPICS, index.items(), key=lambda kv: len(kv[1]))
        downs = hub.worker_downs
        for worker, at in list(downs.items()):    # oldest first (insertion order)
            if len(downs) > WORKER_DOWNS_KEPT or now - at > WORKER_DOWNS_MAX_AGE:
                del downs[worker]
        return {
            "id": hub.edge_id.decode(), "pid": os.getpid(), "started": self.started,
            "uptime": round(now - self.started, 1), "ts": now,
            "connections": len(hub.connections),
            "channels": sum(len(subs) for subs in index.values()),
            "topic_count": len(index),
            "topics": [[key[:-1].decode(errors="replace"), len(subs)] for key, subs in busiest],
            "frames_in": hub.frames_in,
            "frames_out": hub.frames_out + hub.fastlane.deliveries,
            "deliveries": hub.fastlane.deliveries,
            "joins": hub.joins,
            "worker_downs": [{"id": w.decode(errors="replace"), "at": at} for w, at in downs.items()],
            "stats": hub.stats,
        }

    async def _publish_forever(self) -> None:
        while True:
            try:
                self.hub.bus.publish(STATUS_TOPIC, "edge", orjson.dumps(self.snapshot()), wire.JSON)
            except Exception:   # the status page must never take the edge down
                log.exception("edge %s: status snapshot failed", self.hub.edge_id.decode())
            await asyncio.sleep(STATUS_SNAPSHOT_INTERVAL)

    def close(self) -> None:
        self._task.cancel()


class StatusPage(web.RequestHandler):
    """``GET /status?status_token=TOKEN``: the live cluster view (one HTML file, plain JS, no
    external assets).  404 while the page is off, 403 for a wrong or missing token."""

    def initialize(self, access: StatusAccess) -> None:
        self.access = access

    def get(self) -> None:
        access = self.access
        if not access.allows(self.get_query_argument(TOKEN_PARAM, None)):
            access.refuse(f"http {self.request.remote_ip}", "GET /status")
            self.set_status(404 if not access.enabled else 403)
            self.finish()
            return
        self.set_header("Content-Type", "text/html; charset=utf-8")
        # The token is in this page's URL: keep it out of Referer headers.
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-cache")
        self.write(PAGE.read_bytes())
