"""A WebSocket client written out by hand on a plain blocking socket, for the tests that decide
when (and whether) the client reads: slow consumers, ping floods, unfinished frames.  `rcvbuf`
shrinks the socket's receive buffer, so that not reading soon stalls the edge's writes."""
from __future__ import annotations

import base64
import json
import os
import socket
import struct
from urllib.parse import urlsplit

from tornado.util import _websocket_mask as mask_bytes


def client_frame(opcode: int, payload: bytes, fin: bool = True, length: int | None = None) -> bytes:
    """A masked client frame; `length` may announce more payload than is given (an unfinished frame)."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + mask_bytes(key, payload)


class BlockingWS:
    def __init__(self, http_url: str, name: str, rcvbuf: int | None = None, extensions: str = ""):
        parts = urlsplit(http_url)
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect((parts.hostname, parts.port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /socket/websocket?vsn=2.0.0&user={name} HTTP/1.1\r\n"
                           f"Host: {parts.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                           + (f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else "")
                           + "\r\n").encode())
        self.buf = bytearray()
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        self.response_head = head.decode("latin-1")
        self.buf = bytearray(rest)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the edge closed the connection")
        self.buf += data

    def send(self, opcode: int, payload: bytes) -> None:
        self.sock.sendall(client_frame(opcode, payload))

    def send_json(self, value) -> None:
        self.send(0x1, json.dumps(value).encode())

    def recv_frame(self) -> tuple[int, bytes]:
        first, payload = self.recv_whole_frame()
        return first & 0x0F, payload

    def recv_whole_frame(self) -> tuple[int, bytes]:
        """The next frame as (its first byte: FIN, RSV bits and opcode, its payload)."""
        while True:
            buf = self.buf
            if len(buf) >= 2:
                n, head = buf[1] & 0x7F, 2
                if n == 126 and len(buf) >= 4:
                    n, head = struct.unpack("!H", buf[2:4])[0], 4
                elif n == 127 and len(buf) >= 10:
                    n, head = struct.unpack("!Q", buf[2:10])[0], 10
                if (n < 126 or head > 2) and len(buf) >= head + n:
                    got = buf[0], bytes(buf[head:head + n])
                    del buf[:head + n]
                    return got
            self._fill()

    def read_until_closed(self) -> int | None:
        """Read until the connection ends: the close code if a close frame came first, else
        None (EOF or reset)."""
        try:
            while True:
                opcode, payload = self.recv_frame()
                if opcode == 0x8:
                    return int.from_bytes(payload[:2], "big")
        except (EOFError, ConnectionResetError):
            return None

    def close(self) -> None:
        self.sock.close()
