"""Everything one edge knows: its connections, which worker holds which channel,
and the dispatch of frames coming back from workers and the broker.

A frame about a channel is taken only from the worker that holds it (the sender id the
broker stamps into every message, checked against ``ChannelRef.worker``); any other is
dropped and counted (``stats["foreign_frames"]``), so a peer on the bus cannot write into
channels it does not hold."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from dataclasses import dataclass

import orjson

from bus import wire
from bus.timing import BUS_LOSS_DRAIN, BUS_LOSS_TIMEOUT, OUTAGE_REPLY_AFTER, SYNC_ANSWER_TIMEOUT
from edge.bus import EdgeBus
from edge.connection import EMPTY, JOINED, ChannelRef, Connection, ref_bytes, ref_of
from edge.drain import drain
from edge.fastlane import FastLane
from edge.lphub import LongPollHub
from edge.lpsession import FRAME_KIND as LONGPOLL
from edge.origin import OriginCheck
from edge.replace import Replacer
from edge.status import STATUS_TOPIC, TOKEN_PARAM, UNAUTHORIZED, EdgeStatus, StatusAccess
from edge.wsproto import InboundBudget

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0
CLOSE_GOING_AWAY = 1001
LOST_IN_OUTAGE = b'{"reason":"lost in a bus outage"}'


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


class ConnectRefused(Exception):
    """The user's connect refused the client, or no worker could run it."""

    def __init__(self, reason: str, unavailable: bool = False):
        super().__init__(reason)
        self.unavailable = unavailable


class EdgeHub:
    def __init__(self, bus: str, limits: Limits, edge_id: bytes | None = None,
                 origin_check: OriginCheck | None = None, status_access: StatusAccess | None = None,
                 bus_loss_timeout: float = BUS_LOSS_TIMEOUT):
        self.bus_addr = bus
        self.bus_loss_timeout = bus_loss_timeout
        self._bus_loss: asyncio.TimerHandle | None = None
        self.limits = limits
        self.origin_check = origin_check or OriginCheck()
        self.status_access = status_access or StatusAccess(None)
        self.edge_id = edge_id or wire.new_peer_id(wire.ROLE_EDGE, f"{os.getpid()}")
        self.connections: dict[bytes, Connection] = {}
        self.worker_channels: dict[bytes, set[ChannelRef]] = {}
        self.known_workers: set[bytes] = set()   # every worker that holds or held a channel of ours
        self.sync_waiting: dict[bytes, float] = {}   # worker -> deadline of its answer (_sync_workers)
        self.fastlane = FastLane(self.disconnect_socket_id)
        self._ids = itertools.count(1)
        self._rpc: dict[bytes, asyncio.Future] = {}
        self.bus: EdgeBus | None = None
        self.longpoll: LongPollHub | None = None
        self.stats = {"slow_consumer_closes": 0, "close_aborts": 0, "heartbeat_timeouts": 0,
                      "bad_frames": 0, "rate_limited": 0, "rate_limit_closes": 0, "disconnects": 0,
                      "foreign_frames": 0, "status_refused": 0,
                      "bus_loss_closes": 0, "connect_retries": 0, "join_retries": 0,
                      "late_joins_ended": 0, "sync_timeouts": 0,
                      "outage_replies": 0, "order_given_up": 0}
        self.replacer = Replacer(self)   # connects and joins sent again when their worker is silent
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
        self._dispatch = {
            wire.CONNECT_REPLY: self._on_connect_reply,
            wire.JOIN_REPLY: self._on_join_reply,
            wire.REPLY: self._on_reply,
            wire.PUSH: self._on_push,
            wire.CHANNEL_CLOSE: self._on_channel_close,
            wire.CHANNEL_ERROR: self._on_channel_error,
            wire.SYNC: self._on_sync,
            wire.LP_REQUEST: self._on_lp_request,
            wire.LP_RESPONSE: self._on_lp_response,
        }

    def start(self) -> None:
        self.bus = EdgeBus(self.bus_addr, self.edge_id, self.on_direct, self.fastlane.deliver,
                           load=lambda: len(self.connections), on_bus_state=self._bus_state)
        self.bus_send = self.bus.send
        self.longpoll = LongPollHub(self, self.limits.longpoll_window, self.limits.longpoll_inactivity)
        asyncio.get_running_loop().create_task(self._sweep())
        self.status = EdgeStatus(self)

    def close(self) -> None:
        if self._bus_loss is not None:
            self._bus_loss.cancel()
        if self.status is not None:
            self.status.close()
        if self.longpoll is not None:
            self.longpoll.close()
        if self.bus is not None:
            self.bus.close()

    def next_conn_id(self) -> bytes:
        return str(next(self._ids)).encode()

    # --- connect RPC --------------------------------------------------------------
    async def connect(self, params: dict, connect_info: dict) -> bytes:
        """Run the user's connect in a worker; return the socket JSON or raise ConnectRefused."""
        if self.bus.broker_silent:
            raise ConnectRefused("the bus is down", unavailable=True)
        try:
            body = orjson.dumps({"params": params, "connect_info": connect_info})
        except TypeError as exc:
            raise ConnectRefused(f"params not JSON-serialisable: {exc}") from None
        # Unguessable, so only a worker the broker placed the connect on can answer it.  A copy
        # sent again (edge/replace.py) keeps it: the first answer takes the request off _rpc.
        request_id = b"rpc" + self.next_conn_id() + b"-" + os.urandom(8).hex().encode()
        fut = asyncio.get_running_loop().create_future()
        self._rpc[request_id] = fut
        frames = [wire.CONNECT, b"", request_id, body]
        self.bus_send(frames)
        retry = self.replacer.connect_sent(fut, frames)
        try:
            status, body = await asyncio.wait_for(fut, CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            raise ConnectRefused("no worker answered connect in time", unavailable=True) from None
        finally:
            retry.cancel()
            self._rpc.pop(request_id, None)
        if status == b"ok":
            return body
        if status == b"unavailable":
            raise ConnectRefused("no worker available", unavailable=True)
        raise ConnectRefused(body.decode(errors="replace"))

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

    def may_join_status(self, conn: Connection, join_ref, ref, payload) -> bool:
        """A join of ``zchannels:status`` needs the status token in its payload; else the
        error reply {"reason":"unauthorized"} (topic names and pids are for the operator)."""
        token = payload.get(TOKEN_PARAM) if isinstance(payload, dict) else None
        if self.status_access.allows(token):
            return True
        self.status_access.refuse(f"conn {conn.label}", f"join {STATUS_TOPIC}")
        conn.reply(join_ref, ref, STATUS_TOPIC, "error", UNAUTHORIZED)
        return False

    # --- channel bookkeeping --------------------------------------------------------
    def subscribe(self, ch: ChannelRef) -> None:
        # Subscribe when the join starts, so the subscription has propagated to the
        # publishers by the time the join reply lets the client expect broadcasts.
        self.bus.subscribe(ch.key)
        self.fastlane.hold(ch)

    def send_join(self, ch: ChannelRef, frames: list[bytes]) -> None:
        """Send a JOIN for placement, and once more if no answer came in time (edge/replace.py)."""
        self.bus_send(frames)
        self.replacer.join_sent(ch, frames)

    def activate(self, ch: ChannelRef) -> None:
        self.replacer.stop(ch)
        self.fastlane.add(ch)

    def unsubscribe(self, ch: ChannelRef) -> None:
        self.replacer.stop(ch)
        self.fastlane.remove(ch)
        self.bus.unsubscribe(ch.key)

    def remember_worker_channel(self, ch: ChannelRef) -> None:
        self.worker_channels.setdefault(ch.worker, set()).add(ch)
        self.known_workers.add(ch.worker)

    def forget_worker_channel(self, ch: ChannelRef) -> None:
        chans = self.worker_channels.get(ch.worker)
        if chans is not None:
            chans.discard(ch)
            if not chans:
                del self.worker_channels[ch.worker]

    def drop_channel(self, ch: ChannelRef, reason: bytes) -> None:
        """Forget a channel on the edge and tell its worker (connection closed, duplicate join)."""
        self.unsubscribe(ch)
        if ch.state == JOINED and ch.worker:
            self.forget_worker_channel(ch)
            self.bus_send([wire.TERMINATE, ch.worker, ch.conn.conn_id, ch.topic.encode(),
                           ref_bytes(ch.join_ref), reason])
        # A channel still joining is terminated when its join reply finds it gone.

    # --- frames from the bus ----------------------------------------------------------
    def on_direct(self, frames: list[bytes]) -> None:
        kind = frames[0]
        handler = self._dispatch.get(kind)
        if handler is not None:
            if len(frames) != wire.FRAME_COUNTS[kind]:
                self._bad_frame(frames, "wrong frame count")
                return
            if frames[1][:1] != wire.SENDER_ROLE[kind]:   # the broker checks it too
                self._foreign(frames, "its sender's role may not send this kind")
                return
            if self.sync_waiting:
                self.sync_waiting.pop(frames[1], None)   # any word from a worker is its answer
            try:
                handler(frames)
            except (UnicodeDecodeError, ValueError) as exc:
                self._bad_frame(frames, str(exc))
        elif kind == wire.WORKER_DOWN and len(frames) == 2:
            self.worker_down(frames[1])
        elif kind == wire.EVICTED:
            self.evicted()
        elif kind == wire.UNROUTABLE and len(frames) >= 4:
            self._on_unroutable(frames)
        else:
            self._bad_frame(frames, "unknown kind")

    def _bad_frame(self, frames: list[bytes], why: str) -> None:
        self.stats["bad_frames"] += 1
        n = self.stats["bad_frames"]
        if n <= 20 or n % 1000 == 0:
            log.warning("dropped bad bus frame %r...: %s (%d so far)", frames[:2], why, n)

    def _foreign(self, frames: list[bytes], why: str) -> None:
        """A frame about a channel from a peer that does not hold it: dropped, counted."""
        self.stats["foreign_frames"] += 1
        n = self.stats["foreign_frames"]
        if n <= 20 or n % 1000 == 0:
            log.warning("dropped %r from %r for conn %r: %s (%d so far)", frames[0], frames[1][:40],
                        frames[2][:40] if len(frames) > 2 else b"", why, n)

    def _from_holder(self, frames: list[bytes], conn: Connection, topic: str, join_ref: str | None) -> bool:
        """Whether a worker's frame about (conn, topic, join_ref) may pass.  The channel the
        edge holds takes frames only from its worker (frames from the late instance of a join
        sent twice, being ended, are dropped quietly).  One it holds no more (a leave or a
        duplicate join crossed the frame) passes a reply or a close, which the client matches
        by join_ref (the worker's answer to a leave comes that way), but not a push."""
        ch = conn.channels.get(topic)
        if ch is not None:
            if ch.join_ref == join_ref:
                if ch.worker == frames[1]:
                    return True
                if ch.orphan == frames[1]:
                    return False
                self._foreign(frames, f"channel {topic[:60]!r} is held by {ch.worker!r}" if ch.worker
                              else f"channel {topic[:60]!r} is still joining")
                return False
            if join_ref is None:
                # A client takes a frame without join_ref for the current channel of the topic.
                self._foreign(frames, f"no join_ref while {topic[:60]!r} is joined")
                return False
        return frames[0] != wire.PUSH

    def _on_connect_reply(self, frames):
        _, _worker, request_id, status, body = frames
        fut = self._rpc.get(request_id)
        if fut is not None and not fut.done():
            fut.set_result((status, body))

    def _on_join_reply(self, frames):
        _, worker, conn_id, topic_b, join_ref_b, ref_b, status, response, intercept = frames
        conn = self.connections.get(conn_id)
        topic = topic_b.decode()
        join_ref = ref_of(join_ref_b)
        ch = conn.channels.get(topic) if conn is not None else None
        if ch is not None and ch.join_ref == join_ref and ch.state != JOINED:
            conn.joined(ch, worker, ref_of(ref_b), status.decode(), response, intercept)
            return
        # A join no longer waiting: the client left or disconnected meanwhile, or the join was
        # sent twice (edge/replace.py) and this answers the copy that lost.
        current = ch is not None and ch.join_ref == join_ref
        if current and ch.worker == worker:
            # Both copies reached the worker that holds the channel: a worker keeps one
            # instance per channel (its second join replaced the first), the one we hold,
            # unless that second join failed and left none.
            if status != b"ok":
                self.forget_worker_channel(ch)
                self._error_channels([ch])
            return
        if status == b"ok":   # end the orphan instance (its terminate runs)
            self.stats["late_joins_ended"] += 1
            if current:
                ch.orphan = worker
            self.bus_send([wire.TERMINATE, worker, conn_id, topic_b, join_ref_b, b"closed"])

    def _on_reply(self, frames):
        _, _worker, conn_id, topic_b, join_ref, ref, status, response, fmt = frames
        conn = self.connections.get(conn_id)
        if conn is not None:
            topic, join_ref = topic_b.decode(), ref_of(join_ref)
            ch = conn.channels.get(topic)
            if ch is not None and ch.join_ref == join_ref and ch.worker == frames[1]:
                if ch.pending:      # the common case, answered by the channel's own worker
                    ch.pending.pop(ref, None)
            elif not self._from_holder(frames, conn, topic, join_ref):
                return
            conn.reply(join_ref, ref_of(ref), topic, status.decode(), response, fmt)

    def _on_push(self, frames):
        _, _worker, conn_id, topic_b, join_ref, event, payload, fmt = frames
        conn = self.connections.get(conn_id)
        if conn is not None:
            topic = topic_b.decode()
            ch = conn.channels.get(topic)
            if ch is None or ch.worker != frames[1] or ch.join_ref != ref_of(join_ref):
                self._from_holder(frames, conn, topic, ref_of(join_ref))   # counts a foreign one
                return
            try:
                conn.send(conn.serializer.encode_push(ch.join_ref, topic, event.decode(), payload, fmt))
            except ValueError as exc:
                log.info("conn %s: push %s not sent: %s", conn.label, event[:60], exc)

    def _on_channel_close(self, frames, error=False):
        _, _worker, conn_id, topic_b, join_ref = frames
        conn = self.connections.get(conn_id)
        if conn is not None:
            topic = topic_b.decode()
            if self._from_holder(frames, conn, topic, ref_of(join_ref)):
                conn.channel_gone(topic, ref_of(join_ref), error)

    def _on_channel_error(self, frames):
        self._on_channel_close(frames, error=True)

    def _on_lp_request(self, frames):
        self.longpoll.on_bus_request(frames)

    def _on_lp_response(self, frames):
        self.longpoll.on_bus_response(frames)

    def _on_unroutable(self, frames):
        dest, kind = frames[1], frames[2]
        fields = frames[3:]
        if kind == wire.LP_REQUEST:
            self.longpoll.on_unroutable(fields)
        elif kind == wire.LP_RESPONSE:
            pass   # the edge that relayed the request is gone, and its client with it
        elif kind == wire.CONNECT and fields:
            fut = self._rpc.get(fields[0])
            if fut is not None and not fut.done():
                fut.set_result((b"unavailable", b""))
        elif kind == wire.JOIN and len(fields) >= 4:
            conn = self.connections.get(fields[0])
            ch = conn.channels.get(fields[1].decode()) if conn is not None else None
            if ch is not None and ch.join_ref == ref_of(fields[2]):
                conn.join_failed(ch, ref_of(fields[3]))
        elif kind == wire.IN and dest and len(fields) >= 4:
            # A push to a worker the broker does not know (it died while the broker was down,
            # say): the channel gets phx_error with the rest of that worker's, and this push
            # an error reply, even if its ref had left the pending list.
            conn = self.connections.get(fields[0])
            ch = conn.channels.get(fields[1].decode()) if conn is not None else None
            if ch is not None and ch.worker == dest and ref_bytes(ch.join_ref) == fields[2] and fields[3]:
                if ch.pending is None:
                    ch.pending = {}
                ch.pending[fields[3]] = None
            self.worker_down(dest)
        elif kind == wire.LEAVE and len(fields) >= 4:
            # The edge forgot the channel when it sent the leave; the worker that would have
            # answered it (ok, then phx_close) is gone, so the edge answers for it.
            conn = self.connections.get(fields[0])
            if conn is not None:
                topic, join_ref = fields[1].decode(), ref_of(fields[2])
                conn.reply(join_ref, ref_of(fields[3]), topic, "ok", EMPTY)
                conn.send(conn.serializer.encode_close(join_ref, topic))
            if dest:
                self.worker_down(dest)
        elif dest:
            # The worker holding a channel is gone: same as the broker's notice.
            self.worker_down(dest)

    def _on_sync(self, frames):
        """A worker lists the channels of ours it holds, after a broker restart that may have
        lost messages: end there those we no longer have (our TERMINATE was lost), error here
        those it no longer has (its close was lost; phoenix.js rejoins)."""
        _, worker, data = frames
        listed = wire.unpack_channel_list(data)
        orphans = 0
        for conn_id, topic_b, join_ref in listed:
            conn = self.connections.get(conn_id)
            ch = conn.channels.get(topic_b.decode()) if conn is not None else None
            if (ch is None or ref_bytes(ch.join_ref) != join_ref
                    or (ch.state == JOINED and ch.worker != worker)):   # the loser of a join sent twice
                orphans += 1
                self.bus_send([wire.TERMINATE, worker, conn_id, topic_b, join_ref, b"closed"])
        lost = [ch for ch in self.worker_channels.get(worker, ())
                if (ch.conn.conn_id, ch.topic.encode(), ref_bytes(ch.join_ref)) not in listed]
        for ch in lost:
            self.forget_worker_channel(ch)
        if orphans or lost:
            log.warning("worker %s after the broker restart: ending %d channel(s) it still held, "
                        "phx_error for %d it had lost", worker.decode(errors="replace"), orphans, len(lost))
        self._error_channels(lost)

    def worker_down(self, worker: bytes) -> None:
        self.worker_downs.setdefault(worker, time.time())
        self.known_workers.discard(worker)
        self.sync_waiting.pop(worker, None)
        chans = self.worker_channels.pop(worker, None)
        if not chans:
            return
        log.warning("worker %s gone: sending phx_error to %d channel(s)",
                    worker.decode(errors="replace"), len(chans))
        self._error_channels(chans)

    def _error_channels(self, chans) -> None:
        """Forget these channels (their worker no longer has them) and send each phx_error."""
        for ch in chans:
            conn = ch.conn
            if conn.channels.get(ch.topic) is ch:
                del conn.channels[ch.topic]
                self.unsubscribe(ch)
            conn.lost(ch)

    def evicted(self) -> None:
        """The broker declared this edge dead while it was only slow, and the workers ended
        its channels: tell every client (phx_error), and phoenix.js rejoins them."""
        channels = [ch for conn in self.connections.values() for ch in conn.channels.values()]
        log.warning("the broker had declared this edge dead; sending phx_error to %d channel(s)",
                    len(channels))
        self.worker_channels.clear()
        for ch in channels:
            conn = ch.conn
            del conn.channels[ch.topic]
            self.unsubscribe(ch)
            conn.lost(ch)

    # --- loss of the bus ---------------------------------------------------------------------
    def _bus_state(self, up: bool) -> None:
        if up:
            if self._bus_loss is not None:
                self._bus_loss.cancel()
                self._bus_loss = None
            self._sync_workers()
            return
        for fut in self._rpc.values():   # connects waiting for a worker: 503 now, not in 5 s
            if not fut.done():
                fut.set_result((b"unavailable", b""))
        if self.bus_loss_timeout > 0:
            delay = max(0.0, self.bus_loss_timeout - self.bus.silent_for())
            self._bus_loss = asyncio.get_running_loop().call_later(delay, self._bus_lost)

    def _sync_workers(self) -> None:
        """Back on the bus after a silence (a cut link) or with a new broker instance: messages
        may have been lost both ways, as in a broker restart (see _on_sync).  Tell every worker we
        have had channels on which channels we have (joined or joining, anywhere); each ends those
        of ours it holds that we do not list (our TERMINATE was lost) and answers with its own
        SYNC, which errors here those it no longer has (its close was lost).  A worker holding
        channels of ours that sends nothing within SYNC_ANSWER_TIMEOUT is taken for dead
        (_sync_overdue)."""
        workers = self.known_workers | self.worker_channels.keys()
        if not workers:
            return
        ours = wire.pack_channel_list([(conn.conn_id, ch.topic.encode(), ref_bytes(ch.join_ref))
                                       for conn in self.connections.values()
                                       for ch in conn.channels.values()])
        for worker in workers:
            self.bus_send([wire.EDGE_SYNC, worker, ours])
        in_flight = [(conn, ch, list(ch.pending)) for conn in self.connections.values()
                     for ch in conn.channels.values() if ch.pending]
        if in_flight:
            asyncio.get_running_loop().call_later(OUTAGE_REPLY_AFTER, self._answer_lost_pushes, in_flight)
        log.info("back on the bus: told %d worker(s) which channels this edge has", len(workers))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SYNC_ANSWER_TIMEOUT
        # A second round before the first one's answers keeps the first deadline: the same
        # worker is no more likely to be alive for being asked twice.
        waiting = self.sync_waiting
        asked = [w for w in self.worker_channels if waiting.setdefault(w, deadline) == deadline]
        if asked:
            loop.call_later(SYNC_ANSWER_TIMEOUT, self._sync_overdue)

    def _answer_lost_pushes(self, in_flight) -> None:
        """Pushes that were waiting when the bus came back and are still unanswered now: lost in
        the outage, or their handler takes longer than OUTAGE_REPLY_AFTER (its late reply is then
        one phoenix.js ignores).  Either way the client gets an error reply instead of a timeout."""
        answered = 0
        for conn, ch, refs in in_flight:
            if conn.closed or conn.channels.get(ch.topic) is not ch or not ch.pending:
                continue
            for ref in refs:
                if ref in ch.pending:
                    del ch.pending[ref]
                    conn.reply(ch.join_ref, ref_of(ref), ch.topic, "error", LOST_IN_OUTAGE)
                    answered += 1
        if answered:
            self.stats["outage_replies"] += answered
            log.warning("%d push(es) sent before the bus outage still unanswered %.0fs after it: "
                        "answered with an error", answered, OUTAGE_REPLY_AFTER)

    def _sync_overdue(self) -> None:
        """Give up on the workers that have not answered the edge's EDGE_SYNC in time: their channels
        get phx_error, as for WORKER_DOWN, and each a TERMINATE, so a worker that was only slow
        (a blocked loop) ends the instances the clients are rejoining elsewhere.  Its own SYNC,
        when it comes, would end them too (the edge answers TERMINATE for what it no longer
        has), so either way no instance is left behind."""
        now = asyncio.get_running_loop().time()
        for worker in [w for w, deadline in self.sync_waiting.items() if deadline <= now + 0.01]:
            del self.sync_waiting[worker]
            chans = self.worker_channels.pop(worker, None)
            if not chans:
                continue
            self.stats["sync_timeouts"] += 1
            log.warning("worker %s said nothing for %.1fs after the bus came back: taking it for "
                        "gone, phx_error to %d channel(s)", worker.decode(errors="replace"),
                        SYNC_ANSWER_TIMEOUT, len(chans))
            for ch in chans:
                self.bus_send([wire.TERMINATE, worker, ch.conn.conn_id, ch.topic.encode(),
                               ref_bytes(ch.join_ref), b"closed"])
            self._error_channels(chans)

    def _bus_lost(self) -> None:
        """The bus has been down for bus_loss_timeout: send the clients elsewhere (unless it
        comes back meanwhile)."""
        self._bus_loss = None
        if not self.bus.broker_silent or not self.connections:
            return
        log.warning("no broker for %.0fs: closing %d client connection(s) (1012) so they reconnect "
                    "to an edge that has the bus", self.bus.silent_for(), len(self.connections))
        asyncio.get_running_loop().create_task(self._close_for_bus_loss())

    async def _close_for_bus_loss(self) -> None:
        self.stats["bus_loss_closes"] += await drain(
            self, BUS_LOSS_DRAIN, "bus unreachable", stop=lambda: not self.bus.broker_silent)

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
                    conn.transport.close(CLOSE_GOING_AWAY, "heartbeat timeout")

