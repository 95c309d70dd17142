"""One client connection, whatever its transport (Phoenix's ``socket.ex``).

It owns the connection's channels (topic -> ``ChannelRef``): only its own methods add or
remove one.  It turns decoded client messages into bus messages for the workers, and the
workers' answers, which the hub (edge/hub.py) routes here by connection id, into Phoenix
frames: it writes everything its client gets, except broadcasts, which the fast lane
(edge/fastlane.py) frames once per wire format and writes to every subscriber.  Its
serializer and transport (edge/transport.py) only translate and move bytes: the transport
hands in decoded ``Message``s and takes frames.

A channel asks the hub one thing at each step of its life: ``channel_opened`` when its join
goes out (subscribe to the topic, hold its broadcasts, send the join again if no worker
answers), ``channel_joined`` once the join's ok is written (the held broadcasts, then live
ones), and ``channel_closed`` when it ends, however it ends.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import orjson

from zchannels.bus import wire
from zchannels.edge.channel import JOINED, JOINING, ChannelRef
from zchannels.edge.fastlane import socket_id_key
from zchannels.edge.holding import HeldMessages, hold
from zchannels.edge.recovery import ChannelRecovery, wants_recovery
from zchannels.edge.ratelimit import CLOSE_POLICY_VIOLATION, RATE_LIMITED, bucket_for
from zchannels.edge.serializer import Message
from zchannels.edge.status import TOKEN_PARAM, UNAUTHORIZED

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub
    from zchannels.edge.transport import Serializer, Transport

log = logging.getLogger(__name__)

EMPTY = b"{}"
UNMATCHED = b'{"reason":"unmatched topic"}'
TOO_MANY = b'{"reason":"too many channels joined"}'
NO_WORKER = b'{"reason":"no worker available"}'
INVALID_TOPIC = b'{"reason":"invalid topic"}'
JOIN_PENDING = b'{"reason":"join pending"}'
LOST = b'{"reason":"channel lost"}'
CLOSING = b'{"reason":"connection closing"}'   # the server ends the connection
BUS_FULL = b'{"reason":"bus queue full"}'     # the push could not be sent to its worker
MAX_PENDING_REPLIES = 64     # refs remembered per channel for the error replies of a lost one
MAX_BUFFERED_WHILE_JOINING = 100
MAX_TOPIC_BYTES = 255


class Connection:
    __slots__ = ("hub", "serializer", "transport", "socket_json", "label", "conn_id", "origin",
                 "channels", "last_recv", "closed", "fmt_key", "id_key", "bucket",
                 "awaiting", "held", "__weakref__")

    def __init__(self, hub: "EdgeHub", serializer: "Serializer", transport: "Transport",
                 socket_json: bytes, label: str):
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
        self.held: HeldMessages | None = None     # ... and the messages waiting for it

    # --- writing --------------------------------------------------------------
    def send(self, encoded: tuple[bytes, bool]) -> None:
        if not self.closed:
            hub = self.hub
            hub.frames_out += 1
            hub.bytes_out += len(encoded[0])   # Phoenix message bytes, before transport framing
            self.transport.send(*encoded)

    def reply(self, join_ref, ref, topic, status: str, response: bytes, fmt: bytes = wire.JSON) -> None:
        self.send(self.serializer.encode_reply(join_ref, ref, topic, status, response, fmt))

    def close(self, code: int, reason: str) -> None:
        """Close the transport (a WebSocket close frame; a LongPoll session ends)."""
        self.transport.close(code, reason)

    # --- reading ----------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """One decoded client message, from either transport.  While a join of this
        connection is pending, later messages wait for its reply, in order, as in Phoenix
        (edge/holding.py): joins of one connection run one after the other."""
        now = self.last_recv = time.monotonic()
        self.hub.frames_in += 1
        if self.awaiting is not None:
            hold(self, msg)
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
            self.close(CLOSE_POLICY_VIOLATION, "rate limit exceeded")
            return True
        if first:
            log.info("conn %s: over %g messages/s (burst %g); refusing messages", self.label,
                     self.bucket.rate, self.bucket.burst)
        return False

    def release(self) -> None:
        """The awaited join is answered (its reply written): handle what waited for it."""
        self.awaiting = None
        if self.held is not None:
            self.held.release()

    def join(self, msg: Message) -> None:
        topic = msg.topic
        if "\x00" in topic or len(topic.encode()) > MAX_TOPIC_BYTES:
            self.reply(None, msg.ref, topic, "error", INVALID_TOPIC)
            log.info("conn %s: join refused, invalid topic %.60r", self.label, topic)
            return
        if topic == wire.STATUS_TOPIC and not self.may_join_status(msg):
            return
        payload = EMPTY if msg.binary else orjson.dumps(msg.payload)
        old = self.channels.pop(topic, None)
        if old is None and len(self.channels) >= self.hub.limits.max_channels:
            self.reply(msg.join_ref, msg.ref, topic, "error", TOO_MANY)
            return
        ch = ChannelRef(self, topic, msg.join_ref)
        if old is not None:
            ch.replaces = old.join_ref
            self.drop(old, reason=b"duplicate_join")
        if self.awaiting is None or self.awaiting is old:
            self.awaiting = ch
        self.channels[topic] = ch
        if wants_recovery(self.hub, topic, msg.payload):
            ch.recovery = ChannelRecovery(self.hub, ch, msg.payload)
        self.hub.channel_opened(ch, wire.join(b"", self.conn_id, topic.encode(), ref_bytes(msg.join_ref),
                                              ref_bytes(msg.ref), self.socket_json, payload))

    def may_join_status(self, msg: Message) -> bool:
        """A join of ``zchannels:status`` needs the status token in its payload; else the
        error reply {"reason":"unauthorized"} (topic names and pids are for the operator)."""
        payload = msg.payload
        token = payload.get(TOKEN_PARAM) if isinstance(payload, dict) else None
        access = self.hub.status_access
        if access.allows(token):
            return True
        access.refuse(f"conn {self.label}", f"join {wire.STATUS_TOPIC}")
        self.reply(msg.join_ref, msg.ref, wire.STATUS_TOPIC, "error", UNAUTHORIZED)
        return False

    def leave(self, msg: Message) -> None:
        ch = self.channels.get(msg.topic)
        if ch is None:
            self.reply(msg.join_ref, msg.ref, msg.topic, "ok", EMPTY)          # S11
            return
        if msg.join_ref is not None and msg.join_ref != ch.join_ref:
            return                                                             # S10
        del self.channels[msg.topic]
        self.hub.channel_closed(ch)
        if ch.state == JOINED and ch.worker is not None:
            # The worker runs terminate, replies ok and sends phx_close.
            self.hub.bus_send(wire.leave(ch.worker, self.conn_id, msg.topic.encode(),
                                         ref_bytes(ch.join_ref), ref_bytes(msg.ref)))
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
                self.reply(msg.join_ref, msg.ref, msg.topic, "error", JOIN_PENDING)
            return
        if msg.binary:
            payload, fmt = msg.payload, wire.BINARY
        else:
            payload, fmt = orjson.dumps(msg.payload), wire.JSON
        ref = ref_bytes(msg.ref)
        self.hub.bus_send(wire.inbound(ch.worker, self.conn_id, msg.topic.encode(), ref_bytes(ch.join_ref),
                                       ref, msg.event.encode(), payload, fmt))
        if ref:
            pending = ch.pending
            if pending is None:
                pending = ch.pending = {}
            elif len(pending) >= MAX_PENDING_REPLIES:   # handlers that never reply (noreply)
                del pending[next(iter(pending))]
            pending[ref] = None

    # --- answers from workers (the hub routes them here) ---------------------------------
    def on_reply(self, r: wire.Reply) -> None:
        topic, join_ref = r.topic.decode(), ref_of(r.join_ref)
        ch = self.channels.get(topic)
        if ch is not None and ch.join_ref == join_ref and ch.worker == r.peer:
            if ch.pending:      # the common case, answered by the channel's own worker
                ch.pending.pop(r.ref, None)
        elif not self.from_holder(r, ch, join_ref):
            return
        self.reply(join_ref, ref_of(r.ref), topic, r.status.decode(), r.response, r.fmt)

    def on_push(self, p: wire.Push) -> None:
        topic = p.topic.decode()
        ch = self.channels.get(topic)
        if ch is None or ch.worker != p.peer or ch.join_ref != ref_of(p.join_ref):
            self.from_holder(p, ch, ref_of(p.join_ref))   # counts a foreign one
            return
        try:
            self.send(self.serializer.encode_push(ch.join_ref, topic, p.event.decode(), p.payload, p.fmt))
        except ValueError as exc:
            log.info("conn %s: push %s not sent: %s", self.label, p.event[:60], exc)

    def on_channel_end(self, c: wire.ChannelEnd, error: bool) -> None:
        """A worker closed (phx_close) or lost (phx_error) a channel instance."""
        topic, join_ref = c.topic.decode(), ref_of(c.join_ref)
        ch = self.channels.get(topic)
        if not self.from_holder(c, ch, join_ref):
            return
        if ch is not None and ch.join_ref == join_ref:
            del self.channels[topic]
            self.hub.channel_closed(ch)
            if error:
                self.lost(ch)
                return
        encode = self.serializer.encode_error if error else self.serializer.encode_close
        self.send(encode(join_ref, topic))

    def from_holder(self, msg, ch: ChannelRef | None, join_ref) -> bool:
        """Whether a worker's frame about ``ch`` (the channel of its topic, if any) may pass.
        The channel the edge holds takes frames only from its worker (frames from the late
        instance of a join sent twice, being ended, are dropped quietly).  One it holds no
        more (a leave or a duplicate join crossed the frame) passes a reply or a close, which
        the client matches by join_ref (the worker's answer to a leave comes that way), but
        not a push."""
        if ch is not None:
            if ch.join_ref == join_ref:
                if ch.worker == msg.peer:
                    return True
                if ch.orphan == msg.peer:
                    return False
                self.hub.foreign(msg, f"channel {ch.topic[:60]!r} is held by {ch.worker!r}" if ch.worker
                                 else f"channel {ch.topic[:60]!r} is still joining")
                return False
            if join_ref is None:
                # A client takes a frame without join_ref for the current channel of the topic.
                self.hub.foreign(msg, f"no join_ref while {ch.topic[:60]!r} is joined")
                return False
        return type(msg) is not wire.Push

    def on_join_reply(self, r: wire.JoinReply) -> None:
        """The worker's answer to a join of this connection."""
        ch = self.channels.get(r.topic.decode())
        if ch is not None and ch.join_ref != ref_of(r.join_ref):
            ch = None    # the topic's channel now is another instance
        if ch is not None and ch.state != JOINED:
            self.joined(ch, r.peer, ref_of(r.ref), r.status.decode(), r.response, r.intercept)
            return
        # A join no longer waiting: the client left meanwhile, or the join was sent twice
        # (edge/replace.py) and this answers the copy that lost.
        if ch is not None and ch.worker == r.peer:
            # Both copies reached the worker that holds the channel: a worker keeps one
            # instance per channel (its second join replaced the first), the one we hold,
            # unless that second join failed and left none.
            if r.status != b"ok":
                self.channel_lost(ch)
            return
        if r.status == b"ok":   # end the orphan instance (its terminate runs)
            if ch is not None:
                ch.orphan = r.peer
            self.hub.end_late_join(r)

    def joined(self, ch: ChannelRef, worker: bytes, ref, status: str, response: bytes,
               intercept: bytes) -> None:
        """The awaited answer to the join of ``ch``: write the reply, then what waited for it."""
        topic = ch.topic
        if status == "ok":
            ch.state = JOINED
            ch.worker = worker
            try:
                events = orjson.loads(intercept)
                ch.intercept = frozenset(e for e in events if isinstance(e, str))
            except orjson.JSONDecodeError:
                log.warning("worker %r sent a bad intercept list for %s", worker, topic)
            self.hub.joins += 1
            self.reply(ch.join_ref, ref, topic, "ok", response)
            self.hub.channel_joined(ch)   # after the reply: broadcasts held meanwhile come next
        else:
            del self.channels[topic]
            self.hub.channel_closed(ch)
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

    # --- messages the broker handed back (UNROUTABLE) -------------------------------------
    def join_unplaced(self, j: wire.Join) -> None:
        """No live worker could take the join: the client gets the error reply now, and
        phoenix.js retries on its rejoin schedule."""
        ch = self.channels.get(j.topic.decode())
        if ch is not None and ch.join_ref == ref_of(j.join_ref):
            self.joined(ch, b"", ref_of(j.ref), "error", NO_WORKER, b"[]")

    def push_unroutable(self, i: wire.In) -> None:
        """A push to a worker the broker does not know (it died while the broker was down,
        say): it gets an error reply with the channel's phx_error (the hub errors the
        worker's channels next), even if its ref had left the pending list."""
        ch = self.channels.get(i.topic.decode())
        if ch is not None and ch.worker == i.peer and ref_bytes(ch.join_ref) == i.join_ref and i.ref:
            if ch.pending is None:
                ch.pending = {}
            ch.pending[i.ref] = None

    def push_undelivered(self, i: wire.In) -> None:
        """A push the bus refused to take to its worker: its error reply now, instead of the
        client's timeout."""
        ch = self.channels.get(i.topic.decode())
        if ch is None or ref_bytes(ch.join_ref) != i.join_ref or not i.ref:
            return
        if ch.pending is not None:
            ch.pending.pop(i.ref, None)
        self.reply(ch.join_ref, ref_of(i.ref), ch.topic, "error", BUS_FULL)

    def leave_unanswered(self, lv: wire.Leave) -> None:
        """The edge forgot the channel when it sent the leave; the worker that would have
        answered it (ok, then phx_close) is gone, so the edge answers for it."""
        topic, join_ref = lv.topic.decode(), ref_of(lv.join_ref)
        self.reply(join_ref, ref_of(lv.ref), topic, "ok", EMPTY)
        self.send(self.serializer.encode_close(join_ref, topic))

    # --- channels lost ---------------------------------------------------------------------
    def channel_lost(self, ch: ChannelRef) -> None:
        """Its worker no longer has this instance (it died, lost it, or the broker evicted this
        edge): forget it, and the client gets phx_error."""
        if self.channels.get(ch.topic) is ch:
            del self.channels[ch.topic]
            self.hub.channel_closed(ch)
        self.lost(ch)

    def lose_channels(self) -> None:
        for ch in list(self.channels.values()):
            self.channel_lost(ch)

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

    def answer_pushes(self, ch: ChannelRef, refs: list[bytes], response: bytes) -> int:
        """Those of ``refs`` still waiting on ``ch`` (if it is still this connection's) get
        an error reply with ``response`` now; how many did."""
        if self.closed or self.channels.get(ch.topic) is not ch or not ch.pending:
            return 0
        answered = 0
        for ref in refs:
            if ref in ch.pending:
                del ch.pending[ref]
                self.reply(ch.join_ref, ref_of(ref), ch.topic, "error", response)
                answered += 1
        return answered

    # --- end of the connection ------------------------------------------------------
    def drop(self, ch: ChannelRef, reason: bytes) -> None:
        """Forget a channel the table no longer lists and tell its worker (connection closed,
        duplicate join).  A channel still joining is terminated when its join reply finds it
        gone."""
        self.hub.channel_closed(ch)
        if ch.state == JOINED and ch.worker:
            self.hub.bus_send(wire.terminate(ch.worker, self.conn_id, ch.topic.encode(),
                                             ref_bytes(ch.join_ref), reason))

    def drop_channels(self, reason: bytes) -> None:
        """Every channel ends; its terminate runs with ("shutdown", ``reason``)."""
        for ch in list(self.channels.values()):
            self.drop(ch, reason)
        self.channels.clear()

    def shut_down(self, code: int, why: str, terminate_reason: bytes) -> None:
        """End the connection from the server side (e.g. a "disconnect" broadcast to its socket
        id): its channels terminate with ("shutdown", terminate_reason), then the transport
        closes with `code` (a LongPoll session just ends; its next request gets 410)."""
        if self.closed:
            return
        # Pushes still waiting for their reply would otherwise time out in the client (10 s in
        # phoenix.js): each gets an error reply before the close.
        for ch in self.channels.values():
            pending, ch.pending = ch.pending, None
            for ref in pending or ():
                self.reply(ch.join_ref, ref_of(ref), ch.topic, "error", CLOSING)
        self.drop_channels(terminate_reason)
        self.close(code, why)

    def on_transport_closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.awaiting = None
        held, self.held = self.held, None
        if held is not None:
            held.cancel()
        self.drop_channels(b"closed")
        self.hub.remove_connection(self)


ref_bytes = wire.encode_ref   # refs travel as bytes on the bus, any JSON type kept
ref_of = wire.decode_ref
