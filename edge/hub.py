"""The edge's registries, and the router of what the bus brings to them.

It keeps the edge's connections by id, the joined channels of each worker and (with the fast
lane, edge/fastlane.py) the local subscribers of each topic, and routes each message from the
bus to the connection it is for (edge/connection.py), which owns its channels and writes to
its client.  A connection tells the hub when a channel's join goes out, when it is joined and
when it ends (``channel_opened``, ``channel_joined``, ``channel_closed``); the hub subscribes
the edge to the topic, keeps the indexes, and hands the channel to the fast lane and to the
join's second sending (edge/replace.py).

A frame about a channel is taken only from the worker that holds it (the sender id the broker
stamps into every message, checked against ``ChannelRef.worker`` by the connection); any other
is dropped and counted (``stats["foreign_frames"]``), so a peer on the bus cannot write into
channels it does not hold.  Around it: the user's connect in a worker (edge/connectrpc.py),
the settling after a broker restart (edge/resync.py), and the clients sent elsewhere when the
bus stays away (edge/busloss.py).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass

from zchannels.bus import wire
from zchannels.bus.timing import BUS_LOSS_TIMEOUT
from zchannels.edge.bus import EdgeBus
from zchannels.edge.busloss import BusLoss
from zchannels.edge.channel import ChannelRef
from zchannels.edge.connection import Connection
from zchannels.edge.connectrpc import ConnectRpc
from zchannels.edge.fastlane import FastLane
from zchannels.edge.recovery import Reads
from zchannels.edge.lphub import LongPollHub
from zchannels.edge.lpsession import FRAME_KIND as LONGPOLL
from zchannels.edge.origin import OriginCheck
from zchannels.edge.replace import Replacer
from zchannels.edge.resync import Resync
from zchannels.edge.status import EdgeStatus, StatusAccess
from zchannels.edge.wsproto import InboundBudget

log = logging.getLogger(__name__)

CLOSE_GOING_AWAY = 1001


@dataclass
class Limits:
    """Per-connection bounds (README's limits table says what happens when one is hit)."""
    max_channels: int = 100
    max_frame_size: int = 1_048_576
    heartbeat_timeout: float = 60.0
    max_outbound: int = 4 * 1_048_576
    max_rate: float = 200.0              # inbound messages a second (token bucket); 0 = no limit
    max_burst: int = 400                 # ... saved up while quiet; 0 = no limit
    longpoll_window: float = 10.0        # longest a LongPoll GET is held
    longpoll_inactivity: float = 15.0    # a LongPoll session nobody polled for this long ends
    max_inbound_buffered: int = 64 * 1_048_576   # unfinished inbound WebSocket messages, whole edge
    compress: bool = False               # offer permessage-deflate to WebSocket clients (wsdeflate)


class EdgeHub:
    def __init__(self, bus: str, limits: Limits, edge_id: bytes | None = None,
                 origin_check: OriginCheck | None = None, status_access: StatusAccess | None = None,
                 bus_loss_timeout: float = BUS_LOSS_TIMEOUT):
        self.bus_addr = bus
        self.limits = limits
        self.origin_check = origin_check or OriginCheck()
        self.status_access = status_access or StatusAccess(None)
        self.edge_id = edge_id or wire.new_peer_id(wire.ROLE_EDGE, f"{os.getpid()}")
        self.connections: dict[bytes, Connection] = {}
        self.worker_channels: dict[bytes, set[ChannelRef]] = {}
        self.known_workers: set[bytes] = set()   # every worker that holds or held a channel of ours
        self.fastlane = FastLane(self.disconnect_socket_id)
        self._ids = itertools.count(1)
        self.bus: EdgeBus | None = None
        self.longpoll: LongPollHub | None = None
        self.stats = {"slow_consumer_closes": 0, "close_aborts": 0, "heartbeat_timeouts": 0,
                      "bad_frames": 0, "rate_limited": 0, "rate_limit_closes": 0, "disconnects": 0,
                      "foreign_frames": 0, "status_refused": 0,
                      "bus_loss_closes": 0, "connect_retries": 0, "join_retries": 0,
                      "late_joins_ended": 0, "sync_timeouts": 0,
                      "outage_replies": 0, "order_given_up": 0, "undelivered": 0}
        self.replacer = Replacer(self)   # connects and joins sent again when their worker is silent
        self.connects = ConnectRpc(self)
        self.resync = Resync(self)
        self.bus_loss = BusLoss(self, bus_loss_timeout)
        self.status_access.stats = self.stats   # page and join refusals, counted together
        # Bytes of unfinished WebSocket messages beyond each connection's free share (wsproto)
        self.inbound_budget = InboundBudget(limits.max_inbound_buffered, self.stats)
        # For the status page (edge/status.py): client frames in and out (fast-lane deliveries
        # are counted by the fast lane), joins answered ok, and workers reported gone:
        # id -> time.time().
        self.frames_in = 0
        self.frames_out = 0
        self.joins = 0
        self.bytes_out = 0      # for /metrics (edge/metrics.py); fast-lane bytes: fastlane.bytes_out
        self.worker_downs: dict[bytes, float] = {}
        self.status: EdgeStatus | None = None
        # What the workers (and, for LongPoll, other edges) send us, by kind; each takes the
        # message as wire.parse names it.
        self._routes = {
            wire.CONNECT_REPLY: self.connects.on_reply,
            wire.JOIN_REPLY: self._on_join_reply,
            wire.REPLY: self._on_reply,
            wire.PUSH: self._on_push,
            wire.CHANNEL_CLOSE: self._on_channel_close,
            wire.CHANNEL_ERROR: self._on_channel_error,
            wire.SYNC: self.resync.on_sync,
            wire.LP_REQUEST: self._on_lp_request,
            wire.LP_RESPONSE: self._on_lp_response,
        }

    def start(self) -> None:
        self.bus = EdgeBus(self.bus_addr, self.edge_id, self.on_direct, self.fastlane.deliver,
                           load=lambda: len(self.connections), on_bus_state=self._bus_state,
                           on_undelivered=self._undelivered)
        self.bus_send = self.bus.send
        self.recovery = Reads(self)
        self.longpoll = LongPollHub(self, self.limits.longpoll_window, self.limits.longpoll_inactivity)
        asyncio.get_running_loop().create_task(self._sweep())
        self.status = EdgeStatus(self)

    def close(self) -> None:
        self.bus_loss.cancel()
        if self.status is not None:
            self.status.close()
        if self.longpoll is not None:
            self.longpoll.close()
        if self.bus is not None:
            self.bus.close()

    def next_conn_id(self) -> bytes:
        return str(next(self._ids)).encode()

    async def connect(self, params: dict, connect_info: dict) -> bytes:
        """Run the user's connect in a worker; the socket JSON, or ConnectRefused."""
        return await self.connects.call(params, connect_info)

    # --- connections ----------------------------------------------------------------
    def add_connection(self, conn: Connection) -> None:
        self.connections[conn.conn_id] = conn
        if conn.id_key is not None:
            # Every connection with this socket id hears its topic (docs/protocol.md §5.1);
            # the bus counts subscribers per key, so it is subscribed once per edge.
            self.fastlane.add_socket(conn)
            self.bus.subscribe(conn.id_key)

    def remove_connection(self, conn: Connection) -> None:
        if self.connections.pop(conn.conn_id, None) is not None and conn.id_key is not None:
            self.fastlane.remove_socket(conn)
            self.bus.unsubscribe(conn.id_key)

    def disconnect_socket_id(self, key: bytes) -> None:
        """A "disconnect" broadcast to a socket id: close every local connection carrying it
        (S20: WebSocket 1001, LongPoll session ended; channels end ("shutdown", "disconnected"))."""
        conns = [c for c in self.fastlane.sockets.get(key, ()) if not c.closed]
        if not conns:
            return
        self.stats["disconnects"] += len(conns)
        log.info("disconnect for socket id %.80r: closing %d connection(s): %s",
                 key[:-1].decode(errors="replace"), len(conns), " ".join(c.label for c in conns[:10]))
        for conn in conns:
            conn.shut_down(CLOSE_GOING_AWAY, "disconnected", b"disconnected")

    # --- a channel's life, as its connection reports it ---------------------------------
    def channel_opened(self, ch: ChannelRef, join: list[bytes]) -> None:
        """The connection added ``ch`` to its table: send its JOIN for placement (and once
        more if no answer comes in time, edge/replace.py)."""
        # Subscribe when the join starts, so the subscription has propagated to the
        # publishers by the time the join reply lets the client expect broadcasts.
        self.bus.subscribe(ch.key)
        self.fastlane.hold(ch)
        self.bus_send(join)
        self.replacer.join_sent(ch, join)

    def channel_joined(self, ch: ChannelRef) -> None:
        """The join's ok is written: index the channel under its worker, and the fast lane
        writes the broadcasts held meanwhile, then the live ones."""
        self.replacer.stop(ch)
        self.worker_channels.setdefault(ch.worker, set()).add(ch)
        self.known_workers.add(ch.worker)
        self.fastlane.add(ch)

    def channel_closed(self, ch: ChannelRef) -> None:
        """The connection removed ``ch`` from its table (left, refused, lost, dropped)."""
        self.replacer.stop(ch)
        self.fastlane.remove(ch)
        self.bus.unsubscribe(ch.key)
        chans = self.worker_channels.get(ch.worker)
        if chans is not None:
            chans.discard(ch)
            if not chans:
                del self.worker_channels[ch.worker]

    def error_channels(self, chans) -> None:
        """Their worker no longer has these channels: each connection forgets its own and its
        client gets phx_error."""
        for ch in chans:
            ch.conn.channel_lost(ch)

    def end_late_join(self, r: wire.JoinReply) -> None:
        """A join ok that nobody waits for (the client left, or the join was sent twice and
        this answers the copy that lost): end that instance in its worker (its terminate runs)."""
        self.stats["late_joins_ended"] += 1
        self.bus_send(wire.terminate(r.peer, r.conn_id, r.topic, r.join_ref, b"closed"))

    # --- frames from the bus ----------------------------------------------------------
    def on_direct(self, frames: list[bytes]) -> None:
        kind = frames[0]
        route = self._routes.get(kind)
        if route is not None:
            try:
                msg = wire.parse(frames)
            except wire.BusFrameError as exc:
                self._bad_frame(frames, str(exc))
                return
            if msg.peer[:1] != wire.SENDER_ROLE[kind]:   # the broker checks it too
                self.foreign(msg, "its sender's role may not send this kind")
                return
            resync = self.resync
            if resync.waiting:
                resync.waiting.pop(msg.peer, None)   # any word from a worker is its answer
            try:
                route(msg)
            except (UnicodeDecodeError, ValueError) as exc:
                self._bad_frame(frames, str(exc))
        elif kind == wire.HISTORY:
            try:
                self.recovery.reads.on_answer(wire.parse(frames))
            except ValueError as exc:   # BusFrameError, a bad number
                self._bad_frame(frames, str(exc))
        elif kind in (wire.WORKER_DOWN, wire.EVICTED, wire.UNROUTABLE):
            try:
                notice = wire.parse(frames)
                if kind == wire.WORKER_DOWN:
                    self.worker_down(notice.peer)
                elif kind == wire.EVICTED:
                    self.evicted()
                else:
                    self._on_unroutable(notice.message())
            except ValueError as exc:   # BusFrameError, UnicodeDecodeError
                self._bad_frame(frames, str(exc))
        else:
            self._bad_frame(frames, "unknown kind")

    def _bad_frame(self, frames: list[bytes], why: str) -> None:
        self.stats["bad_frames"] += 1
        n = self.stats["bad_frames"]
        if n <= 20 or n % 1000 == 0:
            log.warning("dropped bad bus frame %r...: %s (%d so far)", frames[:2], why, n)

    def foreign(self, msg, why: str) -> None:
        """A frame about a channel from a peer that does not hold it: dropped, counted."""
        self.stats["foreign_frames"] += 1
        n = self.stats["foreign_frames"]
        if n <= 20 or n % 1000 == 0:
            log.warning("dropped %s from %r for conn %r: %s (%d so far)", type(msg).__name__,
                        msg.peer[:40], getattr(msg, "conn_id", b"")[:40], why, n)

    def _on_join_reply(self, r: wire.JoinReply) -> None:
        conn = self.connections.get(r.conn_id)
        if conn is not None:
            conn.on_join_reply(r)
        elif r.status == b"ok":   # the client disconnected meanwhile
            self.end_late_join(r)

    def _on_reply(self, r: wire.Reply) -> None:
        conn = self.connections.get(r.conn_id)
        if conn is not None:
            conn.on_reply(r)

    def _on_push(self, p: wire.Push) -> None:
        conn = self.connections.get(p.conn_id)
        if conn is not None:
            conn.on_push(p)

    def _on_channel_close(self, c: wire.ChannelEnd) -> None:
        conn = self.connections.get(c.conn_id)
        if conn is not None:
            conn.on_channel_end(c, error=False)

    def _on_channel_error(self, c: wire.ChannelEnd) -> None:
        conn = self.connections.get(c.conn_id)
        if conn is not None:
            conn.on_channel_end(c, error=True)

    def _on_lp_request(self, r: wire.LpRequest) -> None:
        self.longpoll.on_bus_request(r)

    def _on_lp_response(self, r: wire.LpResponse) -> None:
        self.longpoll.on_bus_response(r)

    def _undelivered(self, frames: list[bytes]) -> None:
        """A message for a worker's inbox that the bus refused (a full queue, over the bus
        limit): a push gets an error reply, the rest is counted and logged."""
        self.stats["undelivered"] += 1
        n = self.stats["undelivered"]
        if n <= 20 or n % 1000 == 0:
            log.warning("a %r for worker %r was not sent: bus queue full or message over the "
                        "bus limit (%d so far)", frames[0], frames[1][:40], n)
        if frames[0] == wire.IN:
            i = wire.parse(frames)
            conn = self.connections.get(i.conn_id)
            if conn is not None:
                conn.push_undelivered(i)

    def _on_unroutable(self, msg) -> None:
        """The broker handed back a message of ours (``msg.peer``: the peer it did not know;
        ``b""``: no worker to place it on)."""
        dest, kind = msg.peer, type(msg)
        if kind is wire.LpRequest:
            self.longpoll.on_unroutable(msg)
        elif kind is wire.LpResponse:
            pass   # the edge that relayed the request is gone, and its client with it
        elif kind is wire.Connect:
            self.connects.unplaced(msg)
        elif kind is wire.Join:
            conn = self.connections.get(msg.conn_id)
            if conn is not None:
                conn.join_unplaced(msg)
        elif kind is wire.In and dest:
            # A push to a worker the broker does not know: the channel gets phx_error with the
            # rest of that worker's, and this push an error reply.
            conn = self.connections.get(msg.conn_id)
            if conn is not None:
                conn.push_unroutable(msg)
            self.worker_down(dest)
        elif kind is wire.Leave:
            conn = self.connections.get(msg.conn_id)
            if conn is not None:
                conn.leave_unanswered(msg)
            if dest:
                self.worker_down(dest)
        elif dest:
            # The worker holding a channel is gone: same as the broker's notice.
            self.worker_down(dest)

    # --- workers gone --------------------------------------------------------------------
    def worker_down(self, worker: bytes) -> None:
        self.worker_downs.setdefault(worker, time.time())
        self.known_workers.discard(worker)
        self.resync.forget(worker)
        chans = self.worker_channels.pop(worker, None)
        if not chans:
            return
        log.warning("worker %s gone: sending phx_error to %d channel(s)",
                    worker.decode(errors="replace"), len(chans))
        self.error_channels(chans)

    def evicted(self) -> None:
        """The broker declared this edge dead while it was only slow, and the workers ended
        its channels: tell every client (phx_error), and phoenix.js rejoins them."""
        conns = list(self.connections.values())
        log.warning("the broker had declared this edge dead; sending phx_error to %d channel(s)",
                    sum(len(conn.channels) for conn in conns))
        self.worker_channels.clear()
        for conn in conns:
            conn.lose_channels()

    # --- the bus down and back ---------------------------------------------------------------
    def _bus_state(self, up: bool) -> None:
        if up:
            self.bus_loss.bus_back()
            self.resync.bus_back()
        else:
            self.connects.bus_down()
            self.bus_loss.bus_down()

    # --- liveness of clients ------------------------------------------------------------
    async def _sweep(self) -> None:
        timeout = self.limits.heartbeat_timeout
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if conn.transport.frame_kind == LONGPOLL:
                    continue   # LongPoll clients send no heartbeats; sessions expire in lphub
                if now - conn.last_recv > timeout:
                    self.stats["heartbeat_timeouts"] += 1
                    log.info("conn %s: nothing received for %.0fs, closing", conn.label, timeout)
                    conn.close(CLOSE_GOING_AWAY, "heartbeat timeout")
