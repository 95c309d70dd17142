"""The WebSocket transport at /socket/websocket: a thin Tornado handler over Connection.

The upgrade request runs the user's ``connect`` in a worker first and is
refused with 403 (as Phoenix does) when it says no.  Frames are decoded by the
connection's serializer; a frame that cannot be decoded closes the socket
with 1007/1003, as Phoenix drops a socket it cannot decode.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import socket as pysocket

from tornado import web, websocket
from tornado.iostream import SSLIOStream, StreamClosedError

from edge import serializer as serializers
from edge.connection import Connection
from edge.hub import ConnectRefused, EdgeHub
from edge.params import decode_params
from edge.serializer import DecodeError
from edge.wsframe import build_frame

log = logging.getLogger(__name__)

AUTH_TOKEN_PREFIX = "base64url.bearer.phx."
YIELD_EVERY = 16        # frames read from one client before other connections get a turn
CLOSE_BAD_DATA = 1007
CLOSE_UNSUPPORTED = 1003
CLOSE_TRY_AGAIN = 1013


def split_protocols(header: str) -> tuple[list[str], str | None]:
    """Sec-WebSocket-Protocol -> (protocols without the token element, auth token)."""
    items = [p.strip() for p in header.split(",") if p.strip()]
    tokens = [p for p in items if p.startswith(AUTH_TOKEN_PREFIX)]
    if len(tokens) != 1:
        return items, None
    raw = tokens[0][len(AUTH_TOKEN_PREFIX):]
    padded = raw + "=" * (-len(raw) % 4)
    try:
        token = base64.b64decode(padded.replace("-", "+").replace("_", "/"), validate=True)
        text = token.decode("latin-1")
    except (binascii.Error, ValueError):
        raise ValueError("undecodable auth token in Sec-WebSocket-Protocol") from None
    return [p for p in items if p is not tokens[0]], text


class PhoenixWebSocket(websocket.WebSocketHandler):
    frame_kind = "ws"

    def initialize(self, hub: EdgeHub) -> None:
        self.hub = hub
        self.conn: Connection | None = None
        self._socket_json = b""
        self._serializer = None
        self._auth_token: str | None = None
        self._frames_since_yield = 0

    async def prepare(self) -> None:
        if self.request.headers.get("Upgrade", "").lower() != "websocket":
            raise web.HTTPError(400, reason="Can \"Upgrade\" only to \"WebSocket\".")
        params = decode_params(self.request.query)
        vsn = params.get("vsn")
        self._serializer = serializers.serializer_for_vsn(vsn) if isinstance(vsn, str) or vsn is None else None
        if self._serializer is None:
            log.info("refused %s: unsupported vsn %.40r", self.request.remote_ip, vsn)
            raise web.HTTPError(403)
        try:
            _protocols, self._auth_token = split_protocols(
                self.request.headers.get("Sec-WebSocket-Protocol", ""))
        except ValueError as exc:
            log.info("refused %s: %s", self.request.remote_ip, exc)
            raise web.HTTPError(403) from None
        try:
            self._socket_json = await self.hub.connect(params, self.connect_info())
        except ConnectRefused as exc:
            log.info("refused %s: %s", self.request.remote_ip, exc)
            raise web.HTTPError(503 if exc.unavailable else 403) from None

    def connect_info(self) -> dict:
        req = self.request
        peer = req.connection.stream.socket.getpeername() if req.connection and req.connection.stream.socket else None
        return {
            "peer_data": {"address": req.remote_ip, "port": peer[1] if peer else None},
            "uri": {"scheme": req.protocol, "host": req.host_name, "path": req.path, "query": req.query},
            "user_agent": req.headers.get("User-Agent"),
            "x_headers": {k.lower(): v for k, v in req.headers.get_all() if k.lower().startswith("x-")},
            "auth_token": self._auth_token,
            "transport": "websocket",
        }

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        # phoenix.js offers "phoenix" next to its auth token; it must be echoed.
        return "phoenix" if "phoenix" in subprotocols else None

    def get_compression_options(self):
        return None

    def open(self) -> None:
        label = f"{self.request.remote_ip}"
        self.conn = Connection(self.hub, self._serializer, self, self._socket_json, label)
        self.conn.label = f"{label}#{self.conn.conn_id.decode()}"
        self.hub.add_connection(self.conn)
        sock = self.ws_connection.stream.socket
        if sock is not None:
            sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)

    def on_message(self, message):
        conn = self.conn
        if conn is None:
            return None
        try:
            if isinstance(message, bytes):
                msg = conn.serializer.decode_binary(message)
            else:
                msg = conn.serializer.decode_text(message)
        except DecodeError as exc:
            self.hub.stats["bad_frames"] += 1
            log.info("conn %s: closing, undecodable %s frame: %s", conn.label,
                     "binary" if isinstance(message, bytes) else "text", exc)
            self.close(CLOSE_UNSUPPORTED if isinstance(message, bytes) and not conn.serializer.supports_binary
                       else CLOSE_BAD_DATA, str(exc)[:100])
            return None
        conn.handle(msg)
        self._frames_since_yield += 1
        if self._frames_since_yield >= YIELD_EVERY:
            # Tornado reads ~256 KB of small frames before yielding; let others run.
            self._frames_since_yield = 0
            return asyncio.sleep(0)
        return None

    def on_close(self) -> None:
        if self.conn is not None:
            self.conn.on_transport_closed()

    # --- the transport interface Connection writes through ---------------------------
    def prebuild(self, data: bytes, binary: bool) -> bytes:
        return build_frame(data, binary)

    def send(self, data: bytes, binary: bool) -> None:
        self.send_prebuilt(build_frame(data, binary))

    def send_prebuilt(self, frame: bytes) -> None:
        ws = self.ws_connection
        if ws is None or ws.client_terminated or ws.server_terminated:
            return
        stream = ws.stream
        if stream.closed():
            return
        # Write straight to the socket when nothing is queued (the common case):
        # no Future, no buffer copy.  Queue the rest in the IOStream.
        if not stream._write_buffer and not isinstance(stream, SSLIOStream):
            try:
                sent = stream.socket.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent == len(frame):
                return
            frame = frame[sent:]
        if len(stream._write_buffer) + len(frame) > self.hub.limits.max_outbound:
            self.hub.stats["slow_consumer_closes"] += 1
            log.info("conn %s: slow consumer, %d bytes unsent; closing",
                     self.conn.label if self.conn else "?", len(stream._write_buffer))
            self.close(CLOSE_TRY_AGAIN, "slow consumer")
            return
        try:
            stream.write(frame)
        except StreamClosedError:
            pass
