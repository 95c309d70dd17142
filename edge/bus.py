"""The edge's side of the bus: a BusPeer (bus/peer.py) set up for an edge.

The DEALER carries the edge's frames to and from workers, the SUB the broadcasts its clients'
channels subscribe to (counted per topic key, so a topic with many local subscribers costs
one ZeroMQ subscription), the PUB what the edge publishes itself (its zchannels:status
snapshots, edge/status.py; POST /api/broadcast).  A silent broker means the bus is down and
new connections get 503 until it is back; see edge/hub.py for what the edge does when the
silence lasts.
"""
from __future__ import annotations

import logging
from typing import Callable

import zmq

from zchannels.bus import wire
from zchannels.bus.peer import BusPeer, connect_peer

log = logging.getLogger(__name__)

HWM = 200_000


class EdgeBus(BusPeer):
    def __init__(self, bus: str, edge_id: bytes,
                 on_direct: Callable[[list[bytes]], None],
                 on_broadcast: Callable[[list[bytes]], None],
                 load: Callable[[], int],
                 on_bus_state: Callable[[bool], None] = lambda up: None,
                 on_undelivered: Callable[[list[bytes]], None] | None = None):
        """``load()``: the edge's connection count, sent in its heartbeats.
        ``on_bus_state(False)``: the bus is down (BROKER_SILENCE_LIMIT of silence).
        ``on_bus_state(True)``: it is back after a silence or with a new broker instance (a
        restart, however short): messages in flight then may have been lost.
        ``on_undelivered(frames)``: a message for a worker the bus refused (full queue)."""
        self.edge_id = edge_id
        # NODROP on the PUB: a full queue fails the send (counted), so POST /api/broadcast can
        # answer 503 instead of 202 for a message that went nowhere.
        sockets = connect_peer(zmq.Context.instance(), bus, edge_id, HWM, pub_nodrop=True)
        super().__init__(sockets, wire.ROLE_EDGE, on_direct=on_direct, on_broadcast=on_broadcast,
                         load=load, on_bus_state=on_bus_state, on_undelivered=on_undelivered,
                         name="edge", logger=log,
                         down_note="the bus is down; new connections get 503 until it is back")
