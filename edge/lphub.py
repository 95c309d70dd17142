"""The LongPoll sessions of one edge, and the relay that lets any edge answer for any session.

Behind a load balancer that is not sticky, consecutive requests of one LongPoll client
land on different edges, but its session (channels, buffered frames, the waiting poll)
lives on the edge that created it.  The session token names that edge, so the edge a
request reaches either serves it from its own table or relays it over the bus
(``LP_REQUEST`` -> holding edge -> ``LP_RESPONSE``) and writes the holder's answer;
Phoenix does the same between nodes through PubSub (docs/protocol.md §6.8).  A relayed poll
is held on the holding edge exactly like a local one, so "one poll per session" holds
whichever edges the polls arrive at.

It also ends sessions nobody polls any more: Phoenix's 1.5 x window inactivity rule.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING

from zchannels.bus import wire
from zchannels.edge.connection import Connection
from zchannels.edge.lpsession import GONE, LongPollSession, SessionToken, make_token, parse_token

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub

log = logging.getLogger(__name__)

RELAY_MARGIN = 2.0        # seconds a relaying edge waits beyond the poll window
GET, POST = b"GET", b"POST"
TIMED_OUT_POST = b'{"status":408}'   # Phoenix's answer when a POST was not acknowledged in time
SERVER_ERROR = b'{"status":500}'


class LongPollHub:
    def __init__(self, hub: "EdgeHub", window: float, inactivity: float):
        self.hub = hub
        self.window = window
        self.inactivity = inactivity
        self.max_buffered_bytes = hub.limits.max_outbound
        self.sessions: dict[str, LongPollSession] = {}
        self.stats = {"sessions": 0, "expired": 0, "relayed": 0, "relay_timeouts": 0,
                      "not_utf8_dropped": 0, "bad_posts": 0}
        self._relays: dict[bytes, asyncio.Future] = {}
        self._relay_ids = itertools.count(1)
        self._serving: set[asyncio.Task] = set()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def close(self) -> None:
        self._sweeper.cancel()

    # --- sessions ----------------------------------------------------------------------
    def create(self, serializer, socket_json: bytes, peer: str) -> LongPollSession:
        """A new session for a client whose connect the worker accepted."""
        session = LongPollSession(self)
        conn = Connection(self.hub, serializer, session, socket_json, peer)
        sid = conn.conn_id.decode()
        conn.label = f"{peer}#{sid}/lp"
        session.attach(conn, make_token(self.hub.edge_id, sid))
        self.sessions[sid] = session
        self.hub.add_connection(conn)
        self.stats["sessions"] += 1
        log.info("longpoll session %s started: conn %s, serializer %s", sid, conn.label,
                 serializer.name)
        return session

    def forget(self, session: LongPollSession) -> None:
        if self.sessions.get(session.token.sid) is session:
            del self.sessions[session.token.sid]

    async def _sweep(self) -> None:
        interval = max(0.05, min(5.0, self.inactivity / 3))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.idle_for(now) > self.inactivity:
                    self.stats["expired"] += 1
                    session.end(f"no poll for {self.inactivity:g}s", terminate_reason=b"inactive")

    # --- requests, wherever their session lives --------------------------------------------
    async def request(self, token: SessionToken, method: bytes, content_type: str,
                      body: bytes) -> tuple[int, bytes]:
        """(HTTP status, JSON body) for a GET or POST carrying a well-formed session token."""
        if token.edge == self.hub.edge_id:
            return await self.serve(token, method, content_type, body)
        return await self.relay(token, method, content_type, body)

    async def serve(self, token: SessionToken, method: bytes, content_type: str,
                    body: bytes, window: float | None = None) -> tuple[int, bytes]:
        session = self.sessions.get(token.sid)
        if session is None or not session.owns(token):
            # Phoenix would start a new session here; the client ignores it and starts over
            # anyway, and a stale token in place of the app's own `token` param would be
            # handed to connect (docs/protocol.md §6.3).
            return 200, GONE
        if method == GET:
            if window is None or window > self.window:
                window = self.window
            return 200, await session.poll(window)
        return session.post(content_type, body)

    async def relay(self, token: SessionToken, method: bytes, content_type: str,
                    body: bytes) -> tuple[int, bytes]:
        request_id = str(next(self._relay_ids)).encode()
        fut = asyncio.get_running_loop().create_future()
        self._relays[request_id] = fut
        self.stats["relayed"] += 1
        try:
            # The holder holds the poll no longer than we wait for it, whatever its own window:
            # an answer that came after we gave up would take the frames with it.
            hold_ms = str(int(self.window * 1000)).encode()
            self.hub.bus_send(wire.lp_request(token.edge, request_id, token.text.encode(),
                                              method, hold_ms, content_type.encode(), body))
            return await asyncio.wait_for(fut, self.window + RELAY_MARGIN)
        except asyncio.TimeoutError:
            # The holder is alive (a gone one comes back UNROUTABLE) but its answer was lost,
            # e.g. across a broker restart: a GET polls again, a POST makes the client reconnect.
            self.stats["relay_timeouts"] += 1
            log.info("no answer from edge %s for a relayed %s of session %s",
                     token.edge.decode(), method.decode(), token.sid)
            if method == GET:
                return 200, b'{"status":204,"token":"%s","messages":[]}' % token.text.encode()
            return 200, TIMED_OUT_POST
        finally:
            self._relays.pop(request_id, None)

    # --- the bus side of relaying -----------------------------------------------------------
    def on_bus_request(self, r: wire.LpRequest) -> None:
        """LP_REQUEST from another edge: serve it here and send back LP_RESPONSE."""
        token = parse_token(r.token.decode(errors="replace"))
        if token is None or token.edge != self.hub.edge_id or r.method not in (GET, POST):
            self._respond(r.peer, r.request_id, 200, GONE)
            return
        window = int(r.hold_ms) / 1000            # a ValueError is logged as a bad frame
        content_type = r.content_type.decode(errors="replace")
        task = asyncio.get_running_loop().create_task(
            self._serve_relayed(r.peer, r.request_id, token, r.method, window, content_type, r.body))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve_relayed(self, sender: bytes, request_id: bytes, token: SessionToken,
                             method: bytes, window: float, content_type: str, body: bytes) -> None:
        try:
            status, answer = await self.serve(token, method, content_type, body, window)
        except Exception:
            log.exception("relayed %s for session %s failed", method.decode(), token.sid)
            status, answer = 200, SERVER_ERROR
        self._respond(sender, request_id, status, answer)

    def _respond(self, dest: bytes, request_id: bytes, status: int, body: bytes) -> None:
        self.hub.bus_send(wire.lp_response(dest, request_id, str(status).encode(), body))

    def on_bus_response(self, r: wire.LpResponse) -> None:
        code = int(r.status)                          # a ValueError is logged as a bad frame
        if code not in (200, 400):
            raise ValueError(f"LP_RESPONSE with HTTP status {code}")
        fut = self._relays.get(r.request_id)
        if fut is not None and not fut.done():
            fut.set_result((code, r.body))

    def on_unroutable(self, r: wire.LpRequest) -> None:
        """Our LP_REQUEST found no edge: the holding edge is gone, and its sessions with it."""
        fut = self._relays.get(r.request_id)
        if fut is not None and not fut.done():
            fut.set_result((200, GONE))
