"""The ROUTER loop: routes point-to-point frames between edges and workers.

It keeps the registry of live peers (built from their heartbeats, so a
restarted broker rebuilds it within one heartbeat interval), places CONNECT
and JOIN requests on the least-loaded worker, and tells every edge at once
when a worker is gone (and every worker when an edge is gone).

Frames are never parsed beyond the kind and the destination id.
"""
from __future__ import annotations

import itertools
import logging
import time

import zmq

from broker import wire

log = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 0.25   # broker -> peer probes; a probe to a vanished peer fails at once
PEER_LIVENESS = 3.0         # seconds of silence before a connected peer counts as dead
BATCH = 1000                # messages routed before housekeeping gets a turn


class Peer:
    __slots__ = ("id", "role", "load", "placed", "last_seen", "since")

    def __init__(self, peer_id: bytes, role: bytes, now: float):
        self.id = peer_id
        self.role = role
        self.load = 0
        self.placed = 0       # joins placed here since its last load report
        self.last_seen = now
        self.since = now


class Router:
    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.workers: dict[bytes, Peer] = {}
        self.edges: dict[bytes, Peer] = {}
        self._rr = itertools.count()
        self.routed = 0
        self.unroutable = 0
        self.malformed = 0
        self._next_heartbeat = 0.0

    # --- the loop ---------------------------------------------------------
    def run(self, should_stop) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        recv = self.sock.recv_multipart
        while not should_stop():
            events = poller.poll(HEARTBEAT_INTERVAL * 1000)
            if events:
                for _ in range(BATCH):
                    try:
                        frames = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.handle(frames)
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + HEARTBEAT_INTERVAL
                self.housekeeping(now)

    def handle(self, frames: list[bytes]) -> None:
        if len(frames) < 2:
            self._malformed(frames, "too few frames")
            return
        sender, kind = frames[0], frames[1]
        if kind in wire.FRAME_COUNTS:
            if len(frames) != wire.FRAME_COUNTS[kind] + 1:
                self._malformed(frames, f"kind {kind!r} with {len(frames) - 1} frames")
                return
            self._touch(sender)
            self.route(sender, kind, frames)
        elif kind == wire.HEARTBEAT:
            self.heartbeat(sender, frames)
        elif kind == wire.BYE:
            self.remove(sender, "left")
        else:
            self._malformed(frames, f"unknown kind {kind[:8]!r}")

    def _malformed(self, frames: list[bytes], why: str) -> None:
        self.malformed += 1
        if self.malformed <= 20 or self.malformed % 1000 == 0:
            log.warning("dropped malformed bus message from %r: %s (%d so far)",
                        frames[0][:40] if frames else b"", why, self.malformed)

    # --- routing ----------------------------------------------------------
    def route(self, sender: bytes, kind: bytes, frames: list[bytes]) -> None:
        dest = frames[2]
        if not dest:
            if kind not in (wire.CONNECT, wire.JOIN):
                self._malformed(frames, f"kind {kind!r} without destination")
                return
            worker = self.place(count_join=kind == wire.JOIN)
            if worker is None:
                self._unroutable(sender, dest, frames)
                return
            dest = worker.id
        frames[0] = dest
        frames[1] = kind
        frames[2] = sender
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            self.routed += 1
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.remove(dest, "unreachable")
            else:
                log.warning("could not route %r to %r: %s", kind, dest, exc)
            frames[0], frames[1], frames[2] = sender, kind, dest
            self._unroutable(sender, dest, frames)

    def _unroutable(self, sender: bytes, dest: bytes, frames: list[bytes]) -> None:
        self.unroutable += 1
        kind = frames[1]
        try:
            self.sock.send_multipart([sender, wire.UNROUTABLE, dest, kind, *frames[3:]], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def place(self, count_join: bool) -> Peer | None:
        if not self.workers:
            return None
        start = next(self._rr) % len(self.workers)
        peers = list(self.workers.values())
        peers = peers[start:] + peers[:start]
        best = min(peers, key=lambda p: p.load + p.placed)
        if count_join:
            best.placed += 1
        return best

    # --- registry -----------------------------------------------------------
    def _touch(self, sender: bytes) -> None:
        peer = self.workers.get(sender) or self.edges.get(sender)
        if peer is not None:
            peer.last_seen = time.monotonic()

    def heartbeat(self, sender: bytes, frames: list[bytes]) -> None:
        if len(frames) != 4 or frames[2] not in (wire.ROLE_EDGE, wire.ROLE_WORKER):
            self._malformed(frames, "bad heartbeat")
            return
        role, load = frames[2], frames[3]
        registry = self.workers if role == wire.ROLE_WORKER else self.edges
        now = time.monotonic()
        peer = registry.get(sender)
        if peer is None:
            peer = registry[sender] = Peer(sender, role, now)
            log.info("%s up: %s (%d %ss live)", "worker" if role == wire.ROLE_WORKER else "edge",
                     sender.decode(errors="replace"), len(registry),
                     "worker" if role == wire.ROLE_WORKER else "edge")
            self._send(sender, [wire.HEARTBEAT, b""])
        peer.last_seen = now
        peer.load = int(load) if load.isdigit() else 0
        peer.placed = 0

    def remove(self, peer_id: bytes, why: str) -> None:
        peer = self.workers.pop(peer_id, None)
        if peer is not None:
            log.warning("worker down: %s (%s); telling %d edge(s)",
                        peer_id.decode(errors="replace"), why, len(self.edges))
            for edge in list(self.edges):
                self._send(edge, [wire.WORKER_DOWN, peer_id])
            return
        peer = self.edges.pop(peer_id, None)
        if peer is not None:
            log.warning("edge down: %s (%s); telling %d worker(s)",
                        peer_id.decode(errors="replace"), why, len(self.workers))
            for worker in list(self.workers):
                self._send(worker, [wire.EDGE_DOWN, peer_id])

    def _send(self, peer_id: bytes, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart([peer_id, *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self.remove(peer_id, "unreachable")
            return False

    def housekeeping(self, now: float) -> None:
        for registry in (self.workers, self.edges):
            for peer in list(registry.values()):
                if now - peer.last_seen > PEER_LIVENESS:
                    self.remove(peer.id, f"silent for {now - peer.last_seen:.1f}s")
                else:
                    self._send(peer.id, [wire.HEARTBEAT, b""])
