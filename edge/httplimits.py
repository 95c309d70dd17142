"""The edge's HTTP server with bounds on what a client may make it wait for or hold.

Every request to an edge (WebSocket upgrade, LongPoll, ``/api/broadcast``, ``/metrics``,
``/status``, static files) passes through ``RequestGate`` before it reaches its Tornado
handler.  The gate enforces:

- **Header timeout** (``--header-timeout``, 15 s): the whole header block must arrive within
  this time of the connection being accepted (or, on a keep-alive connection, of the last
  answer).  It is a deadline, not an idle timer, so a client trickling one header line every
  few seconds is cut as surely as a silent one: ``408`` and close.  A keep-alive connection
  that is simply idle that long is closed quietly.
- **Body timeout** (``--body-timeout``, 15 s): the whole body must arrive within this time of
  its headers: ``408`` and close.
- **Body size per route**, checked against ``Content-Length`` before any of the body is read
  and counted while a chunked body streams: ``413`` and close.  LongPoll POSTs may carry a
  full batch (``longpoll_body_limit``), ``/api/broadcast`` ``--max-api-body`` (4 MiB),
  everything else 64 KiB.
- **Request-body bytes in flight** (``--max-body-inflight``, 64 MiB for the edge): a body
  that would take the edge over it is answered ``503`` (``Retry-After: 1``) when its first
  bytes arrive, reserving its whole ``Content-Length`` then; the bytes count until its answer
  is sent.
- **Forwarding headers** only from ``--trusted-proxies`` (``edge/forwarded.py``).

Tornado's own ``header_timeout`` / ``body_timeout`` (``HTTP1ConnectionParameters``) are
deadlines of the same kind, but they close without an answer, a count or a log line, and
``max_body_size`` is one number for every route and answers 400; so the edge keeps its own
timers here and gives Tornado only a backstop body size.  The LongPoll and API handlers
stream their bodies (``@stream_request_body``) and check the session token or API key in
``prepare``, from the headers, before a byte of the body is read.

Pending-connection caps and the descriptor reserve are ``edge/admission.py``.
"""
from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream, SSLIOStream

from zchannels.edge.admission import Admission, Refusals, Slot
from zchannels.edge.forwarded import TrustedProxies
from zchannels.edge.lpsession import MAX_LINES

log = logging.getLogger("edge")

SMALL_BODY = 64 * 1024                 # the upgrade GET, /status, /metrics, static files
LONGPOLL_BODY_CEILING = 8 * 1024 * 1024   # Plug's default body limit, which Phoenix uses
LONGPOLL_PATH = "/socket/longpoll"
API_PATH = "/api/broadcast"

LINGER = 2.0      # seconds a refused connection is drained before it is closed
REFUSAL_KINDS = ("header_timeouts", "body_timeouts", "body_too_large", "body_inflight_refusals")


def longpoll_body_limit(max_frame_size: int) -> int:
    """Largest LongPoll POST body: a full batch of ``MAX_LINES`` frames of ``--max-frame-size``
    (with their line ends), at most 8 MiB (Plug's default) but never less than one frame,
    whose line is base64 (4/3 as long) when it is a binary frame."""
    batch = MAX_LINES * (max_frame_size + 2)
    one_binary_line = 4 * -(-max_frame_size // 3) + 2
    return max(one_binary_line, min(batch, LONGPOLL_BODY_CEILING))


@dataclass
class HttpLimits:
    header_timeout: float = 15.0
    body_timeout: float = 15.0
    longpoll_body: int = LONGPOLL_BODY_CEILING
    api_body: int = 4 * 1024 * 1024
    small_body: int = SMALL_BODY
    max_body_inflight: int = 64 * 1024 * 1024
    max_pending: int = 2000
    max_pending_per_peer: int = 64

    def body_limit(self, path: str) -> int:
        if path == LONGPOLL_PATH:
            return self.longpoll_body
        if path == API_PATH:
            return self.api_body
        return self.small_body

    def describe(self) -> str:
        return (f"header/body timeouts {self.header_timeout:g}/{self.body_timeout:g}s, bodies "
                f"longpoll {self.longpoll_body} api {self.api_body} other {self.small_body} "
                f"in flight {self.max_body_inflight}, pending {self.max_pending_per_peer}/peer "
                f"{self.max_pending} total")


def raw_response(status: int, reason: str, text: str, headers: str = "") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for refusals outside a handler."""
    body = text.encode() + b"\n"
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n").encode() + body


class EdgeHTTPServer(HTTPServer):
    """Tornado's HTTPServer, with a RequestGate in front of every request of a connection
    accepted through ``edge/accept.py`` (which admits it and hands over its Slot)."""

    def initialize(self, request_callback, limits: HttpLimits, admission: Admission,
                   trusted: TrustedProxies, refusals: Refusals, **kwargs) -> None:
        # Tornado's own limit is only a backstop: the gate answers 413 per route first.
        biggest = max(limits.longpoll_body, limits.api_body, limits.small_body)
        super().initialize(request_callback, xheaders=False, max_body_size=2 * biggest, **kwargs)
        self.limits = limits
        self.admission = admission
        self.trusted = trusted
        self.refused = refusals
        self.loop = asyncio.get_running_loop()
        self.slots: dict[IOStream, Slot] = {}

    def handle_stream(self, stream: IOStream, address: tuple, slot: Slot | None = None) -> None:
        if slot is not None:
            self.slots[stream] = slot
        super().handle_stream(stream, address)

    def start_request(self, server_conn, request_conn):
        delegate = super().start_request(server_conn, request_conn)
        slot = self.slots.get(server_conn.stream)
        if slot is None:
            return delegate
        self.admission.request_started(slot)
        slot.request = RequestGate(self, slot, request_conn, delegate)
        return slot.request

    def on_close(self, server_conn) -> None:
        super().on_close(server_conn)
        slot = self.slots.pop(server_conn.stream, None)
        if slot is not None:
            if slot.request is not None:
                # Its timer would keep the request, stream and all, alive until it fired.
                slot.request.timer.cancel()
                slot.request = None
            self.admission.closed(slot)


class RequestGate(httputil.HTTPMessageDelegate):
    """One request on its way to the application: deadlines, body bounds, client address."""

    def __init__(self, server: EdgeHTTPServer, slot: Slot, conn, inner: httputil.HTTPMessageDelegate):
        self.server = server
        self.slot = slot
        self.conn = conn                 # tornado's HTTP1Connection for this request
        self.inner = inner
        self.limit = 0
        self.received = 0
        self.length: int | None = None
        self.started = False             # the inner delegate has seen the headers
        self.refused = False
        self.upgrade = False
        self.timer = server.loop.call_later(server.limits.header_timeout, self._header_timeout)

    # --- tornado's delegate interface ------------------------------------------------------------
    def headers_received(self, start_line, headers):
        self.timer.cancel()
        server, slot = self.server, self.slot
        slot.requests += 1
        context = self.conn.context
        scheme = "https" if isinstance(self.conn.stream, SSLIOStream) else "http"
        if slot.trusted:
            context.remote_ip, context.protocol = server.trusted.client(slot.ip, scheme, headers)
        else:
            context.remote_ip, context.protocol = slot.ip, scheme
        # An upgrade stays pending until it is handed over or answered: its connect runs first.
        self.upgrade = headers.get("Upgrade", "").lower() == "websocket"
        self.limit = server.limits.body_limit(start_line.path.partition("?")[0])
        has_body = "Transfer-Encoding" in headers
        length = headers.get("Content-Length")
        if length is not None:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None      # tornado answers 400 for it
            else:
                has_body = self.length > 0
                if self.length > self.limit:
                    self.conn.set_max_body_size(self.length)   # no 400 of Tornado's behind ours
                    self._refuse(413, "Payload Too Large", "body_too_large",
                                 f"request body of {self.length} bytes; at most {self.limit} "
                                 f"accepted on {start_line.path.partition('?')[0]}")
                    return None
        if has_body:
            self.timer = server.loop.call_later(server.limits.body_timeout, self._body_timeout)
        self.started = True
        return self.inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes):
        if self.refused:
            return None
        self.received += len(chunk)
        if self.received > self.limit:
            self._refuse(413, "Payload Too Large", "body_too_large",
                         f"request body over the {self.limit} bytes accepted on this route")
            return None
        # A body of known length reserves all of it with its first bytes; a chunked one grows.
        need = max(self.length or 0, self.received) - self.slot.body_reserved
        if need > 0 and not self.server.admission.reserve_body(self.slot, need):
            self._refuse(503, "Service Unavailable", "body_inflight_refusals",
                         "too many request-body bytes in flight on this edge; retry later",
                         headers="Retry-After: 1\r\n")
            return None
        return self.inner.data_received(chunk)

    def finish(self) -> None:
        self.timer.cancel()
        if not self.upgrade:
            self.server.admission.request_read(self.slot)
        if not self.refused:
            self.inner.finish()

    def on_connection_close(self) -> None:
        self.timer.cancel()
        if self.started:
            self.started = False
            self.inner.on_connection_close()

    # --- refusals ----------------------------------------------------------------------------
    def _header_timeout(self) -> None:
        stream = self.conn.stream
        if stream is None or stream.closed():
            return
        if self.slot.requests:
            stream.close()      # an idle keep-alive connection, not an attack: close quietly
            return
        self._refuse(408, "Request Timeout", "header_timeouts",
                     f"request headers not complete within {self.server.limits.header_timeout:g}s "
                     f"(--header-timeout)")

    def _body_timeout(self) -> None:
        self._refuse(408, "Request Timeout", "body_timeouts",
                     f"request body not complete within {self.server.limits.body_timeout:g}s "
                     f"(--body-timeout): {self.received} of "
                     f"{self.length if self.length is not None else '?'} bytes")

    def _refuse(self, status: int, reason: str, kind: str, text: str, headers: str = "") -> None:
        """Answer ``status`` ourselves, close, count and log; the handler (if it has seen the
        headers) is told the connection closed, so it lets go of the request."""
        if self.refused:
            return
        self.refused = True
        self.timer.cancel()
        self.server.refused(kind, "refused %s: %d %s", self.slot.label, status, text)
        if self.started:
            self.started = False
            self.inner.on_connection_close()
        stream = self.conn.stream
        # (Tornado keeps no public flag for "the handler has answered"; if it has, that answer
        # stands and its connection closes when written.)
        if stream is None or stream.closed() or getattr(self.conn, "_write_finished", False):
            return
        if isinstance(stream, SSLIOStream) and stream.socket.version() is None:
            stream.close()      # no TLS session yet, so no way to send an answer
            return
        try:
            done = stream.write(raw_response(status, reason, text, headers))
        except Exception:         # StreamClosedError: the peer went first
            stream.close()
            return
        loop = self.server.loop

        def linger(_) -> None:
            # Closing with unread input would send a reset, which can destroy the answer before
            # the client reads it; so send the answer and a FIN, drop what still comes in, and
            # close when the client does or after LINGER seconds (nginx's lingering close).
            try:
                stream.socket.shutdown(socket.SHUT_WR)
            except (AttributeError, OSError):     # already closed
                stream.close()
                return
            loop.call_later(LINGER, stream.close)

        if done.done():
            linger(done)
        else:
            done.add_done_callback(linger)
            loop.call_later(LINGER + 3.0, stream.close)   # nor a client that does not read
