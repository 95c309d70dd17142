"""Settling an edge's channels with the workers after messages may have been lost.

When the edge is back on the bus after a silence (a cut link) or finds a new broker instance
(a restart, however short), messages may have been lost both ways.  The edge then lists to
every worker it has had channels on which channels it has (EDGE_SYNC, joined or joining,
anywhere); each worker ends those of ours it holds that we do not list (our TERMINATE was
lost) and answers with its own list (SYNC), which errors here those it no longer has (its
close was lost; phoenix.js rejoins them).  A worker holding channels of ours that says
nothing within ``SYNC_ANSWER_TIMEOUT`` is taken for dead.  Pushes that were waiting for an
answer when the bus came back and still are ``OUTAGE_REPLY_AFTER`` later get an error reply.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from zchannels.bus import wire
from zchannels.bus.timing import OUTAGE_REPLY_AFTER, SYNC_ANSWER_TIMEOUT
from zchannels.edge.channel import JOINED

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)

LOST_IN_OUTAGE = b'{"reason":"lost in a bus outage"}'


class Resync:
    def __init__(self, hub: "EdgeHub"):
        self.hub = hub
        # worker -> deadline of its answer; any word from the worker is its answer (EdgeHub.on_direct)
        self.waiting: dict[bytes, float] = {}

    def bus_back(self) -> None:
        """Tell every worker we have had channels on which channels we have, and wait for
        their answers (see the module docstring)."""
        hub = self.hub
        workers = hub.known_workers | hub.worker_channels.keys()
        if not workers:
            return
        ours = [(conn.conn_id, ch.topic.encode(), wire.encode_ref(ch.join_ref))
                for conn in hub.connections.values() for ch in conn.channels.values()]
        for worker in workers:
            hub.bus_send(wire.edge_sync(worker, ours))
        in_flight = [(conn, ch, list(ch.pending)) for conn in hub.connections.values()
                     for ch in conn.channels.values() if ch.pending]
        loop = asyncio.get_running_loop()
        if in_flight:
            loop.call_later(OUTAGE_REPLY_AFTER, self._answer_lost_pushes, in_flight)
        log.info("back on the bus: told %d worker(s) which channels this edge has", len(workers))
        deadline = loop.time() + SYNC_ANSWER_TIMEOUT
        # A second round before the first one's answers keeps the first deadline: the same
        # worker is no more likely to be alive for being asked twice.
        waiting = self.waiting
        asked = [w for w in hub.worker_channels if waiting.setdefault(w, deadline) == deadline]
        if asked:
            loop.call_later(SYNC_ANSWER_TIMEOUT, self._overdue)

    def on_sync(self, s: wire.ChannelList) -> None:
        """A worker lists the channels of ours it holds, after a broker restart that may have
        lost messages: end there those we no longer have (our TERMINATE was lost), error here
        those it no longer has (its close was lost; phoenix.js rejoins)."""
        hub, worker, listed = self.hub, s.peer, s.channels
        orphans = 0
        for conn_id, topic_b, join_ref in listed:
            conn = hub.connections.get(conn_id)
            ch = conn.channels.get(topic_b.decode()) if conn is not None else None
            if (ch is None or wire.encode_ref(ch.join_ref) != join_ref
                    or (ch.state == JOINED and ch.worker != worker)):   # the loser of a join sent twice
                orphans += 1
                hub.bus_send(wire.terminate(worker, conn_id, topic_b, join_ref, b"closed"))
        lost = [ch for ch in hub.worker_channels.get(worker, ())
                if (ch.conn.conn_id, ch.topic.encode(), wire.encode_ref(ch.join_ref)) not in listed]
        if orphans or lost:
            log.warning("worker %s after the broker restart: ending %d channel(s) it still held, "
                        "phx_error for %d it had lost", worker.decode(errors="replace"), orphans, len(lost))
        hub.error_channels(lost)

    def forget(self, worker: bytes) -> None:
        """The worker is gone (the broker said so): no answer to wait for."""
        self.waiting.pop(worker, None)

    def _answer_lost_pushes(self, in_flight) -> None:
        """Pushes that were waiting when the bus came back and are still unanswered now: lost in
        the outage, or their handler takes longer than OUTAGE_REPLY_AFTER (its late reply is then
        one phoenix.js ignores).  Either way the client gets an error reply instead of a timeout."""
        answered = sum(conn.answer_pushes(ch, refs, LOST_IN_OUTAGE) for conn, ch, refs in in_flight)
        if answered:
            self.hub.stats["outage_replies"] += answered
            log.warning("%d push(es) sent before the bus outage still unanswered %.0fs after it: "
                        "answered with an error", answered, OUTAGE_REPLY_AFTER)

    def _overdue(self) -> None:
        """Give up on the workers that have not answered the edge's EDGE_SYNC in time: their channels
        get phx_error, as for WORKER_DOWN, and each a TERMINATE, so a worker that was only slow
        (a blocked loop) ends the instances the clients are rejoining elsewhere.  Its own SYNC,
        when it comes, would end them too (the edge answers TERMINATE for what it no longer
        has), so either way no instance is left behind."""
        hub = self.hub
        now = asyncio.get_running_loop().time()
        for worker in [w for w, deadline in self.waiting.items() if deadline <= now + 0.01]:
            del self.waiting[worker]
            chans = hub.worker_channels.pop(worker, None)
            if not chans:
                continue
            hub.stats["sync_timeouts"] += 1
            log.warning("worker %s said nothing for %.1fs after the bus came back: taking it for "
                        "gone, phx_error to %d channel(s)", worker.decode(errors="replace"),
                        SYNC_ANSWER_TIMEOUT, len(chans))
            for ch in chans:
                hub.bus_send(wire.terminate(worker, ch.conn.conn_id, ch.topic.encode(),
                                            wire.encode_ref(ch.join_ref), b"closed"))
            hub.error_channels(chans)
