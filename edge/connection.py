"""One client connection, whatever its transport (Phoenix's ``socket.ex``).

It owns the connection's channels (topic -> ``ChannelRef``), turns decoded
client messages into bus frames for the workers, and is the single place that
writes Phoenix frames back to the client.  Transports only move bytes: they
hand in decoded ``Message``s and expose ``send(data, binary)``,
``send_prebuilt(frame)`` and ``close(code, reason)``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

import orjson

from bus import wire
from edge.ratelimit import CLOSE_POLICY_VIOLATION, RATE_LIMITED, bucket_for
from edge.serializer import Message

if TYPE_CHECKING:
    from edge.hub import EdgeHub

log = logging.getLogger(__name__)

EMPTY = b"{}"
UNMATCHED = b'{"reason":"unmatched topic"}'
TOO_MANY = b'{"reason":"too many channels joined"}'
NO_WORKER = b'{"reason":"no worker available"}'
INVALID_TOPIC = b'{"reason":"invalid topic"}'
LOST = b'{"reason":"channel lost"}'
MAX_PENDING_REPLIES = 64     # refs remembered per channel for the error replies of a lost one
MAX_BUFFERED_WHILE_JOINING = 100
MAX_TOPIC_BYTES = 255
# Messages that arrive while a join of the connection is pending wait for its reply (see
# Connection.handle), at most this many and, each batch, at most this long: a join is answered
# (ok, error, or "no worker available") within a few seconds, and a client pipelining more than
# this behind one join is not waiting for it.  Past either bound they go on without it.
MAX_HELD = 256
MAX_HOLD_SECONDS = 5.0

JOINING, JOINED = 0, 1


class ChannelRef:
    """The edge's view of one joined channel instance (connection x topic x join_ref)."""
    __slots__ = ("conn", "topic", "key", "join_ref", "worker", "state", "intercept",
                 "replaces", "buffered", "early", "pending", "retry", "orphan")

    def __init__(self, conn: "Connection", topic: str, join_ref: str | None):
        self.conn = conn
        self.topic = topic
        self.key = wire.topic_key(topic)
        self.join_ref = join_ref
        self.worker: bytes | None = None
        self.state = JOINING
        self.intercept: frozenset[str] = frozenset()
        self.replaces: str | None = None          # join_ref of a duplicate join's old instance
        self.buffered: list[Message] | None = None     # pushes while joining
        self.early: list[list[bytes]] | None = None    # broadcasts while joining (edge/fastlane.py)
        # Refs (bus form) of pushes sent to the worker and not answered yet, oldest first: if
        # the instance is lost they get an error reply instead of phoenix.js's 10 s timeout.
        self.pending: dict[bytes, None] | None = None
        # The timer that sends the JOIN again if no worker answers it in time (edge/replace.py),
        # and the worker whose late ok to that second copy (or the first) is being ended: its
        # frames about this channel are dropped quietly, they are not an intruder's.
        self.retry = None
        self.orphan: bytes | None = None


class Held:
    """Messages read while a join was pending, in order, and the timer that bounds their wait."""
    __slots__ = ("messages", "timer")

    def __init__(self, timer: asyncio.TimerHandle):
        self.messages: deque[Message] = deque()
        self.timer = timer


class Connection:
    __slots__ = ("hub", "serializer", "transport", "socket_json", "label", "conn_id", "origin",
                 "channels", "last_recv", "closed", "fmt_key", "id_key", "bucket",
                 "awaiting", "held", "__weakref__")

    def __init__(self, hub: "EdgeHub", serializer, transport, socket_json: bytes, label: str):
        self.hub = hub
        self.serializer = serializer
        self.transport = transport
        self.socket_json = socket_json      # {"assigns": ..., "id": ...} from the worker's connect
        self.label = label                  # for log lines: peer address
        self.conn_id = hub.next_conn_id()
        self.origin = wire.origin_of(hub.edge_id, self.conn_id)
        self.channels: dict[str, ChannelRef] = {}
        self.last_recv = time.monotonic()
        self.closed = False
        self.fmt_key = (serializer, transport.frame_kind)
        self.id_key = socket_id_key(socket_json)     # the socket id's topic key, for "disconnect"
        self.bucket = bucket_for(hub.limits.max_rate, hub.limits.max_burst, self.last_recv)
        self.awaiting: ChannelRef | None = None   # the join whose reply the next message waits for
        self.held: Held | None = None

    # --- writing --------------------------------------------------------------
    def send(self, encoded: tuple[bytes, bool]) -> None:
        if not self.closed:
            hub = self.hub
            hub.frames_out += 1
            hub.bytes_out += len(encoded[0])   # Phoenix message bytes, before transport framing
            self.transport.send(*encoded)

    def reply(self, join_ref, ref, topic, status: str, response: bytes, fmt: bytes = wire.JSON) -> None:
        self.send(self.serializer.encode_reply(join_ref, ref, topic, status, response, fmt))

    # --- reading ----------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """One decoded client message, from either transport.

        While a join of this connection is pending, later messages wait for its reply, as in
        Phoenix, whose socket process runs a join to its reply before it reads the next
        message (Phoenix.Socket.__in__ -> Phoenix.Channel.Server.join/4 blocks in `receive`).
        So the replies to a LongPoll POST, or to frames pipelined on a WebSocket, come back
        in the order of their messages even where the edge answers by itself (heartbeats,
        unmatched topics, rate limits) and the join goes to a worker.  Joins of one
        connection therefore run one after the other, as in Phoenix."""
        now = self.last_recv = time.monotonic()
        self.hub.frames_in += 1
        if self.awaiting is not None:
            self.hold(msg)
            return
        self.dispatch(msg, now)

    def dispatch(self, msg: Message, now: float) -> None:
        event = msg.event
        if event == "heartbeat" and msg.topic == "phoenix":
            self.reply(None, msg.ref, "phoenix", "ok", EMPTY)
        elif event == "phx_leave":
            self.leave(msg)
        elif self.bucket is not None and not self.bucket.take(now):
            self.rate_limited(msg, now)
        elif event == "phx_join":
            self.join(msg)
        else:
            self.push_in(msg)

    def rate_limited(self, msg: Message, now: float) -> None:
        """Over --max-rate: an error reply, or close with 1008 if the client keeps going (ratelimit.py)."""
        if not self.refuse(now):
            self.reply(msg.join_ref, msg.ref, msg.topic, "error", RATE_LIMITED)

    def control_in(self) -> bool:
        """A WebSocket ping or pong came: True when it is within --max-rate (answer the ping).
        It takes a token like a message; over the rate it goes unanswered, as no Phoenix frame
        can refuse it, and counts as refused, so a ping flood is closed with 1008."""
        bucket = self.bucket
        if bucket is None:
            return True
        now = time.monotonic()
        if bucket.take(now):
            return True
        self.refuse(now)
        return False

    def refuse(self, now: float) -> bool:
        """Count a message refused for the rate; True when it closed the connection (1008)."""
        stats = self.hub.stats
        stats["rate_limited"] += 1
        first, close = self.bucket.refuse(now)
        if close:
            stats["rate_limit_closes"] += 1
            log.info("conn %s: still over %g messages/s after being refused; closing with %d",
                     self.label, self.bucket.rate, CLOSE_POLICY_VIOLATION)
            self.transport.close(CLOSE_POLICY_VIOLATION, "rate limit exceeded")
            return True
        if first:
            log.info("conn %s: over %g messages/s (burst %g); refusing messages", self.label,
                     self.bucket.rate, self.bucket.burst)
        return False

    # --- messages waiting for a pending join ------------------------------------------
    def hold(self, msg: Message) -> None:
        held = self.held
        if held is None:
            timer = asyncio.get_running_loop().call_later(MAX_HOLD_SECONDS, self.stop_holding)
            held = self.held = Held(timer)
        elif len(held.messages) >= MAX_HELD:
            self.order_given_up(f"{MAX_HELD} messages are waiting for it")
            self.dispatch(msg, time.monotonic())   # handled now, out of order
            return
        held.messages.append(msg)

    def release(self) -> None:
        """The awaited join is answered (its reply written): handle what waited for it, in
        order, until one of those is a join that is pending in turn."""
        self.awaiting = None
        held, self.held = self.held, None
        if held is None:
            return
        held.timer.cancel()
        messages = held.messages
        while messages and not self.closed:
            self.dispatch(messages.popleft(), time.monotonic())
            if self.awaiting is not None and messages:   # the rest waits for that join
                held.timer = asyncio.get_running_loop().call_later(MAX_HOLD_SECONDS, self.stop_holding)
                self.held = held
                return

    def stop_holding(self) -> None:
        """MAX_HOLD_SECONDS passed and the awaited join is still unanswered."""
        self.order_given_up(f"it is unanswered after {MAX_HOLD_SECONDS:g}s")
        self.release()

    def order_given_up(self, why: str) -> None:
        stats = self.hub.stats
        n = stats["order_given_up"] = stats["order_given_up"] + 1
        if n <= 20 or n % 1000 == 0:
            ch = self.awaiting
            log.info("conn %s: messages no longer wait for the join of %.60r: %s (%d so far)",
                     self.label, ch.topic if ch is not None else "", why, n)

    def join(self, msg: Message) -> None:
        topic = msg.topic
        if "\x00" in topic or len(topic.encode()) > MAX_TOPIC_BYTES:
            self.reply(None, msg.ref, topic, "error", INVALID_TOPIC)
            log.info("conn %s: join refused, invalid topic %.60r", self.label, topic)
            return
        if topic == wire.STATUS_TOPIC and not self.hub.may_join_status(self, msg.join_ref, msg.ref, msg.payload):
            return
        payload = EMPTY if msg.binary else orjson.dumps(msg.payload)
        old = self.channels.pop(topic, None)
        if old is None and len(self.channels) >= self.hub.limits.max_channels:
            self.reply(msg.join_ref, msg.ref, topic, "error", TOO_MANY)
            return
        ch = ChannelRef(self, topic, msg.join_ref)
        if old is not None:
            ch.replaces = old.join_ref
            self.hub.drop_channel(old, reason=b"duplicate_join")
        if self.awaiting is None or self.awaiting is old:
            self.awaiting = ch
        self.channels[topic] = ch
        self.hub.subscribe(ch)
        self.hub.send_join(ch, [wire.JOIN, b"", self.conn_id, topic.encode(),
                                ref_bytes(msg.join_ref), ref_bytes(msg.ref), self.socket_json, payload])

    def leave(self, msg: Message) -> None:
        ch = self.channels.get(msg.topic)
        if ch is None:
            self.reply(msg.join_ref, msg.ref, msg.topic, "ok", EMPTY)          # S11
            return
        if msg.join_ref is not None and msg.join_ref != ch.join_ref:
            return                                                             # S10
        del self.channels[msg.topic]
        self.hub.unsubscribe(ch)
        if ch.state == JOINED and ch.worker is not None:
            # The worker runs terminate, replies ok and sends phx_close.
            self.hub.forget_worker_channel(ch)
            self.hub.bus_send([wire.LEAVE, ch.worker, self.conn_id, msg.topic.encode(),
                               ref_bytes(ch.join_ref), ref_bytes(msg.ref)])
        else:
            # Still joining: answer for the channel; a late join ok gets terminated.
            self.reply(ch.join_ref, msg.ref, msg.topic, "ok", EMPTY)
            self.send(self.serializer.encode_close(ch.join_ref, msg.topic))
            if self.awaiting is ch:   # (a leave read past MAX_HELD): its reply will never come
                self.release()

    def push_in(self, msg: Message) -> None:
        ch = self.channels.get(msg.topic)
        if ch is None:
            self.reply(None, msg.ref, msg.topic, "error", UNMATCHED)           # S14
            return
        if msg.join_ref is not None and msg.join_ref != ch.join_ref:
            return                                                             # S13
        if ch.state == JOINING:
            if ch.buffered is None:
                ch.buffered = []
            if len(ch.buffered) < MAX_BUFFERED_WHILE_JOINING:
                ch.buffered.append(msg)
            else:
                self.reply(msg.join_ref, msg.ref, msg.topic, "error", b'{"reason":"join pending"}')
            return
        if msg.binary:
            payload, fmt = msg.payload, wire.BINARY
        else:
            payload, fmt = orjson.dumps(msg.payload), wire.JSON
        ref = ref_bytes(msg.ref)
        self.hub.bus_send([wire.IN, ch.worker, self.conn_id, msg.topic.encode(), ref_bytes(ch.join_ref),
                           ref, msg.event.encode(), payload, fmt])
        if ref:
            pending = ch.pending
            if pending is None:
                pending = ch.pending = {}
            elif len(pending) >= MAX_PENDING_REPLIES:   # handlers that never reply (noreply)
                del pending[next(iter(pending))]
            pending[ref] = None

    # --- answers from workers -----------------------------------------------------
    def joined(self, ch: ChannelRef, worker: bytes, ref: str | None, status: str,
               response: bytes, intercept: bytes) -> None:
        topic = ch.topic
        if status == "ok":
            ch.state = JOINED
            ch.worker = worker
            try:
                events = orjson.loads(intercept)
                ch.intercept = frozenset(e for e in events if isinstance(e, str))
            except orjson.JSONDecodeError:
                log.warning("worker %r sent a bad intercept list for %s", worker, topic)
            self.hub.remember_worker_channel(ch)
            self.hub.joins += 1
            self.reply(ch.join_ref, ref, topic, "ok", response)
            self.hub.activate(ch)   # after the reply: broadcasts held meanwhile come next
        else:
            del self.channels[topic]
            self.hub.unsubscribe(ch)
            join_ref = None if response == UNMATCHED else ch.join_ref           # S7
            self.reply(join_ref, ref, topic, status, response)
        if ch.replaces is not None:
            self.send(self.serializer.encode_close(ch.replaces, topic))         # S8, after the reply
            ch.replaces = None
        buffered, ch.buffered = ch.buffered, None
        for msg in buffered or ():
            self.push_in(msg) if status == "ok" else self.reply(None, msg.ref, topic, "error", UNMATCHED)
        if self.awaiting is ch:
            self.release()

    def channel_gone(self, topic: str, join_ref: str | None, error: bool) -> None:
        """A worker closed (phx_close) or lost (phx_error) a channel instance."""
        ch = self.channels.get(topic)
        if ch is not None and ch.join_ref == join_ref:
            del self.channels[topic]
            self.hub.unsubscribe(ch)
            self.hub.forget_worker_channel(ch)
            if error:
                self.lost(ch)
                return
        encode = self.serializer.encode_error if error else self.serializer.encode_close
        self.send(encode(join_ref, topic))

    def lost(self, ch: ChannelRef) -> None:
        """The channel instance ended without answering (its handler crashed or its worker
        died): every push still waiting gets an error reply, then the channel phx_error, and
        phoenix.js rejoins.  Phoenix leaves such pushes to time out on the client."""
        pending, ch.pending = ch.pending, None
        for ref in pending or ():
            self.reply(ch.join_ref, ref_of(ref), ch.topic, "error", LOST)
        self.send(self.serializer.encode_error(ch.join_ref, ch.topic))
        if self.awaiting is ch:   # lost while joining (the broker evicted this edge)
            self.release()

    def join_failed(self, ch: ChannelRef, ref: str | None) -> None:
        """The broker could not place the join (no live worker): the client gets the error
        reply now, and phoenix.js retries on its rejoin schedule."""
        self.joined(ch, b"", ref, "error", NO_WORKER, b"[]")

    # --- end of the connection ------------------------------------------------------
    def shut_down(self, code: int, why: str, terminate_reason: bytes) -> None:
        """End the connection from the server side (e.g. a "disconnect" broadcast to its socket
        id): its channels terminate with ("shutdown", terminate_reason), then the transport
        closes with `code` (a LongPoll session just ends; its next request gets 410)."""
        if self.closed:
            return
        for ch in list(self.channels.values()):
            self.hub.drop_channel(ch, reason=terminate_reason)
        self.channels.clear()
        self.transport.close(code, why)

    def on_transport_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.awaiting = None
        held, self.held = self.held, None
        if held is not None:
            held.timer.cancel()
        for ch in list(self.channels.values()):
            self.hub.drop_channel(ch, reason=b"closed")
        self.channels.clear()
        self.hub.remove_connection(self)


def socket_id_key(socket_json: bytes) -> bytes | None:
    """The topic key of the socket id in the worker's connect answer; None for no id."""
    try:
        sid = orjson.loads(socket_json).get("id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(sid, str) or not sid:
        return None
    if "\x00" in sid:
        log.warning("socket id %.60r contains NUL; it cannot be a topic, ignored", sid)
        return None
    return wire.topic_key(sid)


ref_bytes = wire.encode_ref   # refs travel as bytes on the bus, any JSON type kept
ref_of = wire.decode_ref
