"""The WebSocket endpoint at /socket/websocket: the HTTP upgrade, in Tornado.

The upgrade request runs the user's ``connect`` in a worker first and is
refused with 403 (as Phoenix does) when it says no, or 503 when no worker is
up.  Once accepted, the socket leaves Tornado for ``wsproto.WebSocketProtocol``
on the event loop's own transport, which frames and parses the WebSocket; on a
TLS edge, on ``tlstransport.TLSTransport`` over the same TLS session.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import socket as pysocket

from tornado import web
from tornado.iostream import SSLIOStream

from zchannels.edge import serializer as serializers
from zchannels.edge.connection import Connection
from zchannels.edge.connectrpc import ConnectRefused
from zchannels.edge.handshake import connect_info, origin_allowed
from zchannels.edge.hub import EdgeHub
from zchannels.edge.params import decode_params
from zchannels.edge.tlstransport import TLSStream, TLSTransport
from zchannels.edge.wsdeflate import DeflateWebSocketProtocol, negotiate
from zchannels.edge.wsproto import WebSocketProtocol

log = logging.getLogger(__name__)

AUTH_TOKEN_PREFIX = "base64url.bearer.phx."
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"   # RFC 6455 §1.3


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


def accept_value(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


class WebSocketUpgrade(web.RequestHandler):
    def initialize(self, hub: EdgeHub, refused) -> None:
        self.hub = hub
        self.refused = refused   # counted, one log line a second per kind (edge/admission.py)

    async def get(self) -> None:
        req = self.request
        headers = req.headers
        if headers.get("Upgrade", "").lower() != "websocket":
            raise web.HTTPError(400, reason='Can "Upgrade" only to "WebSocket".')
        if "upgrade" not in headers.get("Connection", "").lower():
            raise web.HTTPError(400, reason='"Connection" must be "Upgrade".')
        key = headers.get("Sec-WebSocket-Key", "")
        if headers.get("Sec-WebSocket-Version") != "13":
            self.set_header("Sec-WebSocket-Version", "13")
            raise web.HTTPError(426, reason="Only WebSocket version 13 is supported")
        if not key:
            raise web.HTTPError(400, reason="Missing Sec-WebSocket-Key")
        stream = req.connection.stream
        if isinstance(stream, SSLIOStream) and not isinstance(stream, TLSStream):
            # TLS the edge did not set up (edge/tls.py) could not be handed over.
            raise web.HTTPError(501, reason="Terminate TLS in front of the edge")
        if not origin_allowed(self.hub.origin_check, req, self.refused):
            raise web.HTTPError(403)
        params = decode_params(req.query)
        vsn = params.get("vsn")
        serializer = serializers.serializer_for_vsn(vsn) if vsn is None or isinstance(vsn, str) else None
        if serializer is None:
            self.refused("connect_refusals", "refused %s: unsupported vsn %.40r", req.remote_ip, vsn)
            raise web.HTTPError(403)
        try:
            protocols, auth_token = split_protocols(headers.get("Sec-WebSocket-Protocol", ""))
        except ValueError as exc:
            self.refused("connect_refusals", "refused %s: %s", req.remote_ip, exc)
            raise web.HTTPError(403) from None
        # phoenix.js offers "phoenix" next to its auth token, and fails unless it is echoed.
        protocol = "phoenix" if "phoenix" in protocols else None
        if protocols and protocol is None:
            self.refused("connect_refusals", "refused %s: no supported subprotocol in %.80r",
                         req.remote_ip, protocols)
            raise web.HTTPError(403)
        try:
            socket_json = await self.hub.connect(params, connect_info(req, auth_token, "websocket"))
        except ConnectRefused as exc:
            self.refused("connect_unavailable" if exc.unavailable else "connect_refusals",
                         "refused %s: %s", req.remote_ip, exc)
            raise web.HTTPError(503 if exc.unavailable else 403) from None
        response = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    "Connection: Upgrade\r\n"
                    f"Sec-WebSocket-Accept: {accept_value(key)}\r\n")
        if protocol:
            response += f"Sec-WebSocket-Protocol: {protocol}\r\n"
        deflate = negotiate(headers.get("Sec-WebSocket-Extensions", "")) if self.hub.limits.compress else None
        if deflate:
            response += f"Sec-WebSocket-Extensions: {deflate}\r\n"
        await self.hand_over((response + "\r\n").encode(), serializer, socket_json,
                             DeflateWebSocketProtocol if deflate else WebSocketProtocol)

    async def hand_over(self, handshake: bytes, serializer, socket_json: bytes,
                        protocol_class: type[WebSocketProtocol] = WebSocketProtocol) -> None:
        """Move the TCP connection from Tornado to a WebSocketProtocol on the loop."""
        stream = self.detach()
        label = self.request.remote_ip
        if stream.closed() or stream.socket is None:
            log.info("conn %s: hung up while connect ran", label)
            return
        hub = self.hub

        def make_connection(transport: WebSocketProtocol) -> Connection:
            conn = Connection(hub, serializer, transport, socket_json, label)
            conn.label = f"{label}#{conn.conn_id.decode()}"
            hub.add_connection(conn)
            return conn

        loop = asyncio.get_running_loop()
        if isinstance(stream, TLSStream):
            tls_sock = stream.release()
            tls_sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
            TLSTransport(loop, tls_sock, protocol_class(hub, make_connection, handshake))
            return
        # Take the descriptor itself (no dup: at the open-files limit there is none to spare).
        stream.io_loop.remove_handler(stream.socket)
        sock = pysocket.socket(fileno=stream.socket.detach())
        stream.close()   # its socket object no longer owns the descriptor
        sock.setblocking(False)
        sock.setsockopt(pysocket.IPPROTO_TCP, pysocket.TCP_NODELAY, 1)
        await loop.connect_accepted_socket(
            lambda: protocol_class(hub, make_connection, handshake), sock=sock)
