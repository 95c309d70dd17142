"""WebSocket framing (RFC 6455) for the edge, as an asyncio Protocol.

Tornado performs the HTTP upgrade; the established connection then moves to
this protocol on the event loop's own C transport.  Tornado's frame reader
awaits several coroutines per frame and yields to the loop only every ~256 KB;
here every chunk the kernel hands over is parsed in one loop, and a client
pipelining frames is paused after ``YIELD_EVERY`` messages so the other
connections get their turn.

Writes go to ``transport.write``, which sends at once when nothing is queued;
the fast lane writes the same prebuilt frame bytes to every subscriber.  A client
that does not read what it is sent is a slow consumer: past ``--max-outbound``
unsent bytes it gets no more data, only a close frame (1013), and the connection
is cut if the client has not closed within ``SLOW_CONSUMER_GRACE``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from tornado.util import _websocket_mask as unmask

from edge.serializer import DecodeError
from edge.wsframe import build_frame

if TYPE_CHECKING:
    from edge.connection import Connection
    from edge.hub import EdgeHub

log = logging.getLogger(__name__)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_BAD_DATA = 1007
CLOSE_TOO_BIG = 1009
CLOSE_TRY_AGAIN_LATER = 1013
YIELD_EVERY = 16          # messages from one client before other connections get a turn
CLOSE_WAIT = 2.0          # seconds to wait for the client's close frame after ours
SLOW_CONSUMER_GRACE = 5.0  # ... when it first has to read its backlog (up to --max-outbound)


class WebSocketProtocol(asyncio.Protocol):
    frame_kind = "ws"
    __slots__ = ("hub", "make_connection", "handshake", "transport", "conn", "buf", "fragments",
                 "fragment_opcode", "fragment_size", "closing", "failed", "paused", "lost",
                 "max_size", "max_outbound")

    def __init__(self, hub: "EdgeHub", make_connection, handshake: bytes):
        self.hub = hub
        self.make_connection = make_connection
        self.handshake = handshake
        self.transport: asyncio.Transport | None = None
        self.conn: "Connection | None" = None
        self.buf = bytearray()
        self.fragments: list[bytes] | None = None
        self.fragment_opcode = 0
        self.fragment_size = 0
        self.closing = False
        self.failed = False       # bad input: stop reading altogether
        self.paused = False
        self.lost = False
        self.max_size = hub.limits.max_frame_size
        self.max_outbound = hub.limits.max_outbound

    # --- asyncio.Protocol ----------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.handshake)
        self.handshake = b""
        self.conn = self.make_connection(self)

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self.buf += data
        if not self.paused:
            self._process()

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.lost = True
        if self.conn is not None:
            self.conn.on_transport_closed()

    # --- reading ---------------------------------------------------------------------
    def _resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    def _process(self) -> None:
        buf = self.buf
        pos = 0
        handled = 0
        end = len(buf)
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
            if b0 & 0x70:
                self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
                return
            if length + self.fragment_size > self.max_size:
                self._fail(CLOSE_TOO_BIG, f"message over {self.max_size} bytes")
                return
            start = pos + head + 4
            if end - start < length:
                break
            payload = unmask(bytes(buf[pos + head:start]), bytes(buf[start:start + length]))
            pos = start + length
            opcode = b0 & 0x0F
            if opcode >= OP_CLOSE:
                self._control(opcode, b0 & 0x80, payload)
                continue
            message = self._assemble(opcode, b0 & 0x80, payload)
            if message is None or self.closing:
                continue
            self._deliver(*message)
            handled += 1
            if handled >= YIELD_EVERY and end - pos >= 2:
                self.paused = True
                self.transport.pause_reading()
                asyncio.get_running_loop().call_soon(self._resume)
                break
        if not self.failed:
            del buf[:pos]

    def _assemble(self, opcode: int, fin: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode == OP_CONT:
            if self.fragments is None:
                self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a first frame")
                return None
            self.fragments.append(payload)
            self.fragment_size += len(payload)
            if not fin:
                return None
            opcode, payload = self.fragment_opcode, b"".join(self.fragments)
            self.fragments, self.fragment_size = None, 0
            return opcode, payload
        if opcode not in (OP_TEXT, OP_BINARY):
            self._fail(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
            return None
        if self.fragments is not None:
            self._fail(CLOSE_PROTOCOL_ERROR, "new message before the fragmented one ended")
            return None
        if not fin:
            self.fragments, self.fragment_opcode, self.fragment_size = [payload], opcode, len(payload)
            return None
        return opcode, payload

    def _control(self, opcode: int, fin: int, payload: bytes) -> None:
        if not fin or len(payload) > 125:
            return self._fail(CLOSE_PROTOCOL_ERROR, "fragmented or oversize control frame")
        if opcode == OP_PING:
            self._write(build_control(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            if not self.closing:  # the client started the closing handshake: echo its code
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else CLOSE_NORMAL
                if not valid_close_code(code):
                    code = CLOSE_PROTOCOL_ERROR
                self._write(build_control(OP_CLOSE, code.to_bytes(2, "big")))
                self.closing = True
            self.transport.close()
        # pongs need no answer

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
            code = CLOSE_UNSUPPORTED if binary and not serializer.supports_binary else CLOSE_BAD_DATA
            return self._fail(code, str(exc))
        conn.handle(msg)

    def _fail(self, code: int, reason: str) -> None:
        """Close for bad input: nothing more from this client is read."""
        if self.conn is not None and code in (CLOSE_PROTOCOL_ERROR, CLOSE_TOO_BIG):
            log.info("conn %s: closing with %d: %s", self.conn.label, code, reason)
        self.close(code, reason)
        self.failed = True
        self.buf.clear()
        if self.transport is not None:
            self.transport.close()   # flushes our close frame, then ends the TCP connection

    # --- the transport interface Connection writes through -------------------------------
    def prebuild(self, data: bytes, binary: bool) -> bytes:
        return build_frame(data, binary)

    def send(self, data: bytes, binary: bool) -> None:
        self.send_prebuilt(build_frame(data, binary))

    def send_prebuilt(self, frame: bytes) -> None:
        transport = self.transport
        if self.closing or transport is None:
            return
        transport.write(frame)
        if transport.get_write_buffer_size() > self.max_outbound:
            # No more data for it: the close frame queues behind the backlog, so a client that
            # is only slow reads everything it was sent, then 1013, and reconnects; one that
            # reads nothing is cut off when the grace period is over (_close_wait_over).
            self.hub.stats["slow_consumer_closes"] += 1
            log.info("conn %s: slow consumer, %d bytes unsent; closing with %d",
                     self.conn.label if self.conn else "?", transport.get_write_buffer_size(),
                     CLOSE_TRY_AGAIN_LATER)
            self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer", wait=SLOW_CONSUMER_GRACE)

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
        asyncio.get_running_loop().call_later(wait, self._close_wait_over)

    def _close_wait_over(self) -> None:
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
