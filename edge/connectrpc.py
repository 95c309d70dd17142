"""The user's ``connect`` run in a worker, for a WebSocket upgrade or a new LongPoll session.

The edge sends CONNECT for placement (the broker picks a live worker) and waits for the
CONNECT_REPLY: the socket's JSON ({"assigns", "id"}) on ok, or the refusal.  A connect is
refused at once while the bus is down, when the broker has no worker (UNROUTABLE) and when
the bus goes down while it waits: the transports answer 503 for those, 403 for a refusal.
"""
from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING

import orjson

from zchannels.bus import wire

if TYPE_CHECKING:
    from zchannels.edge.hub import EdgeHub

CONNECT_TIMEOUT = 5.0
UNAVAILABLE = b"unavailable"   # the status of a connect no worker could take


class ConnectRefused(Exception):
    """The user's connect refused the client, or no worker could run it."""

    def __init__(self, reason: str, unavailable: bool = False):
        super().__init__(reason)
        self.unavailable = unavailable


class ConnectRpc:
    def __init__(self, hub: "EdgeHub"):
        self.hub = hub
        self.waiting: dict[bytes, asyncio.Future] = {}   # request id -> (status, body)
        self.refusing = False     # the edge is draining: no new connections

    def refuse_all(self) -> None:
        """The edge drains (SIGTERM): every connect from now on, and those waiting, get 503, so
        a client reusing a kept-alive HTTP connection cannot open sessions the drain would
        have to close one after another for ever."""
        self.refusing = True
        self.bus_down()

    async def call(self, params: dict, connect_info: dict) -> bytes:
        """Run the user's connect in a worker; return the socket JSON or raise ConnectRefused."""
        hub = self.hub
        if self.refusing:
            raise ConnectRefused("the edge is shutting down", unavailable=True)
        if hub.bus.broker_silent:
            raise ConnectRefused("the bus is down", unavailable=True)
        try:
            body = orjson.dumps({"params": params, "connect_info": connect_info})
        except TypeError as exc:
            raise ConnectRefused(f"params not JSON-serialisable: {exc}") from None
        # Unguessable, so only a worker the broker placed the connect on can answer it.  A copy
        # sent again (edge/replace.py) keeps it: the first answer takes the request off `waiting`.
        request_id = b"rpc" + hub.next_conn_id() + b"-" + os.urandom(8).hex().encode()
        fut = asyncio.get_running_loop().create_future()
        self.waiting[request_id] = fut
        frames = wire.connect(b"", request_id, body)
        hub.bus_send(frames)
        retry = hub.replacer.connect_sent(fut, frames)
        try:
            status, body = await asyncio.wait_for(fut, CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            raise ConnectRefused("no worker answered connect in time", unavailable=True) from None
        finally:
            retry.cancel()
            self.waiting.pop(request_id, None)
        if status == b"ok":
            return body
        if status == UNAVAILABLE:
            raise ConnectRefused("no worker available", unavailable=True)
        raise ConnectRefused(body.decode(errors="replace"))

    def on_reply(self, r: wire.ConnectReply) -> None:
        self._answer(r.request_id, r.status, r.body)

    def unplaced(self, c: wire.Connect) -> None:
        """The broker handed the CONNECT back: no worker to run it."""
        self._answer(c.request_id, UNAVAILABLE, b"")

    def bus_down(self) -> None:
        """Connects waiting for a worker get 503 now, not in CONNECT_TIMEOUT."""
        for fut in self.waiting.values():
            if not fut.done():
                fut.set_result((UNAVAILABLE, b""))

    def _answer(self, request_id: bytes, status: bytes, body: bytes) -> None:
        fut = self.waiting.get(request_id)
        if fut is not None and not fut.done():
            fut.set_result((status, body))
