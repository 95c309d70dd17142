"""A tiny raw WebSocket client for the tests that phoenix.js cannot express (malformed frames,
V1 serializer, exact wire checks).

Tornado's client runs on one private event loop thread shared by every `RawWS`; the test thread
stays synchronous. Received messages land in a thread-safe queue, so `recv(timeout)` never leaves
a half-read future behind.

    ws = RawWS.connect(f"{cluster.ws_urls[0]}/websocket?vsn=2.0.0")
    ws.send_json([None, "1", "phoenix", "heartbeat", {}])
    assert ws.recv_json(2) == [None, "1", "phoenix", "phx_reply", {"status": "ok", "response": {}}]
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from typing import Any

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect

_CLOSED = object()


class _LoopThread:
    _lock = threading.Lock()
    _instance: "_LoopThread | None" = None

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="rawws-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> "_LoopThread":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class HandshakeRefused(Exception):
    """The server answered the upgrade with an HTTP error (e.g. 403)."""

    def __init__(self, code: int, message: str):
        super().__init__(f"HTTP {code}: {message}")
        self.code = code


class RawWS:
    def __init__(self, url: str) -> None:
        self.url = url
        self._queue: queue.Queue = queue.Queue()
        self.conn: WebSocketClientConnection | None = None
        self._closed = threading.Event()
        self.received: list[str | bytes] = []

    @classmethod
    def connect(cls, url: str, timeout: float = 5.0, headers: dict | None = None,
                subprotocols: list[str] | None = None, max_message_size: int = 64 * 1024 * 1024) -> "RawWS":
        """Open `url` (the full ws://HOST:PORT/socket/websocket?... address)."""
        self = cls(url)
        lt = _LoopThread.get()

        def on_message(msg):
            if msg is None:
                self._closed.set()
                self._queue.put(_CLOSED)
            else:
                self._queue.put(msg)

        async def open_():
            req = HTTPRequest(url, headers=headers or {}, connect_timeout=timeout, request_timeout=timeout)
            return await websocket_connect(req, on_message_callback=on_message, subprotocols=subprotocols,
                                           max_message_size=max_message_size)

        try:
            self.conn = lt.run(open_(), timeout + 1)
        except HTTPClientError as e:
            raise HandshakeRefused(e.code, str(e)) from None
        return self

    # ---- sending ---------------------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Send one frame: str -> text frame, bytes -> binary frame. Silently nothing if closed."""
        assert self.conn is not None
        conn = self.conn

        def write():
            try:
                conn.write_message(data, binary=isinstance(data, bytes))
            except Exception:   # closed already: the test observes that through recv/close_code
                pass

        _LoopThread.get().call(write)

    def send_text(self, text: str) -> None:
        self.send(text)

    def send_binary(self, data: bytes) -> None:
        self.send(bytes(data))

    def send_json(self, value: Any) -> None:
        self.send(json.dumps(value, separators=(",", ":")))

    # ---- receiving -------------------------------------------------------------------------

    def recv(self, timeout: float = 5.0) -> str | bytes | None:
        """Next message; None once the connection is closed; TimeoutError if nothing came."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message from {self.url} within {timeout}s") from None
        if item is _CLOSED:
            self._queue.put(_CLOSED)   # stay closed for later calls
            return None
        self.received.append(item)
        return item

    def recv_json(self, timeout: float = 5.0) -> Any:
        msg = self.recv(timeout)
        if msg is None:
            raise ConnectionError(f"connection closed (code={self.close_code}, reason={self.close_reason!r})")
        assert isinstance(msg, str), f"expected a text frame, got binary {msg!r}"
        return json.loads(msg)

    def recv_until(self, pred, timeout: float = 5.0) -> Any:
        """Skip messages (decoded as JSON when text) until pred(msg) is true; return that message."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message from {self.url} within {timeout}s")
            msg = self.recv(left)
            if msg is None:
                raise ConnectionError(f"connection closed (code={self.close_code}, reason={self.close_reason!r})")
            value = json.loads(msg) if isinstance(msg, str) else msg
            if pred(value):
                return value

    def wait_closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection within `timeout`."""
        return self._closed.wait(timeout)

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_code(self) -> int | None:
        return self.conn.close_code if self.conn is not None else None

    @property
    def close_reason(self) -> str | None:
        return self.conn.close_reason if self.conn is not None else None

    def close(self, code: int | None = None, reason: str | None = None) -> None:
        if self.conn is not None and not self.closed:
            conn = self.conn
            _LoopThread.get().call(lambda: conn.close(code, reason))
            self._closed.wait(2)

    def __enter__(self) -> "RawWS":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
