"""Recovery on join: the broadcasts a rejoining client missed, then the live ones, exactly once.

A join whose params carry ``"zc_since": "<epoch>:<offset>"`` (or any join of a topic with
history) reads the topic's history from the broker as soon as the join goes out, in parallel
with the worker's answer; reads of one topic on this edge are shared while in flight
(``Reads``).  Once the join's ok is written, ``ChannelRecovery`` sends the ``zc_recovery``
event, the replay (entries after ``zc_since``), then the broadcasts held since the join,
skipping those already replayed and reading the store again for a gap; it stays between the
fast lane and the client until a live broadcast reaches the position it replayed to (a live
broadcast can come after a read that already returned it), then hands the channel to the fast
lane.  Only channels of history topics pass here: other broadcasts never do.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

import orjson

from zchannels.bus import wire
from zchannels.bus.history import format_position, parse_position
from zchannels.bus.historyread import HistoryReads, HistoryResult

if TYPE_CHECKING:
    from zchannels.edge.channel import ChannelRef
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)

SINCE_PARAM = "zc_since"
EVENT = "zc_recovery"
MAX_READ = 1_000_000        # entries per read when the edge does not know the topic's rule
MAX_HELD = 10_000           # live broadcasts held for one channel while its history is read

RECOVERED, NOT_RECOVERED, NEW = "recovered", "not_recovered", "new"


class SharedRead:
    """One HISTORY_READ of a topic in flight, and the frames built from its entries (one per
    entry and wire format, shared by every channel replaying them)."""
    __slots__ = ("after", "future", "frames", "parsed")

    def __init__(self, after: int, future: asyncio.Future):
        self.after = after
        self.future = future
        self.frames: dict[tuple, object] = {}
        self.parsed: dict[int, wire.Broadcast | None] = {}

    def broadcast(self, offset: int, data: bytes) -> wire.Broadcast | None:
        b = self.parsed.get(offset, False)
        if b is False:
            try:
                b = wire.parse_broadcast(wire.unpack_broadcast(data))
            except wire.BusFrameError:
                b = None
            self.parsed[offset] = b
        return b


class Reads:
    """The edge's history reads: one in flight per topic and starting offset serves every
    channel that needs it."""

    def __init__(self, hub: "EdgeHub"):
        self.hub = hub
        self.reads = HistoryReads(hub.bus_send, asyncio.get_running_loop())
        self.inflight: dict[str, list[SharedRead]] = {}
        self.issued = 0
        self.shared = 0

    def read(self, topic: str, after: int, share: bool = True) -> SharedRead:
        """A read with every entry of ``topic`` after ``after`` (one in flight that started at
        or before it, else a new one).  ``share=False`` for a gap: the read must be sent after
        the live broadcast that showed the gap, so that it sees everything before it (the
        sequencer stores a broadcast before it publishes it)."""
        for shared in self.inflight.get(topic, ()) if share else ():
            if shared.after <= after:
                self.shared += 1
                return shared
        rule = self.hub.bus.history.rule(topic)
        future = self.reads.read(topic, after, rule.keep if rule is not None else MAX_READ)
        shared = SharedRead(after, future)
        self.inflight.setdefault(topic, []).append(shared)
        future.add_done_callback(lambda _f: self._done(topic, shared))
        self.issued += 1
        return shared

    def _done(self, topic: str, shared: SharedRead) -> None:
        reads = self.inflight.get(topic)
        if reads is not None:
            reads.remove(shared)
            if not reads:
                del self.inflight[topic]


def wants_recovery(hub: "EdgeHub", topic: str, payload) -> bool:
    """Whether a join of ``topic`` with these params goes through recovery."""
    if isinstance(payload, dict) and SINCE_PARAM in payload:
        return True
    table = hub.bus.history
    return not table.known or table.rule(topic) is not None


class ChannelRecovery:
    """One joining channel's recovery, from its join until its broadcasts are live."""
    __slots__ = ("hub", "ch", "since", "given", "read", "joined_ok", "held", "last", "epoch",
                 "target", "gap", "done")

    def __init__(self, hub: "EdgeHub", ch: "ChannelRef", payload):
        self.hub, self.ch = hub, ch
        self.given = isinstance(payload, dict) and SINCE_PARAM in payload
        self.since = parse_position(payload.get(SINCE_PARAM)) if self.given else None
        after = self.since[1] if self.since is not None else 0
        self.read = hub.recovery.read(ch.topic, after) if self.since is not None else \
            hub.recovery.read(ch.topic, 1 << 62)   # the head only: shares any read of the topic
        self.joined_ok = False
        self.held: deque[wire.Broadcast] = deque()
        self.last = 0           # the offset the client has now
        self.epoch = ""
        self.target = 0         # live broadcasts up to here may repeat the replay
        self.gap: SharedRead | None = None
        self.done = False

    # --- called by the fast lane --------------------------------------------------------
    def joined(self) -> None:
        """The join's ok is written: go on once the history read is answered."""
        self.joined_ok = True
        self.read.future.add_done_callback(self._read_done)

    def on_live(self, b: wire.Broadcast) -> None:
        if self.done:
            return
        if not self.epoch or self.gap is not None:
            if len(self.held) < MAX_HELD:
                self.held.append(b)
            return
        self._merge(b)

    def cancel(self) -> None:
        """The channel ended (left, closed, lost)."""
        self.done = True
        self.ch.recovery = None

    # --- the steps -------------------------------------------------------------------------
    def _read_done(self, future: asyncio.Future) -> None:
        if self.done:
            return
        try:
            result: HistoryResult | None = future.result()
        except Exception:      # HistoryUnavailable: the broker did not answer
            result = None
        if result is None or result.status == wire.HISTORY_ERROR:
            self._tell(NOT_RECOVERED, "", 0, 0, "history unavailable")
            self._finish()
            return
        if result.status == wire.HISTORY_NONE:
            if self.given:
                self._tell(NOT_RECOVERED, "", 0, 0, "topic keeps no history")
            self._finish()
            return
        self.epoch = result.epoch
        head = result.head
        status, reason, replay = self._judge(result)
        self.last = replay[-1][0] if replay else (self.since[1] if status == RECOVERED else head)
        self._tell(status, result.epoch, self.last, len(replay), reason)
        for offset, data in replay:
            self._write_stored(self.read, offset, data)
        self.target = max(self.last, head)
        self._release_held()

    def _judge(self, result: HistoryResult) -> tuple[str, str, list[tuple[int, bytes]]]:
        """(status, reason, entries to replay) for this channel's zc_since."""
        head = result.head
        if not self.given:
            return NEW, "", []
        if self.since is None:
            return NOT_RECOVERED, "malformed position", []
        epoch, since = self.since
        if epoch != result.epoch:
            return NOT_RECOVERED, "epoch changed", []
        if since > head:
            return NOT_RECOVERED, "future position", []
        replay = [e for e in result.entries if e[0] > since]
        if since < head and (not replay or replay[0][0] != since + 1):
            return NOT_RECOVERED, "position too old", []
        return RECOVERED, "", replay

    def _merge(self, b: wire.Broadcast) -> None:
        """One live broadcast after the replay: skipped if the client has it, written if next,
        and a gap before it read from the store first."""
        offset = self._offset(b)
        if offset is None:          # no position (stored nowhere): as the fast lane would
            self._write_live(b)
            return
        if offset <= self.last:
            self._maybe_live()
            return
        if offset > self.last + 1:
            self.held.appendleft(b)     # first in line once the gap is read
            self.gap = self.hub.recovery.read(self.ch.topic, self.last, share=False)
            self.gap.future.add_done_callback(self._gap_done)
            return
        self._write_live(b)
        self.last = offset
        self._maybe_live()

    def _gap_done(self, future: asyncio.Future) -> None:
        if self.done:
            return
        gap, self.gap = self.gap, None
        try:
            result = future.result()
            entries = result.entries if result.status == wire.HISTORY_OK and result.epoch == self.epoch else []
        except Exception:
            entries = []
        for offset, data in entries:
            if offset == self.last + 1:
                self._write_stored(gap, offset, data)
                self.last = offset
        first = self._offset(self.held[0]) if self.held else None
        if first is not None and first > self.last + 1:
            # the store no longer has the gap: go on without it rather than hold forever
            self.last = first - 1
        self._release_held()

    def _release_held(self) -> None:
        """The held live broadcasts, in order, until a gap must be read (they stay held) or
        the channel is caught up (the rest are written as the fast lane would)."""
        held = self.held
        while held and not self.done and self.gap is None:
            self._merge(held.popleft())
        self._maybe_live()

    def _offset(self, b: wire.Broadcast) -> int | None:
        position = parse_position(b.position.decode(errors="replace")) if b.position else None
        if position is None or position[0] != self.epoch:
            return None
        return position[1]

    def _maybe_live(self) -> None:
        """Caught up: no live broadcast still to come can repeat one the client has."""
        if not self.done and self.gap is None and not self.held and self.last >= self.target:
            self._finish()

    def _finish(self) -> None:
        """Hand the channel to the fast lane, after what is still held."""
        self.done = True
        ch = self.ch
        ch.recovery = None
        held, self.held = self.held, deque()
        for b in held:
            self._write_live(b)
        ch.early = []
        if ch.conn.channels.get(ch.topic) is ch and not ch.conn.closed:
            self.hub.fastlane.add(ch)

    # --- writing -------------------------------------------------------------------------
    def _tell(self, status: str, epoch: str, head: int, replayed: int, reason: str) -> None:
        body = {"status": status, "position": format_position(epoch, head) if epoch else None,
                "replayed": replayed}
        if status == NOT_RECOVERED:
            body["reason"] = reason
        conn, ch = self.ch.conn, self.ch
        conn.send(conn.serializer.encode_push(ch.join_ref, ch.topic, EVENT, orjson.dumps(body)))

    def _skip(self, b: wire.Broadcast, event: str) -> bool:
        ch = self.ch
        return bool(b.origin and b.origin == ch.conn.origin) or bool(ch.intercept and event in ch.intercept)

    def _write_stored(self, shared: SharedRead, offset: int, data: bytes) -> None:
        b = shared.broadcast(offset, data)
        if b is None:
            return
        conn = self.ch.conn
        key = (offset, conn.fmt_key)
        frame = shared.frames.get(key)
        if frame is None:
            event = b.event.decode(errors="replace")
            if self._skip(b, event):
                return
            frame = shared.frames[key] = self._prebuild(b, event)
        elif self._skip(b, b.event.decode(errors="replace")):
            return
        if frame:
            conn.transport.send_prebuilt(frame)
            self.hub.fastlane.deliveries += 1

    def _write_live(self, b: wire.Broadcast) -> None:
        event = b.event.decode(errors="replace")
        if self._skip(b, event):
            return
        frame = self._prebuild(b, event)
        if frame:
            self.ch.conn.transport.send_prebuilt(frame)
            self.hub.fastlane.deliveries += 1

    def _prebuild(self, b: wire.Broadcast, event: str):
        conn = self.ch.conn
        try:
            encoded = conn.serializer.encode_broadcast(self.ch.topic, event, b.payload, b.fmt,
                                                       b.position.decode() if b.position else None)
        except (ValueError, UnicodeDecodeError):
            return b""
        return conn.transport.prebuild(*encoded)
