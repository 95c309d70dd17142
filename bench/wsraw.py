"""Raw client sockets for bench/attackers.py: TCP from a chosen loopback source address, a
hand-written WebSocket upgrade and frames, a minimal Phoenix V2 client, and an HTTP response
reader. Everything here writes exactly the bytes an attacker would; nothing is validated.

All functions are asyncio coroutines over non-blocking sockets (`loop.sock_*`), so one event
loop drives thousands of connections; every socket opened goes into a `Sockets` set that the
caller closes at the end, whatever happened.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import time


class Sockets:
    """Every socket an attack opened, closed by `close_all()` (also after an exception)."""

    def __init__(self) -> None:
        self.open: set[socket.socket] = set()

    def add(self, sock: socket.socket) -> socket.socket:
        self.open.add(sock)
        return sock

    def close(self, sock: socket.socket) -> None:
        self.open.discard(sock)
        try:
            sock.close()
        except OSError:
            pass

    def close_all(self) -> None:
        for sock in list(self.open):
            self.close(sock)


async def tcp_connect(socks: Sockets, src: str, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A connected non-blocking TCP socket whose source address is `src` (any of 127/8 reaches
    loopback on Linux)."""
    sock = socks.add(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((src, 0))
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), timeout)
    except BaseException:
        socks.close(sock)
        raise
    return sock


async def read_head(sock: socket.socket, limit: int = 65536) -> tuple[int, bytes, bytes]:
    """Read an HTTP response head: (status, head bytes, bytes after the head). ConnectionError
    when the server closes first."""
    loop = asyncio.get_running_loop()
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head ({len(buf)} bytes read)")
        buf += chunk
        if len(buf) > limit:
            raise ConnectionError("response head too long")
    head, _, rest = buf.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ConnectionError(f"not an HTTP response: {head[:60]!r}") from None
    return status, head, rest


async def read_response(sock: socket.socket, limit: int = 65536) -> tuple[int, bytes]:
    """An HTTP response with a Content-Length body of at most `limit` bytes: (status, body)."""
    status, head, body = await read_head(sock)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = min(int(value), limit)
    loop = asyncio.get_running_loop()
    while len(body) < length:
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            break
        body += chunk
    return status, body[:length]


def upgrade_request(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def ws_open(socks: Sockets, src: str, host: str, port: int, path: str,
                  headers: dict[str, str] | None = None, timeout: float = 10.0) -> tuple[socket.socket, int, bytes]:
    """TCP connect from `src` and a real WebSocket upgrade: (socket, HTTP status, bytes read
    past the response head). The socket stays open whatever the status."""
    sock = await tcp_connect(socks, src, host, port, timeout)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.sock_sendall(sock, upgrade_request(host, port, path, headers)), timeout)
    status, _, rest = await asyncio.wait_for(read_head(sock), timeout)
    return sock, status, rest


def frame(opcode: int, payload: bytes = b"", fin: bool = True, length: int | None = None) -> bytes:
    """One client frame: masked, as RFC 6455 5.3 requires, with the all-zero key (the payload
    goes out as is). `length` announces a length other than len(payload) (an unfinished frame)."""
    n = len(payload) if length is None else length
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


PING, TEXT, BINARY, CLOSE = 0x9, 0x1, 0x2, 0x8


class FrameReader:
    """Server frames (unmasked) from a socket, starting with bytes already read."""

    def __init__(self, sock: socket.socket, buffered: bytes = b"") -> None:
        self.sock, self.buf = sock, bytearray(buffered)

    async def _need(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        while len(self.buf) < n:
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buf += chunk

    async def next(self) -> tuple[int, bytes]:
        await self._need(2)
        opcode, n = self.buf[0] & 0x0F, self.buf[1] & 0x7F
        at = 2
        if n == 126:
            await self._need(4)
            n, at = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            await self._need(10)
            n, at = int.from_bytes(self.buf[2:10], "big"), 10
        await self._need(at + n)
        payload = bytes(self.buf[at:at + n])
        del self.buf[:at + n]
        return opcode, payload


class PhxClient:
    """A minimal Phoenix V2 JSON client over a raw WebSocket: join, push, await a reply."""

    def __init__(self, sock: socket.socket, status: int, rest: bytes) -> None:
        self.sock, self.status = sock, status
        self.reader = FrameReader(sock, rest)
        self._ref = 0

    @classmethod
    async def open(cls, socks: Sockets, src: str, host: str, port: int, params: str = "user=bench",
                   headers: dict[str, str] | None = None, timeout: float = 10.0) -> "PhxClient":
        sock, status, rest = await ws_open(socks, src, host, port, f"/socket/websocket?vsn=2.0.0&{params}",
                                           headers, timeout)
        return cls(sock, status, rest)

    async def push(self, topic: str, event: str, payload: dict, join_ref: str | None = None) -> str:
        self._ref += 1
        ref = str(self._ref)
        msg = [join_ref if join_ref is not None else (ref if event == "phx_join" else None),
               ref, topic, event, payload]
        await asyncio.get_running_loop().sock_sendall(self.sock, frame(TEXT, json.dumps(msg).encode()))
        return ref

    async def reply(self, ref: str, timeout: float) -> dict:
        """The phx_reply payload for `ref` ({"status", "response"}); TimeoutError, ConnectionError."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply to ref {ref} within {timeout} s")
            opcode, payload = await asyncio.wait_for(self.reader.next(), left)
            if opcode == CLOSE:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                raise ConnectionError(f"closed by the server (code {code})")
            if opcode != TEXT:
                continue
            msg = json.loads(payload)
            if msg[1] == ref and msg[3] == "phx_reply":
                return msg[4]

    async def join(self, topic: str, payload: dict | None = None, timeout: float = 10.0) -> tuple[str, dict]:
        ref = await self.push(topic, "phx_join", payload or {})
        return ref, await self.reply(ref, timeout)
