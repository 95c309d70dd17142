"""WebSocket framing (RFC 6455) for the edge, as an asyncio Protocol.

Tornado performs the HTTP upgrade; the established connection then moves to
this protocol on the event loop's own C transport.  Tornado's frame reader
awaits several coroutines per frame and yields to the loop only every ~256 KB;
here every chunk the kernel hands over is parsed in one loop, and a client
pipelining frames is paused after ``YIELD_EVERY`` frames (pings included) so the
other connections get their turn.

Pings and pongs cost the edge a turn like messages do, so they take a token of the
connection's rate limit (``Connection.control_in``); a ping over the limit goes
unanswered and a client that keeps going is closed 1008.  Every ping is answered at once
while the client reads what it is sent (nothing of ours waits unsent); while something
does, pings that follow each other are answered with one pong, for the latest of them:
RFC 6455 §5.5.3 allows that for pings whose pong has not been sent yet.  So a client that
reads gets a pong per ping (what the Autobahn|Testsuite expects), and a ping flood that
does not read makes at most one pong per ``YIELD_EVERY`` frames.  A held pong goes out
before the next data or close frame is handled and at the end of the read batch, so it
still comes before anything the frames after the pings cause.

Writes go to ``transport.write``, which sends at once when nothing is queued;
the fast lane writes the same prebuilt frame bytes to every subscriber.  A client
that does not read what it is sent is a slow consumer: past ``--max-outbound``
unsent bytes (the transport's high-water mark: ``pause_writing``), whatever
filled them, data or pongs, it gets no more data, only a close frame (1013), and
the connection is cut if the client has not closed within ``SLOW_CONSUMER_GRACE``.
Nothing more is read from it until its backlog drains (``resume_writing``), so a
client that sends while never reading cannot make the edge buffer in either
direction.

Inbound bytes a connection holds (a frame not fully arrived, the fragments of an
unfinished message, frames not yet parsed because it yielded) are free up to
``FREE_INBOUND`` each; beyond that they are drawn from one budget for the whole edge
process, ``--max-inbound-buffered`` (``InboundBudget``), and given back as soon as the
message completes, fails or the connection is lost.  A connection that would take the
budget over its limit is closed with 1013 ("try again later": the edge is busy with large
messages), so a few hundred clients each announcing a frame of ``--max-frame-size`` and
never finishing it cannot hold hundreds of megabytes.  Ordinary messages never touch the
budget: the read loop checks one sum per batch, and only a connection holding more than
``FREE_INBOUND`` does the accounting.

When the connection is lost its buffers go at once, and the protocol drops its
references to the ``Connection`` and the transport: no reference cycle keeps a
closed connection's memory until a garbage collection.
"""
from __future__ import annotations

import asyncio
import codecs
import logging
from typing import TYPE_CHECKING

from tornado.util import _websocket_mask as unmask

from zchannels.edge import memtrim
from zchannels.edge.admission import Refusals
from zchannels.edge.serializer import DecodeError
from zchannels.edge.wsframe import build_frame

if TYPE_CHECKING:
    from zchannels.edge.connection import Connection
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_BAD_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013
YIELD_EVERY = 16          # frames from one client before other connections get a turn
CLOSE_WAIT = 2.0          # seconds to wait for the client's close frame after ours
SLOW_CONSUMER_GRACE = 5.0  # ... when it first has to read its backlog (up to --max-outbound)
MAX_IGNORED_AFTER_CLOSE = 1000   # frames read after a close frame before the connection is cut
FREE_INBOUND = 64 * 1024  # inbound bytes a connection holds without drawing from the edge's budget


class InboundBudget:
    """Inbound bytes held by all the edge's WebSockets beyond ``FREE_INBOUND`` each, against
    ``--max-inbound-buffered``.  ``held`` is the sum of every connection's ``drawn``."""

    __slots__ = ("limit", "held", "refused")

    def __init__(self, limit: int, stats: dict):
        self.limit = limit
        self.held = 0
        self.refused = Refusals(stats, ("inbound_budget_closes",))


class WebSocketProtocol(asyncio.Protocol):
    frame_kind = "ws"
    __slots__ = ("hub", "make_connection", "handshake", "transport", "conn", "buf", "fragments",
                 "fragment_opcode", "fragment_size", "closing", "failed", "paused", "lost",
                 "write_blocked", "close_timer", "ignored", "max_size", "max_outbound", "budget",
                 "drawn", "hold_over", "utf8", "partial", "pong", "__weakref__")

    def __init__(self, hub: "EdgeHub", make_connection, handshake: bytes):
        self.hub = hub
        self.make_connection = make_connection
        self.handshake = handshake
        self.transport: asyncio.Transport | None = None
        self.conn: "Connection | None" = None
        self.buf = bytearray()
        # One bytearray, not a list of pieces: a message sent as a million 1-byte fragments
        # must not cost a million objects.
        self.fragments: bytearray | None = None
        self.fragment_opcode = 0
        self.fragment_size = 0
        # A fragmented text message is checked fragment by fragment (RFC 6455 §8.1: fail fast);
        # a single-frame one only by its decoder, once.
        self.utf8: codecs.IncrementalDecoder | None = None
        # ... and a text frame still arriving, as far as it came: (decoder, bytes checked)
        self.partial: tuple[codecs.IncrementalDecoder, int] | None = None
        self.closing = False
        self.failed = False       # bad input: stop reading altogether
        self.paused = False       # yielded to other connections; a _resume is scheduled
        self.lost = False
        self.write_blocked = False  # over --max-outbound unsent: reading stops until it drains
        self.close_timer: asyncio.TimerHandle | None = None
        self.ignored = 0          # frames read after a close frame
        self.pong: bytes | None = None   # payload of the latest of the pings just read
        self.max_size = hub.limits.max_frame_size
        self.max_outbound = hub.limits.max_outbound
        self.budget: InboundBudget = hub.inbound_budget
        self.drawn = 0            # bytes of the budget this connection holds
        # _hold runs when more than this is held: FREE_INBOUND, or -1 while drawn, to give back
        self.hold_over = FREE_INBOUND

    # --- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        # pause_writing is the slow-consumer check for every write (data, pongs, close);
        # below a quarter of it the client has read enough to be read from again.
        transport.set_write_buffer_limits(high=self.max_outbound, low=self.max_outbound // 4)
        transport.write(self.handshake)
        self.handshake = b""
        self.conn = self.make_connection(self)
        self.make_connection = None

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self.buf += data
        if not self.paused and not self.write_blocked:
            self._process()

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.lost = True
        memtrim.freed(len(self.buf) + self.fragment_size)
        self.buf = bytearray()
        self.fragments, self.fragment_size, self.pong = None, 0, None
        self._give_back()
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        # Connection.transport points back here: drop our side of the cycle so the memory
        # of a closed connection comes back without waiting for a garbage collection.
        conn, self.conn, self.transport = self.conn, None, None
        if conn is not None:
            conn.on_transport_closed()

    def pause_writing(self) -> None:
        """Over --max-outbound unsent bytes: a slow consumer (see the module docstring)."""
        self.write_blocked = True
        transport = self.transport
        transport.pause_reading()
        if self.closing:
            return
        self.hub.stats["slow_consumer_closes"] += 1
        log.info("conn %s: slow consumer, %d bytes unsent; closing with %d",
                 self.conn.label if self.conn else "?", transport.get_write_buffer_size(),
                 CLOSE_TRY_AGAIN_LATER)
        # No more data for it: the close frame queues behind the backlog, so a client that
        # is only slow reads everything it was sent, then 1013, and reconnects; one that
        # reads nothing is cut off when the grace period is over (_close_wait_over).
        self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer", wait=SLOW_CONSUMER_GRACE)

    def resume_writing(self) -> None:
        self.write_blocked = False
        if not self.paused:   # else the _resume already scheduled reads again
            self.paused = True
            asyncio.get_running_loop().call_soon(self._resume)

    # --- reading ---------------------------------------------------------------------
    def _resume(self) -> None:
        self.paused = False
        transport = self.transport
        if self.write_blocked or self.failed or transport is None or transport.is_closing():
            return
        transport.resume_reading()
        self._process()

    def _process(self) -> None:
        buf = self.buf
        pos = 0
        handled = 0
        end = len(buf)
        partial = None
        # (pause_writing stops reading; it also closes, so the rest of this batch is ignored)
        while end - pos >= 2 and not self.failed:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if end - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if end - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if not b1 & 0x80:
                self._fail(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
                return
            if b0 & 0x70 and not self._reserved_bits(b0):
                return
            if length + self.fragment_size > self.max_size:
                self._fail(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")
                return
            start = pos + head + 4
            if end - start < length:
                if b0 & 0x0F < OP_BINARY and end > start:    # a text frame (or a fragment) so far
                    partial = self._check_partial(buf, pos, start, end, b0)
                break
            payload = unmask(bytes(buf[pos + head:start]), bytes(buf[start:start + length]))
            pos = start + length
            opcode = b0 & 0x0F
            if opcode >= OP_CLOSE:
                if self.pong is not None and opcode == OP_CLOSE:
                    self._send_pong()
                self._control(opcode, b0 & 0x80, payload)
            elif not self.closing:
                if self.pong is not None:
                    self._send_pong()
                message = self._assemble(opcode, b0 & 0x80, payload)
                if message is not None:
                    self._deliver(*message)
            else:
                self._ignore()
            # Every frame counts, control frames and fragments too: each costs a turn.
            handled += 1
            if handled >= YIELD_EVERY and end - pos >= 2 and not self.failed:
                self.paused = True
                self.transport.pause_reading()
                asyncio.get_running_loop().call_soon(self._resume)
                break
        self.partial = partial
        if self.failed:
            return
        if self.pong is not None:
            self._send_pong()
        del buf[:pos]
        if end - pos + self.fragment_size > self.hold_over:    # (end - pos: len(buf) now)
            self._hold(end - pos + self.fragment_size)
            if self.failed:
                return

    def _reserved_bits(self, b0: int) -> bool:
        """RSV1-3 set on a frame: with no extension agreed, a protocol error (RFC 6455 §5.2).
        Returns whether the frame may be read on (``wsdeflate`` accepts RSV1 on some)."""
        self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
        return False

    def _hold(self, held: int) -> None:
        """Draw from or give back to the edge's budget so this connection holds `held` bytes."""
        budget = self.budget
        want = held - FREE_INBOUND if held > FREE_INBOUND else 0
        more = want - self.drawn
        if more > 0 and budget.held + more > budget.limit:
            budget.refused("inbound_budget_closes",
                           "conn %s: closing with %d: holding %d bytes of unfinished messages would "
                           "take the edge over --max-inbound-buffered %d (%d held by others)",
                           self.conn.label if self.conn else "?", CLOSE_TRY_AGAIN_LATER, held,
                           budget.limit, budget.held - self.drawn)
            self._fail(CLOSE_TRY_AGAIN_LATER, "edge busy with large messages, try again later")
            return
        budget.held += more
        self.drawn = want
        self.hold_over = -1 if want else FREE_INBOUND

    def _give_back(self) -> None:
        if self.drawn:
            self.budget.held -= self.drawn
            self.drawn = 0
            self.hold_over = FREE_INBOUND

    def _drop_input(self) -> None:
        """Nothing more from this client is read: its unread bytes and fragments go now."""
        memtrim.freed(len(self.buf) + self.fragment_size)
        self.buf.clear()
        self.fragments, self.fragment_size, self.utf8, self.partial = None, 0, None, None
        self._give_back()

    def _assemble(self, opcode: int, fin: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode == OP_CONT:
            fragments = self.fragments
            if fragments is None:
                self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a first frame")
                return None
            if self.utf8 is not None and not self._valid_utf8(payload, fin):
                return None
            fragments += payload
            self.fragment_size += len(payload)
            if not fin:
                return None
            self.fragments, self.fragment_size, self.utf8 = None, 0, None
            return self.fragment_opcode, bytes(fragments)
        if opcode not in (OP_TEXT, OP_BINARY):
            self._fail(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode}")
            return None
        if self.fragments is not None:
            self._fail(CLOSE_PROTOCOL_ERROR, "new message before the fragmented one ended")
            return None
        if not fin:
            if opcode == OP_TEXT:
                self.utf8 = codecs.getincrementaldecoder("utf-8")()
                if not self._valid_utf8(payload, 0):
                    return None
            self.fragments, self.fragment_opcode = bytearray(payload), opcode
            self.fragment_size = len(payload)
            return None
        return opcode, payload

    def _check_partial(self, buf: bytearray, pos: int, start: int, end: int, b0: int):
        """A text frame not fully arrived: its UTF-8 so far, checked now (Autobahn 6.4.3: fail
        fast inside a frame too).  The frame is whole-checked again when complete (by the
        serializer or the message's decoder); this only fails earlier.  Returns the state to
        keep for the frame's next bytes, or None.  At ``pos`` 0 the frame is the one checked
        in the last batch, if any: an incomplete frame is always left at the buffer's start."""
        if self.closing:
            return None
        partial = self.partial if pos == 0 else None
        if partial is None:
            if b0 & 0x0F == OP_CONT and self.utf8 is None:
                return None                       # a binary message's fragment
            decoder = codecs.getincrementaldecoder("utf-8")()
            if b0 & 0x0F == OP_CONT:
                decoder.setstate(self.utf8.getstate())
            partial = decoder, 0
        decoder, checked = partial
        got = end - start
        if got > checked:
            key = bytes(buf[start - 4:start])
            turn = checked % 4
            try:
                decoder.decode(unmask(key[turn:] + key[:turn], bytes(buf[start + checked:end])))
            except UnicodeDecodeError as exc:
                self._bad_utf8(exc)
                return None
        return decoder, got

    def _valid_utf8(self, payload: bytes, fin: int) -> bool:
        """One fragment of a text message: invalid UTF-8 fails the connection now (1007), not
        when the message is complete (RFC 6455 §8.1; Autobahn 6.4)."""
        try:
            self.utf8.decode(payload, bool(fin))
        except UnicodeDecodeError as exc:
            self._bad_utf8(exc)
            return False
        return True

    def _bad_utf8(self, exc: UnicodeDecodeError) -> None:
        self.hub.stats["bad_frames"] += 1
        log.info("conn %s: closing with %d, invalid UTF-8 in a text message: %s",
                 self.conn.label if self.conn else "?", CLOSE_BAD_DATA, exc.reason)
        self._fail(CLOSE_BAD_DATA, "invalid UTF-8 in a text message")

    def _control(self, opcode: int, fin: int, payload: bytes) -> None:
        if opcode > OP_PONG:
            return self._fail(CLOSE_PROTOCOL_ERROR, f"reserved control opcode {opcode}")
        if not fin or len(payload) > 125:
            return self._fail(CLOSE_PROTOCOL_ERROR, "fragmented or oversize control frame")
        if opcode == OP_CLOSE:
            if not self.closing:  # the client started the closing handshake: echo its code
                self._answer_close(payload)
            self.transport.close()
        elif self.closing:
            self._ignore()
        # A ping or an unsolicited pong takes a token like a message.  A ping within the rate
        # is answered now if all we sent has left; else by the next _send_pong, unless
        # another ping comes first.
        elif self.conn.control_in() and opcode == OP_PING:
            self.pong = payload
            if not self.transport.get_write_buffer_size():
                self._send_pong()

    def _send_pong(self) -> None:
        pong, self.pong = self.pong, None
        if not self.closing and not self.failed:
            self.send_prebuilt(build_control(OP_PONG, pong))

    def _answer_close(self, payload: bytes) -> None:
        """The client's close frame: no body is answered 1000, a well-formed one with its own
        code; a one-byte body or a code no peer may send 1002, a reason that is not UTF-8 1007
        (RFC 6455 §5.5.1, §7.4; Autobahn 7.3, 7.5, 7.9)."""
        if not payload:
            return self.close(CLOSE_NORMAL)
        code = int.from_bytes(payload[:2], "big")
        if len(payload) < 2 or not valid_close_code(code):
            self.hub.stats["bad_frames"] += 1
            return self._fail(CLOSE_PROTOCOL_ERROR,
                              f"malformed close frame ({len(payload)} bytes, code {code})")
        try:
            payload[2:].decode()
        except UnicodeDecodeError:
            self.hub.stats["bad_frames"] += 1
            log.info("conn %s: closing with %d: close reason is not UTF-8",
                     self.conn.label if self.conn else "?", CLOSE_BAD_DATA)
            return self._fail(CLOSE_BAD_DATA, "close reason is not UTF-8")
        self.close(code)

    def _ignore(self) -> None:
        """A frame after a close frame.  A client answers ours with its own close frame; one
        that keeps sending instead (a flood we closed 1008) is cut off without more reading."""
        self.ignored += 1
        if self.ignored > MAX_IGNORED_AFTER_CLOSE:
            self.failed = True
            self._drop_input()
            self.transport.close()

    def _deliver(self, opcode: int, payload: bytes) -> None:
        conn = self.conn
        serializer = conn.serializer
        try:
            if opcode == OP_TEXT:
                msg = serializer.decode_text(payload)
            else:
                msg = serializer.decode_binary(payload)
        except DecodeError as exc:
            self.hub.stats["bad_frames"] += 1
            binary = opcode == OP_BINARY
            log.info("conn %s: closing, undecodable %s frame: %s", conn.label,
                     "binary" if binary else "text", exc)
            return self._fail(CLOSE_BAD_DATA, str(exc))
        conn.handle(msg)

    def _fail(self, code: int, reason: str) -> None:
        """Close for bad input: nothing more from this client is read."""
        if self.conn is not None and code in (CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG):
            log.info("conn %s: closing with %d: %s", self.conn.label, code, reason)
        self.close(code, reason)
        self.failed = True
        self._drop_input()
        if self.transport is not None:
            self.transport.close()   # flushes our close frame, then ends the TCP connection

    # --- the transport interface Connection writes through -------------------------------
    def prebuild(self, data: bytes, binary: bool) -> bytes:
        return build_frame(data, binary)

    def send(self, data: bytes, binary: bool) -> None:
        self.send_prebuilt(build_frame(data, binary))

    def send_prebuilt(self, frame: bytes) -> None:
        # Past --max-outbound the transport calls pause_writing, which closes with 1013.
        if not self.closing:
            self.transport.write(frame)

    def _write(self, frame: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame)

    def close(self, code: int = CLOSE_NORMAL, reason: str = "", wait: float = CLOSE_WAIT) -> None:
        if self.closing or self.transport is None:
            return
        self.closing = True
        body = code.to_bytes(2, "big") + reason.encode()[:123]
        self._write(build_control(OP_CLOSE, body))
        # The client answers with its own close frame; do not wait for ever.
        self.close_timer = asyncio.get_running_loop().call_later(wait, self._close_wait_over)

    def _close_wait_over(self) -> None:
        self.close_timer = None
        transport = self.transport
        if self.lost or transport is None:
            return
        unsent = transport.get_write_buffer_size()
        if not unsent:
            transport.close()
            return
        # transport.close() would wait for a flush that a client reading nothing never allows.
        self.hub.stats["close_aborts"] += 1
        log.info("conn %s: did not close, %d bytes still unsent; dropping the connection",
                 self.conn.label if self.conn else "?", unsent)
        transport.abort()


def valid_close_code(code: int) -> bool:
    """Codes a peer may send (RFC 6455 §7.4): the defined ones and the 3000-4999 range."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) \
        or 3000 <= code <= 4999


def build_control(opcode: int, payload: bytes) -> bytes:
    return bytes((0x80 | opcode, len(payload))) + payload
