"""The edge's side of the bus: a DEALER to the broker, a SUB for broadcasts and a PUB
for what the edge itself publishes (its zchannels:status snapshots, edge/status.py).

Subscriptions are reference-counted per topic key, so a topic with many local
subscribers costs one ZeroMQ subscription, dropped when the last one leaves.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq

from bus import curve, wire
from bus.loopsock import LoopSocket, connect_peer

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 0.5
# The broker probes every peer every 0.25 s, so 2 s of silence is 8 probes missed: the bus is
# down (a cut link, a dead or stuck broker).  A plain broker restart stays under it or just
# past it; see edge/hub.py for what the edge does when the silence lasts.
BUS_DOWN_AFTER = 2.0
BROKER_SILENCE_WARNING = BUS_DOWN_AFTER   # the name POST /api/broadcast's 503 text uses
# A new broker instance seen this soon after the bus came back from a silence is the same event
# (the new broker's first frames to us can be parked ones, then its heartbeat names it).
SAME_RETURN = 0.5
HWM = 200_000


class EdgeBus:
    def __init__(self, bus: str, edge_id: bytes,
                 on_direct: Callable[[list[bytes]], None],
                 on_broadcast: Callable[[list[bytes]], None],
                 load: Callable[[], int],
                 on_bus_state: Callable[[bool], None] = lambda up: None):
        """``on_bus_state(False)``: the bus is down (BUS_DOWN_AFTER of silence).
        ``on_bus_state(True)``: it is back after a silence or with a new broker instance (a
        restart, however short): messages in flight then may have been lost."""
        self.edge_id = edge_id
        self.ctx = zmq.Context.instance()
        # NODROP on the PUB: a full queue fails the send (counted), so POST /api/broadcast can
        # answer 503 instead of 202 for a message that went nowhere.
        dealer, pub, sub = connect_peer(self.ctx, bus, edge_id, HWM, pub_nodrop=True)
        self._on_direct = on_direct
        self._on_bus_state = on_bus_state
        self.dealer = LoopSocket(dealer, self._direct, name="edge-dealer")
        self.sub = LoopSocket(sub, on_broadcast, name="edge-sub")
        self.pub = LoopSocket(pub, None, name="edge-pub")   # send-only: broadcasts from this edge
        self._sub_counts: dict[bytes, int] = {}
        self._load = load
        self._last_broker = asyncio.get_running_loop().time()
        self._broker_silent = False
        self.broker_instance = b""      # named in the broker's heartbeats; new after a restart
        self._back_at = -SAME_RETURN
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeats())
        self.send = self.dealer.send

    @property
    def broker_silent(self) -> bool:
        """True while the bus is down: BUS_DOWN_AFTER s or more without a word from the broker."""
        return self._broker_silent

    def silent_for(self) -> float:
        """Seconds since the broker was last heard from."""
        return asyncio.get_running_loop().time() - self._last_broker

    def _direct(self, frames: list[bytes]) -> None:
        now = asyncio.get_running_loop().time()
        silence, self._last_broker = now - self._last_broker, now
        # Also after a silence the heartbeat loop has not flagged yet: the connection may
        # have been remade, and messages lost, all the same.
        back = self._broker_silent or silence > BUS_DOWN_AFTER
        if frames[0] == wire.HEARTBEAT:
            back = self._new_instance(frames, now) or back
        if back:
            if self._broker_silent:
                log.info("broker reachable again")
            self._broker_silent = False
            self._back_at = now
            self._on_bus_state(True)
        if frames[0] == wire.HEARTBEAT:
            return
        self._on_direct(frames)

    def _new_instance(self, frames: list[bytes], now: float) -> bool:
        """Whether this heartbeat names a broker other than the one we knew: it restarted, and
        what was in flight through the old one may be lost, even if the gap was too short to
        count as a silence."""
        instance = frames[1] if len(frames) > 1 else b""
        if not instance or instance == self.broker_instance:
            return False
        known, self.broker_instance = self.broker_instance, instance
        if not known:
            return False
        log.info("new broker instance %s (was %s)", instance.decode(errors="replace"),
                 known.decode(errors="replace"))
        return now - self._back_at > SAME_RETURN

    async def _heartbeats(self) -> None:
        while True:
            self.dealer.send([wire.HEARTBEAT, wire.ROLE_EDGE, str(self._load()).encode()])
            if not self._broker_silent and self.silent_for() > BUS_DOWN_AFTER:
                self._broker_silent = True
                log.warning("no word from the broker for %.0fs: the bus is down; new connections "
                            "get 503 until it is back%s", BUS_DOWN_AFTER, curve.silent_broker_hint())
                self._on_bus_state(False)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def publish(self, topic: str, event: str, payload: bytes, fmt: bytes = wire.JSON) -> None:
        """Broadcast ``payload`` on ``topic`` to every subscriber, like a worker's broadcast."""
        self.pub.send(wire.broadcast_frames(topic, event, payload, fmt))

    def subscribe(self, key: bytes) -> None:
        n = self._sub_counts.get(key, 0)
        if n == 0:
            self.sub.sock.setsockopt(zmq.SUBSCRIBE, key)
        self._sub_counts[key] = n + 1

    def unsubscribe(self, key: bytes) -> None:
        n = self._sub_counts.get(key, 0)
        if n <= 1:
            self._sub_counts.pop(key, None)
            if n == 1:
                self.sub.sock.setsockopt(zmq.UNSUBSCRIBE, key)
        else:
            self._sub_counts[key] = n - 1

    def close(self) -> None:
        self._heartbeat_task.cancel()
        self.dealer.send([wire.BYE, wire.ROLE_EDGE])
        self.dealer.sock.setsockopt(zmq.LINGER, 200)
        self.dealer.close()
        self.sub.close()
        self.pub.close()
