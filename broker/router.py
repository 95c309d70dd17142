"""The ROUTER loop: routes point-to-point frames between edges and workers.

It keeps the registry of live peers (built from their heartbeats, so a
restarted broker rebuilds it within one heartbeat interval), places CONNECT
and JOIN requests on the least-loaded worker heard from recently (holding them a
short while when no worker is live, so a restart gap is bridged), and tells every
edge at once when a worker is gone (and every worker when an edge is gone).

Each kind is accepted only from the role that may send it (``wire.SENDER_ROLE``):
an edge cannot answer for a worker, a worker cannot speak for an edge.  Frames are
never parsed beyond the kind and the destination id.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
import os
import time

import zmq

from zchannels.bus import history, wire
from zchannels.bus.timing import (BROKER_PROBE_INTERVAL, BROKER_WARM_UP, CUT_SILENCE, PEER_LIVENESS, PLACE_FRESH,
                        WORKER_WAIT)

log = logging.getLogger(__name__)

EVICTED_MEMORY = 10_000     # ids of evicted peers remembered, to tell them if they come back
BATCH = 1000                # messages routed before housekeeping gets a turn
PARK_LIMIT = 100_000        # messages held during warm-up for peers not yet reconnected
WAIT_LIMIT = 10_000         # joins and connects held at once; past it they are bounced


class Peer:
    __slots__ = ("id", "role", "load", "placed", "last_seen", "since", "resumed")

    def __init__(self, peer_id: bytes, role: bytes, now: float):
        self.id = peer_id
        self.role = role
        self.load = 0
        self.placed = 0       # joins placed here since its last load report
        self.last_seen = now
        self.since = now
        self.resumed = 0.0    # when it was heard again after a silence of CUT_SILENCE or more


class Router:
    def __init__(self, sock: zmq.Socket, peer_timeout: float = PEER_LIVENESS, sequencer=None,
                 operator_rules: tuple[history.Rule, ...] = ()):
        self.sock = sock
        # The history rule table: the operator's rules, then each app's (APP_HISTORY from its
        # workers), announced in every heartbeat; reads go to the sequencer (broker/sequencer.py).
        self.sequencer = sequencer
        self.operator_rules = tuple(operator_rules)
        self.app_rules: dict[bytes, tuple[history.Rule, ...]] = {}
        self.rules: tuple[history.Rule, ...] | None = None
        self.rules_packed = b"[]"
        self.history_reads = 0
        self.peer_timeout = peer_timeout
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A peer that reconnected after a cut link takes its id over at once, instead of being
        # ignored until the broker's side of the dead connection times out.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.workers: dict[bytes, Peer] = {}
        self.edges: dict[bytes, Peer] = {}
        self._rr = itertools.count()
        self.routed = 0
        self.unroutable = 0
        self.malformed = 0
        self.refused = 0            # messages of a kind their sender's role may not send
        self.placed_stale = 0       # placements with no worker heard from in PLACE_FRESH
        # kind -> the registry its senders must be in (wire.SENDER_ROLE), one lookup a message
        self._senders = {kind: self.workers if role == wire.ROLE_WORKER else self.edges
                         for kind, role in wire.SENDER_ROLE.items()}
        self._next_heartbeat = 0.0
        # Right after a (re)start the registry is empty until peers heartbeat again, and peers
        # reconnect in any order: a message for a peer not connected yet (an edge's queued
        # "channel ended" for a worker, say) is parked until that peer shows up, rather than
        # reported unroutable, which would make edges error channels whose worker is alive.
        # What is still parked when the warm-up ends is reported unroutable then.
        self._warm_until = time.monotonic() + min(peer_timeout, BROKER_WARM_UP)
        self.parked: dict[bytes, list[tuple[bytes, bytes, bytes, int]]] = {}   # dest -> (sender, kind, data, offset)
        self.parked_count = 0
        self.dropped_while_warming = 0
        self.dropped_full = 0
        self.waiting: deque[tuple[float, bytes, bytes, int]] = deque()   # (deadline, sender, data, offset)
        self.waited = 0             # joins and connects that had to wait for a worker
        self.no_worker = 0          # ... and were bounced because none came in time
        self._wait_logged = self._no_worker_logged = -10.0
        self.worker_deaths = 0      # removed other than by BYE (counted for /metrics)
        self.edge_losses = 0
        self.evicted: dict[bytes, float] = {}
        self.reconnecting: set[bytes] = set()   # connection gone after a silence: see _connection_lost
        self.lost_while_reconnecting = 0
        # Sent in every heartbeat: a peer that sees it change knows the broker restarted and
        # that messages in flight then may be lost (workers/runner.py: sync_edges).
        self.instance = os.urandom(4).hex().encode()
        self._update_rules()

    # --- the loop ---------------------------------------------------------
    def run(self, should_stop) -> None:
        if self.sequencer is not None:
            self._run_with_sequencer(should_stop)
            return
        # A blocking recv with a timeout wakes once per burst; the burst is then
        # drained without blocking.  (zmq.Poller costs more per wake-up.)
        self.sock.setsockopt(zmq.RCVTIMEO, int(BROKER_PROBE_INTERVAL * 1000))
        recv = self.sock.recv_multipart
        handle = self.handle
        while not should_stop():
            try:
                handle(recv())
            except zmq.Again:
                pass
            else:
                self._handle_waiting()
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + BROKER_PROBE_INTERVAL
                self.housekeeping(now)

    def _run_with_sequencer(self, should_stop) -> None:
        """The same loop, also sending the sequencer's answers to history reads."""
        pipe = self.sequencer.pipe
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(pipe, zmq.POLLIN)
        timeout = int(BROKER_PROBE_INTERVAL * 1000)
        while not should_stop():
            ready = dict(poller.poll(timeout))
            if self.sock in ready:
                self._handle_waiting()
            if pipe in ready:
                self._send_answers(pipe)
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + BROKER_PROBE_INTERVAL
                self.housekeeping(now)

    def _send_answers(self, pipe: zmq.Socket) -> None:
        for _ in range(BATCH):
            try:
                dest, data = pipe.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self.sock.send_multipart([dest, data], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass    # the reader is gone or its queue is full: it times out and reads again

    def _history_read(self, sender: bytes, data: bytes) -> None:
        if sender not in self.edges and sender not in self.workers and not (
                sender[:1] in (wire.ROLE_EDGE, wire.ROLE_WORKER) and time.monotonic() < self._warm_until):
            self._refuse(sender, wire.HISTORY_READ, "not registered (no heartbeat)")
            return
        if self.sequencer is None:
            return
        self.history_reads += 1
        try:
            self.sequencer.pipe.send_multipart([sender, data], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _app_history(self, sender: bytes, fields: list[bytes]) -> None:
        if sender not in self.workers and sender[:1] != wire.ROLE_WORKER:
            self._refuse(sender, wire.APP_HISTORY, "not from a worker")
            return
        try:
            if len(fields) != 1:
                raise ValueError(f"{len(fields)} fields, expected 1")
            rules = history.unpack_rules(fields[0])
        except ValueError as exc:
            self._malformed([sender], f"bad app history rules: {exc}")
            return
        if self.app_rules.get(sender) != rules:
            self.app_rules[sender] = rules
            self._update_rules()

    def _update_rules(self) -> None:
        rules = history.merge(self.operator_rules, *self.app_rules.values())
        if rules != self.rules:
            self.rules = rules
            self.rules_packed = history.pack_rules(rules)
            if self.sequencer is not None:
                self.sequencer.set_rules(rules, self.rules_packed)
            if rules:
                log.info("history rules: %s", ", ".join(map(str, rules)))
            # Tell every peer now rather than at the next probe: until a publisher knows a topic
            # keeps history, its broadcasts there get no position.
            beat = wire.broker_heartbeat(self.instance, self.rules_packed)
            for peer_id in [*self.edges, *self.workers]:
                self._send(peer_id, beat)

    def handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._malformed(frames, f"{len(frames)} ZeroMQ frames, expected 2")
            return
        sender, data = frames
        if self.parked and sender in self.parked:
            self._unpark(sender)
        try:
            kind, dest, offset = wire.split_route(data)
        except wire.BusFrameError as exc:
            self._malformed(frames, str(exc))
            return
        senders = self._senders.get(kind)
        if senders is not None:
            peer = senders.get(sender)
            if peer is not None:
                self._touch(peer, sender)
            elif not self._admit_unknown(sender, kind):
                return
            self.route(sender, kind, dest, data, offset)
            return
        if kind == wire.HISTORY_READ:
            self._history_read(sender, data)
            return
        try:
            fields = wire.unpack_fields(data, offset)
        except wire.BusFrameError as exc:
            self._malformed(frames, str(exc))
            return
        if kind == wire.APP_HISTORY:
            self._app_history(sender, fields)
        elif kind == wire.HEARTBEAT:
            self.heartbeat(sender, dest, fields)
        elif kind == wire.BYE:
            self.remove(sender, "left")
        else:
            self._malformed(frames, f"unknown kind {kind[:8]!r}")

    def _admit_unknown(self, sender: bytes, kind: bytes) -> bool:
        """A message from a peer not registered in the role its kind needs.  Right after a
        (re)start peers are unknown until their first heartbeat, and their messages come
        first: during the warm-up one whose routing id names the right role passes."""
        role = wire.SENDER_ROLE[kind]
        if sender[:1] == role:
            if time.monotonic() < self._warm_until:
                return True
            why = "not registered (no heartbeat)"
        else:
            why = "an edge" if role == wire.ROLE_WORKER else "a worker"
            why = f"from {why}" if sender[:1] in (wire.ROLE_EDGE, wire.ROLE_WORKER) else "from an unknown role"
        self._refuse(sender, kind, why)
        return False

    def _refuse(self, sender: bytes, kind: bytes, why: str) -> None:
        self.refused += 1
        if self.refused <= 20 or self.refused % 1000 == 0:
            log.warning("refused bus message %r from %r: %s (%d refused so far)",
                        kind, sender[:40], why, self.refused)

    def _malformed(self, frames: list[bytes], why: str) -> None:
        self.malformed += 1
        if self.malformed <= 20 or self.malformed % 1000 == 0:
            log.warning("dropped malformed bus message from %r: %s (%d so far)",
                        frames[0][:40] if frames else b"", why, self.malformed)

    # --- routing ----------------------------------------------------------
    def route(self, sender: bytes, kind: bytes, dest: bytes, data: bytes, offset: int) -> None:
        placed = not dest
        if placed:
            if kind not in (wire.CONNECT, wire.JOIN):
                self._malformed([sender, data], f"kind {kind!r} without destination")
                return
            worker = self.place(count_join=kind == wire.JOIN)
            if worker is None:
                self._wait_for_worker(sender, data, offset)
                return
            dest = worker.id
        try:
            self.sock.send_multipart([dest, wire.readdress(data, sender, offset)], zmq.NOBLOCK)
            self.routed += 1
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EAGAIN:
                # The peer is alive but its queue is full: drop this message (counted);
                # the peer is not treated as gone.
                self.dropped_full += 1
                if self.dropped_full in (1, 10, 100, 1000) or self.dropped_full % 10000 == 0:
                    log.warning("queue to %r full: %d message(s) dropped so far",
                                dest, self.dropped_full)
                return
            if exc.errno != zmq.EHOSTUNREACH:
                log.warning("could not route %r to %r: %s", kind, dest, exc)
                return
            known = dest in self.workers or dest in self.edges
            self._connection_lost(dest)
            if placed and dest not in self.workers:
                # The worker chosen for a join or connect just died: choose again (it is
                # out of the registry now), rather than bounce the client's request.
                self.route(sender, kind, b"", data, offset)
                return
            if dest in self.reconnecting:
                self.lost_while_reconnecting += 1   # like a message lost in the cut itself
                return
            if not known and time.monotonic() < self._warm_until:
                self._park(sender, kind, dest, data, offset)
                return
            self._unroutable(sender, dest, data, offset)

    def _park(self, sender: bytes, kind: bytes, dest: bytes, data: bytes, offset: int) -> None:
        if self.parked_count >= PARK_LIMIT:
            self.dropped_while_warming += 1
            return
        self.parked.setdefault(dest, []).append((sender, kind, data, offset))
        self.parked_count += 1

    def _unpark(self, peer_id: bytes) -> None:
        """``peer_id`` is connected now: route what waited for it, in order."""
        held = self.parked.pop(peer_id)
        self.parked_count -= len(held)
        for sender, kind, data, offset in held:
            self.route(sender, kind, peer_id, data, offset)

    def _end_warm_up(self) -> None:
        parked, self.parked, self.parked_count = self.parked, {}, 0
        for dest, held in parked.items():
            for sender, _kind, data, offset in held:
                self._unroutable(sender, dest, data, offset)

    # --- joins and connects waiting for a worker -----------------------------------
    def _wait_for_worker(self, sender: bytes, data: bytes, offset: int) -> None:
        if len(self.waiting) >= WAIT_LIMIT:
            self._bounce_no_worker(sender, data, offset)
            return
        now = time.monotonic()
        if not self.waiting and now - self._wait_logged >= 5.0:
            self._wait_logged = now
            log.info("no live worker: joins and connects wait up to %.1fs for one", WORKER_WAIT)
        self.waiting.append((max(now + WORKER_WAIT, self._warm_until), sender, data, offset))
        self.waited += 1

    def _place_waiting(self) -> None:
        """A worker is live now: place what waited for one, in arrival order."""
        waiting, self.waiting = self.waiting, deque()
        for _deadline, sender, data, offset in waiting:
            self.route(sender, data[:1], b"", data, offset)

    def _expire_waiting(self, now: float) -> None:
        waiting = self.waiting
        while waiting and waiting[0][0] <= now:
            _deadline, sender, data, offset = waiting.popleft()
            self._bounce_no_worker(sender, data, offset)

    def _bounce_no_worker(self, sender: bytes, data: bytes, offset: int) -> None:
        self.no_worker += 1
        now = time.monotonic()
        if now - self._no_worker_logged >= 5.0:
            self._no_worker_logged = now
            log.warning("no worker came within %.1fs: joins and connects answered \"no worker "
                        "available\" (%d so far)", WORKER_WAIT, self.no_worker)
        self._unroutable(sender, b"", data, offset)

    def _unroutable(self, sender: bytes, dest: bytes, data: bytes, offset: int) -> None:
        """Hand the message back to its sender (wire.unroutable)."""
        self.unroutable += 1
        try:
            fields = wire.unpack_fields(data, offset)
            self._send(sender, wire.unroutable(dest, data[:1], fields))
        except wire.BusFrameError:
            pass

    def place(self, count_join: bool) -> Peer | None:
        """The least-loaded worker among those heard from in the last PLACE_FRESH seconds;
        if none was, the one heard from last (it may only be slow; refusing would not help)."""
        if not self.workers:
            return None
        start = next(self._rr) % len(self.workers)
        peers = list(self.workers.values())
        peers = peers[start:] + peers[:start]
        recent = time.monotonic() - PLACE_FRESH
        fresh = [p for p in peers if p.last_seen >= recent]
        if fresh:
            best = min(fresh, key=lambda p: p.load + p.placed)
        else:
            best = max(peers, key=lambda p: p.last_seen)
            self.placed_stale += 1
            if self.placed_stale in (1, 10, 100, 1000) or self.placed_stale % 10000 == 0:
                log.warning("no worker heard from in %.1fs; placing on %s, silent for %.1fs "
                            "(%d such placement(s) so far)", PLACE_FRESH, best.id.decode(errors="replace"),
                            time.monotonic() - best.last_seen, self.placed_stale)
        if count_join:
            best.placed += 1
        return best

    # --- registry -----------------------------------------------------------
    def _touch(self, peer: Peer, sender: bytes) -> None:
        now = time.monotonic()
        if now - peer.last_seen >= CUT_SILENCE:
            peer.resumed = now
        peer.last_seen = now
        if self.reconnecting:
            self.reconnecting.discard(sender)

    def heartbeat(self, sender: bytes, role: bytes, fields: list[bytes]) -> None:
        if len(fields) != 1 or role not in (wire.ROLE_EDGE, wire.ROLE_WORKER):
            self._malformed([sender], "bad heartbeat")
            return
        if sender[:1] != role:
            # Routing ids begin with their role (wire.new_peer_id); the role check of every
            # message relies on it, so a peer may not register under another one.
            self._refuse(sender, wire.HEARTBEAT, f"claims role {role!r} with a routing id of another")
            return
        load = fields[0]
        registry = self.workers if role == wire.ROLE_WORKER else self.edges
        now = time.monotonic()
        peer = registry.get(sender)
        if peer is None:
            if self.evicted.pop(sender, None) is not None:
                # Declared dead while it was only slow: its peers dropped their shared
                # state (channels), so it must drop its side too before it starts afresh.
                log.warning("%r came back after being declared dead; telling it to reset", sender)
                self._send(sender, wire.evicted())
            peer = registry[sender] = Peer(sender, role, now)
            log.info("%s up: %s (%d %ss live)", "worker" if role == wire.ROLE_WORKER else "edge",
                     sender.decode(errors="replace"), len(registry),
                     "worker" if role == wire.ROLE_WORKER else "edge")
            self._send(sender, wire.broker_heartbeat(self.instance, self.rules_packed))
        if now - peer.last_seen >= CUT_SILENCE:
            peer.resumed = now
        peer.last_seen = now
        if self.reconnecting and sender in self.reconnecting:
            self.reconnecting.discard(sender)
            log.info("%s reconnected", sender.decode(errors="replace"))
        peer.load = int(load) if load.isdigit() else 0
        peer.placed = 0
        if self.waiting and role == wire.ROLE_WORKER:
            self._place_waiting()

    def _connection_lost(self, peer_id: bytes) -> None:
        """``peer_id``'s connection is gone.  While the peer was talking, its process died:
        remove it now.  After CUT_SILENCE without a word, the link was cut and the peer has
        dropped the stalled connection to reconnect; when the link heals, the old connection's
        last segments and its close can reach us before the new connection does (so a peer
        heard again after a silence less than CUT_SILENCE ago counts as silent too).  Such a
        peer keeps its place (and its channels) until the silence rule (peer_timeout) says
        otherwise."""
        peer = self.workers.get(peer_id) or self.edges.get(peer_id)
        now = time.monotonic()
        if peer is None or (now - peer.last_seen < CUT_SILENCE and now - peer.resumed >= CUT_SILENCE):
            self.remove(peer_id, "unreachable")
        elif peer_id not in self.reconnecting:
            self.reconnecting.add(peer_id)
            log.warning("connection of %s closed %s (a cut link?); it keeps its place until it is "
                        "silent for %.0fs", peer_id.decode(errors="replace"),
                        f"after {now - peer.last_seen:.1f}s of silence" if now - peer.last_seen >= CUT_SILENCE
                        else f"{now - peer.resumed:.1f}s after a silence ended", self.peer_timeout)

    def remove(self, peer_id: bytes, why: str) -> None:
        self.reconnecting.discard(peer_id)
        if peer_id in self.workers or peer_id in self.edges:
            if len(self.evicted) >= EVICTED_MEMORY:
                self.evicted.pop(next(iter(self.evicted)))
            if why != "left":
                self.evicted[peer_id] = time.monotonic()
        peer = self.workers.pop(peer_id, None)
        if peer is not None:
            if peer_id in self.app_rules and len(self.app_rules) > 1:
                # The last worker's rules stay: publishers keep sequencing until it is back.
                del self.app_rules[peer_id]
                self._update_rules()
            if why != "left":
                self.worker_deaths += 1
            log.warning("worker down: %s (%s); telling %d edge(s) and %d worker(s)",
                        peer_id.decode(errors="replace"), why, len(self.edges), len(self.workers))
            # Edges error its channels; the other workers drop its presence entries at once.
            notice = wire.worker_down(peer_id)
            for peer in [*self.edges, *self.workers]:
                self._send(peer, notice)
            return
        peer = self.edges.pop(peer_id, None)
        if peer is not None:
            if why != "left":
                self.edge_losses += 1
            log.warning("edge down: %s (%s); telling %d worker(s)",
                        peer_id.decode(errors="replace"), why, len(self.workers))
            notice = wire.edge_down(peer_id)
            for worker in list(self.workers):
                self._send(worker, notice)

    def _send(self, peer_id: bytes, frames: list[bytes]) -> bool:
        try:
            self.sock.send_multipart([peer_id, wire.pack(frames)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._connection_lost(peer_id)
            return False

    def housekeeping(self, now: float) -> None:
        if self.parked and now >= self._warm_until:
            self._end_warm_up()
        if self.waiting:
            self._expire_waiting(now)
        unreachable = []
        probe = wire.pack(wire.broker_heartbeat(self.instance, self.rules_packed))
        for registry in (self.workers, self.edges):
            for peer in list(registry.values()):
                if now - peer.last_seen > self.peer_timeout:
                    self.remove(peer.id, f"silent for {now - peer.last_seen:.1f}s")
                    continue
                try:
                    self.sock.send_multipart([peer.id, probe], zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    if exc.errno == zmq.EHOSTUNREACH:
                        unreachable.append(peer.id)
        if unreachable:
            # A peer that stopped cleanly may have its BYE waiting behind its closed
            # connection: read what is there first, so it counts as gone, not dead.
            self._handle_waiting()
            for peer_id in unreachable:
                self._connection_lost(peer_id)

    def _handle_waiting(self) -> None:
        """Handle what has arrived, without blocking (at most BATCH messages)."""
        recv, handle = self.sock.recv_multipart, self.handle
        for _ in range(BATCH):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            handle(frames)
