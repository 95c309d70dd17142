"""The LongPoll endpoint at /socket/longpoll, in Tornado (docs/protocol.md §6).

For clients that cannot keep a WebSocket (proxies that strip upgrades, phoenix.js's
``longPollFallbackMs``).  Every answer is HTTP 200 with the logical status in a JSON
body, because that is what phoenix.js reads: a GET without a session runs the user's
``connect`` exactly as the WebSocket upgrade does and answers 410 with a new session
token; a GET with one waits for frames; a POST carries the client's frames.  The
session itself (buffer, poll, POST decoding) is ``edge/lpsession.py``; requests whose
session lives on another edge are relayed by ``edge/lphub.py``.

The body streams in (``@stream_request_body``): ``prepare`` answers a POST without a
well-formed session token, or with one naming a session this edge does not hold, from the
headers alone (``{"status":410}``, the connection closed), so no body is read for it.
``edge/httplimits.py`` bounds the body's size, its time and the edge's bytes in flight.
"""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import parse_qsl

from tornado import web

from zchannels.edge import serializer as serializers
from zchannels.edge.admission import Refusals
from zchannels.edge.connectrpc import ConnectRefused
from zchannels.edge.handshake import connect_info, origin_allowed
from zchannels.edge.hub import EdgeHub
from zchannels.edge.lpsession import GONE, parse_token
from zchannels.edge.params import decode_params

log = logging.getLogger(__name__)

FORBIDDEN = b'{"status":403}'
UNAVAILABLE = b'{"status":500}'   # phoenix.js retries 403 and 500 alike; 500 says "not your fault"
TOKEN_HEADER = "X-Phoenix-Longpoll-Token"      # phoenix.js 1.9; 1.8 sends the `token` param
AUTH_HEADER = "X-Phoenix-AuthToken"


@web.stream_request_body
class LongPollHandler(web.RequestHandler):
    # Phoenix answers other methods with an empty 400 rather than 405.
    SUPPORTED_METHODS = ("GET", "POST", "OPTIONS", "HEAD", "PUT", "PATCH", "DELETE")

    def initialize(self, hub: EdgeHub, refused: Refusals) -> None:
        self.hub = hub
        self.refused = refused
        self._pending: asyncio.Future | None = None
        self._token = None
        self._chunks: list[bytes] = []

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Access-Control-Allow-Origin", "*")

    def compute_etag(self) -> None:
        return None   # every poll is news: never let a client or proxy answer it with a 304

    def prepare(self) -> None:
        if self.request.method not in ("GET", "POST", "OPTIONS"):
            self.set_status(400)
            self.clear_header("Content-Type")
            self.finish()
        elif not origin_allowed(self.hub.origin_check, self.request, self.refused):
            self.finish(FORBIDDEN)
        elif self.request.method == "POST":
            self._token = parse_token(self.session_token())
            if not self._may_hold(self._token):
                self.refused("longpoll_posts_refused", "refused %s: LongPoll POST %s; 410 before "
                             "its body", self.request.remote_ip,
                             "without a session token" if self._token is None
                             else f"for session {self._token.sid}, not held here")
                self.finish(GONE)

    def _may_hold(self, token) -> bool:
        """Could this token's session take a POST?  Only this edge's own sessions are known
        here; another edge's token is relayed and answered by its holder."""
        if token is None:
            return False
        if token.edge != self.hub.edge_id:
            return True
        session = self.hub.longpoll.sessions.get(token.sid)
        return session is not None and session.owns(token)

    def data_received(self, chunk: bytes) -> None:
        self._chunks.append(chunk)   # bounded by the route's limit in edge/httplimits.py

    def options(self) -> None:
        self.clear_header("Content-Type")
        self.set_header("Access-Control-Allow-Headers",
                        self.request.headers.get("Access-Control-Request-Headers", ""))
        self.set_header("Access-Control-Allow-Methods", "get, post, options")
        self.set_header("Access-Control-Max-Age", "3600")
        self.finish()

    async def get(self) -> None:
        token = parse_token(self.session_token())
        if token is None:
            await self.new_session()
            return
        await self.answer(token, b"GET", b"")

    async def post(self) -> None:
        body = b"".join(self._chunks)
        self._chunks = []
        await self.answer(self._token, b"POST", body)

    def session_token(self) -> str | None:
        """The header first (phoenix.js 1.9), else the LAST `token` param: an app's own
        `token` param comes before the one phoenix.js appends (docs/protocol.md §6.3)."""
        header = self.request.headers.get(TOKEN_HEADER)
        if header:
            return header
        values = [v for k, v in parse_qsl(self.request.query, keep_blank_values=True) if k == "token"]
        return values[-1] if values else None

    async def answer(self, token, method: bytes, body: bytes) -> None:
        content_type = self.request.headers.get("Content-Type", "")
        # Run it as a task, so a client hanging up cancels its poll (on_connection_close)
        # instead of leaving the session a waiter nobody will read.
        self._pending = asyncio.ensure_future(
            self.hub.longpoll.request(token, method, content_type, body))
        try:
            status, answer = await self._pending
        except asyncio.CancelledError:
            return
        finally:
            self._pending = None
        self.set_status(status)
        self.finish(answer)

    def on_connection_close(self) -> None:
        super().on_connection_close()   # a body still streaming in is abandoned
        self._chunks = []
        if self._pending is not None:
            self._pending.cancel()

    # --- a new session -----------------------------------------------------------------------
    async def new_session(self) -> None:
        req = self.request
        params = decode_params(req.query)
        vsn = params.get("vsn")
        serializer = serializers.serializer_for_vsn(vsn) if vsn is None or isinstance(vsn, str) else None
        if serializer is None:
            self.refused("connect_refusals", "refused %s: unsupported vsn %.40r", req.remote_ip, vsn)
            self.finish(FORBIDDEN)
            return
        try:
            socket_json = await self.hub.connect(params, self.connect_info())
        except ConnectRefused as exc:
            self.refused("connect_unavailable" if exc.unavailable else "connect_refusals",
                         "refused %s (longpoll): %s", req.remote_ip, exc)
            self.finish(UNAVAILABLE if exc.unavailable else FORBIDDEN)
            return
        if self.request.connection.stream.closed():
            return    # the client gave up while connect ran: no session nobody would poll
        session = self.hub.longpoll.create(serializer, socket_json, req.remote_ip)
        self.finish(b'{"status":410,"token":' + session.token_json + b',"messages":[]}')

    def connect_info(self) -> dict:
        # Sent raw on every GET; only the first one's counts (docs/protocol.md §2.3).
        return connect_info(self.request, self.request.headers.get(AUTH_HEADER), "longpoll")
