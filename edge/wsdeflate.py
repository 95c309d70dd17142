"""permessage-deflate (RFC 7692) for the edge's WebSockets, when the operator turns it on
(``--compress``; off by default, as in Phoenix).

The edge always negotiates ``server_no_context_takeover``: each message it sends is
compressed on its own, so a broadcast is compressed once per wire format and the fast lane
still writes the same frame bytes to every compressed subscriber (the connections without
the extension get the plain frame, built once too).  One compressor serves the whole
process: ``Z_FULL_FLUSH`` after each message resets its state, so every message inflates
with a fresh decompressor, and no connection holds a compressor of its own.

The edge also asks for ``client_no_context_takeover`` (RFC 7692 §7.1.1.2 lets a server
add it to its answer unasked): a client's compressed message then inflates on its own too,
and an idle connection holds no zlib state.  Inflating stops at ``--max-frame-size``
(``decompress(data, max_length)``): a decompression bomb is closed 1009 without being
inflated past the limit.

Offers the edge cannot honour (a ``server_max_window_bits`` below 15: the shared
compressor uses a 32 KiB window; unknown or repeated parameters) are declined, and the
connection goes on without compression.
"""
from __future__ import annotations

import logging
import zlib

from zchannels.edge.wsframe import build_frame, frame_with
from zchannels.edge.wsproto import CLOSE_BAD_DATA, CLOSE_TOO_BIG, OP_CONT, WebSocketProtocol

log = logging.getLogger(__name__)

EXTENSION = "permessage-deflate"
RSV1 = 0x40
MIN_SIZE = 64              # messages shorter than this go uncompressed (RSV1 clear, RFC 7692 §6)
LEVEL = 6                  # zlib's default: broadcasts are compressed once for many
TAIL = b"\x00\x00\xff\xff"  # the empty stored block every flushed message ends with (RFC 7692 §7.2.1)

_compressor = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)


def deflate(data: bytes) -> bytes:
    """One message's payload, compressed without context (RFC 7692 §7.2.1: the TAIL removed)."""
    out = _compressor.compress(data) + _compressor.flush(zlib.Z_FULL_FLUSH)
    return out[:-4]


def build_deflated_frame(data: bytes, binary: bool) -> bytes:
    """A whole server frame for ``data``: compressed (RSV1 set) unless it is too short to gain."""
    if len(data) < MIN_SIZE:
        return build_frame(data, binary)
    return frame_with(0xC2 if binary else 0xC1, deflate(data))


def negotiate(header: str) -> str | None:
    """Sec-WebSocket-Extensions of an upgrade request -> the value to answer, or None to go on
    without the extension.  The first offer of permessage-deflate the edge can honour wins."""
    for offer in header.split(","):
        name, *params = [part.strip() for part in offer.split(";")]
        if name.lower() != EXTENSION:
            continue
        answer = _accept(params)
        if answer is not None:
            return answer
    return None


def _accept(params: list[str]) -> str | None:
    seen: dict[str, str | None] = {}
    for param in params:
        key, eq, value = param.partition("=")
        key = key.strip().lower()
        value = value.strip().strip('"') if eq else None
        if key in seen:
            return None                       # RFC 7692 §7: a repeated parameter declines the offer
        seen[key] = value
    answer = [EXTENSION, "server_no_context_takeover", "client_no_context_takeover"]
    for key, value in seen.items():
        if key in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif key == "server_max_window_bits":
            if not _window_bits(value) or value != "15":
                return None                   # a smaller window than the shared compressor's
            answer.append("server_max_window_bits=15")
        elif key == "client_max_window_bits":
            # Any client window inflates with wbits 15; the edge does not narrow it.
            if value is not None and not _window_bits(value):
                return None
        else:
            return None
    return "; ".join(answer)


def _window_bits(value: str | None) -> bool:
    return value is not None and value.isdigit() and 8 <= int(value) <= 15


class DeflateWebSocketProtocol(WebSocketProtocol):
    """A WebSocket that agreed permessage-deflate.  Its ``frame_kind`` differs from the plain
    one's, so the fast lane (which keys prebuilt frames on the serializer and the frame kind)
    builds its compressed frame once per broadcast, apart from the plain one."""

    frame_kind = "ws-deflate"
    __slots__ = ("rsv1", "inflater")

    def __init__(self, hub, make_connection, handshake: bytes):
        super().__init__(hub, make_connection, handshake)
        self.rsv1 = False         # the frame being read has RSV1 set
        self.inflater: "zlib._Decompress | None" = None   # while a compressed message comes in

    def _reserved_bits(self, b0: int) -> bool:
        # RSV1 marks the first frame of a compressed data message (RFC 7692 §6.1); RSV2/3, or RSV1 on a
        # control frame or a continuation, remain protocol errors.
        opcode = b0 & 0x0F
        if b0 & 0x30 or opcode == OP_CONT or opcode >= 0x8:
            return super()._reserved_bits(b0)
        self.rsv1 = True
        return True

    def _assemble(self, opcode: int, fin: int, payload: bytes):
        if self.rsv1:
            self.rsv1 = False
            if self.fragments is not None:    # fails: a new message before the last ended
                return super()._assemble(opcode, fin, payload)
            self.inflater = zlib.decompressobj(-15)
        elif opcode != OP_CONT or self.inflater is None:
            return super()._assemble(opcode, fin, payload)
        payload = self._inflate(payload, fin)
        if payload is None:
            return None
        if fin:
            self.inflater = None
        return super()._assemble(opcode, fin, payload)

    def _check_partial(self, buf: bytearray, pos: int, start: int, end: int, b0: int):
        if self.rsv1 or self.inflater is not None:
            return None                 # compressed bytes: checked once inflated
        return super()._check_partial(buf, pos, start, end, b0)

    def _inflate(self, payload: bytes, fin: int) -> bytes | None:
        room = self.max_size - self.fragment_size
        try:
            out = self.inflater.decompress(payload + TAIL if fin else payload, room + 1)
        except zlib.error as exc:
            self.hub.stats["bad_frames"] += 1
            log.info("conn %s: closing, undecodable compressed frame: %s",
                     self.conn.label if self.conn else "?", exc)
            self._fail(CLOSE_BAD_DATA, "invalid compressed data")
            return None
        if len(out) > room:
            self._fail(CLOSE_TOO_BIG, f"message over {self.max_size} bytes once inflated")
            return None
        return out

    def _drop_input(self) -> None:
        super()._drop_input()
        self.inflater = None

    def connection_lost(self, exc) -> None:
        self.inflater = None
        super().connection_lost(exc)

    # --- writing: compressed frames --------------------------------------------------------
    def prebuild(self, data: bytes, binary: bool) -> bytes:
        return build_deflated_frame(data, binary)

    def send(self, data: bytes, binary: bool) -> None:
        self.send_prebuilt(build_deflated_frame(data, binary))

