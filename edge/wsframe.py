"""Server-to-client WebSocket frames (RFC 6455 §5.2), built once and written many times.

Frames from a server are never masked, so a frame is a 2-10 byte header followed by the
payload; the fast lane builds one such frame per broadcast and writes the same bytes to
every subscriber.  (Compressed frames, RSV1 set, come from ``wsdeflate`` through
``frame_with``.)
"""
from __future__ import annotations

import struct

TEXT = 0x1
BINARY = 0x2
FIN = 0x80


def build_frame(payload: bytes, binary: bool = False) -> bytes:
    first = FIN | (BINARY if binary else TEXT)
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload


def frame_with(first: int, payload: bytes) -> bytes:
    """A frame whose first byte (FIN, RSV bits, opcode) is given."""
    n = len(payload)
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", first, 126, n) + payload
    return struct.pack("!BBQ", first, 127, n) + payload
