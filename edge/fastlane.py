"""The fast lane: a broadcast from the bus written straight to local subscribers.

Phoenix's ``fastlane!``: a broadcast that no subscriber intercepts is encoded
once per wire format in use (V1 text, V2 text, V2 binary), framed once by the
transport, and the same bytes are written to every joined channel of the topic
on this edge.  Subscribers that intercept the event are skipped here; their
worker receives the broadcast too and runs ``handle_out``.  These writes go
straight to each subscriber's transport (edge/transport.py): the one kind of frame a
client gets that its ``Connection`` does not write, so that a broadcast costs one
encoding and one framing however many receive it.

It also knows the connections of each socket id topic (``Socket.id``): there the
only event that means anything is ``"disconnect"``, handed to the hub to close them.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import orjson

from zchannels.bus import wire

if TYPE_CHECKING:
    from zchannels.edge.channel import ChannelRef
    from zchannels.edge.connection import Connection

log = logging.getLogger(__name__)


DISCONNECT = b"disconnect"
MAX_HELD_WHILE_JOINING = 1000   # broadcasts kept for one channel while its join is pending


class FastLane:
    def __init__(self, on_disconnect: Callable[[bytes], None]) -> None:
        self.index: dict[bytes, dict["Connection", "ChannelRef"]] = {}      # joined channels
        self.joining: dict[bytes, dict["Connection", "ChannelRef"]] = {}    # join sent, no reply yet
        self.held_overflow = 0
        self.sockets: dict[bytes, set["Connection"]] = {}    # socket id topic key -> connections
        self.on_disconnect = on_disconnect
        self.deliveries = 0
        self.bytes_out = 0      # message bytes delivered (before transport framing), for /metrics
        self.malformed = 0

    def hold(self, ch: "ChannelRef") -> None:
        """The join of ``ch`` was sent: keep the topic's broadcasts for it until the reply.
        A broadcast can overtake the join reply (they travel different bus paths), and one
        published after the worker accepted the join must still reach the client."""
        ch.early = []
        self.joining.setdefault(ch.key, {})[ch.conn] = ch

    def add(self, ch: "ChannelRef") -> None:
        """The join succeeded (its reply is written): the held broadcasts, then live ones.
        A channel recovering history (``ch.recovery``) stays held: its recovery writes the
        replay, the held ones and the live ones until it calls ``add`` again without it."""
        if ch.recovery is not None:
            ch.recovery.joined()
            return
        self._unhold(ch)
        early, ch.early = ch.early, None
        if early:
            for b in early:
                self._fan({ch.conn: ch}, b)
        subs = self.index.get(ch.key)
        if subs is None:
            subs = self.index[ch.key] = {}
        subs[ch.conn] = ch

    def remove(self, ch: "ChannelRef") -> None:
        self._unhold(ch)
        ch.early = None
        if ch.recovery is not None:
            ch.recovery.cancel()
        subs = self.index.get(ch.key)
        if subs is not None and subs.get(ch.conn) is ch:
            del subs[ch.conn]
            if not subs:
                del self.index[ch.key]

    def _unhold(self, ch: "ChannelRef") -> None:
        joining = self.joining.get(ch.key)
        if joining is not None and joining.get(ch.conn) is ch:
            del joining[ch.conn]
            if not joining:
                del self.joining[ch.key]

    def add_socket(self, conn: "Connection") -> None:
        self.sockets.setdefault(conn.id_key, set()).add(conn)

    def remove_socket(self, conn: "Connection") -> None:
        conns = self.sockets.get(conn.id_key)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.sockets[conn.id_key]

    def deliver(self, frames: list[bytes]) -> None:
        try:
            b = wire.parse_broadcast(frames)
        except wire.BusFrameError as exc:
            self.malformed += 1
            if self.malformed <= 20:
                log.warning("dropped malformed broadcast: %s", exc)
            return
        key = b.key
        if key in self.sockets and b.event == DISCONNECT:
            self.on_disconnect(key)      # other events on an id topic are ignored, as in Phoenix
        joining = self.joining.get(key)
        if joining:
            self._hold_for(joining, b)
        subs = self.index.get(key)
        if subs:
            self._fan(subs, b)

    def _hold_for(self, joining: dict, b: wire.Broadcast) -> None:
        for ch in joining.values():
            if ch.recovery is not None:     # a channel recovering history (edge/recovery.py)
                ch.recovery.on_live(b)
            elif len(ch.early) < MAX_HELD_WHILE_JOINING:
                ch.early.append(b)
            else:
                self.held_overflow += 1
                if self.held_overflow in (1, 10, 100) or self.held_overflow % 10000 == 0:
                    log.warning("joining channel on %.60s held %d broadcasts already; "
                                "dropped the next (%d so far)", ch.topic, MAX_HELD_WHILE_JOINING,
                                self.held_overflow)

    def _fan(self, subs: dict, b: wire.Broadcast) -> None:
        origin, payload, fmt = b.origin, b.payload, b.fmt
        try:
            event = b.event.decode()
            topic = b.key[:-1].decode()
            ref = b.position.decode() if b.position else None
        except UnicodeDecodeError:
            self.malformed += 1
            if self.malformed <= 20 or self.malformed % 1000 == 0:
                log.warning("dropped broadcast with a topic or event that is not UTF-8 (%d so far)",
                            self.malformed)
            return
        built: dict = {}
        sizes: dict = {}
        delivered = 0
        for conn, ch in subs.items():
            if origin and conn.origin == origin:
                continue
            if ch.intercept and event in ch.intercept:
                continue
            frame = built.get(conn.fmt_key)
            if frame is None:
                try:
                    encoded = conn.serializer.encode_broadcast(topic, event, payload, fmt, ref)
                except ValueError as exc:  # e.g. binary to a V1 client
                    frame = built[conn.fmt_key] = b""
                    log.debug("broadcast %s/%s not encodable for %s: %s", topic, event,
                              conn.serializer.name, exc)
                else:
                    frame = built[conn.fmt_key] = conn.transport.prebuild(*encoded)
                    sizes[conn.fmt_key] = len(encoded[0])
            if frame:
                conn.transport.send_prebuilt(frame)
                delivered += 1
        self.deliveries += delivered
        if delivered:
            self.bytes_out += self._bytes_out(sizes, delivered, subs, origin, event)

    @staticmethod
    def _bytes_out(sizes: dict, delivered: int, subs: dict, origin: bytes, event: str) -> int:
        """Message bytes just delivered, for /metrics, kept out of the per-recipient loop: with
        one wire format in use (the usual case) it is one multiplication; a topic whose clients
        mix formats takes a second pass."""
        if len(sizes) == 1:
            return delivered * next(iter(sizes.values()))
        return sum(sizes.get(conn.fmt_key, 0) for conn, ch in subs.items()
                   if not (origin and conn.origin == origin) and not (ch.intercept and event in ch.intercept))


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
