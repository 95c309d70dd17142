"""zchannels workers: write Phoenix channel handlers in Python.

``from zchannels import Channel, Socket, ok, error, reply, noreply, stop, broadcast`` —
see ``workers.api`` for the manual.  ``presence_list(topic)`` and the channel methods
``track``/``update``/``untrack`` are
Presence (``workers.presence``).  ``sign_token`` / ``verify_token`` / ``TokenError`` are
Phoenix.Token (``workers.token``), for ``connect`` handlers and the web apps minting tokens.

The package is typed (``py.typed``): a type checker (mypy) checks a handler module against it.
The payload types (``workers.payload``) and result types (``workers.results``) are
importable from here too::

    from zchannels.workers import (Channel, HandlerResult, JoinResult, JSON, JSONObject, Payload,
                         Socket, SocketState, error, noreply, ok, reply)

    class RoomChannel(Channel):
        def join(self, topic: str, payload: JSON, socket: SocketState) -> JoinResult:
            return ok() if topic == "room:lobby" else error({"reason": "unauthorized"})

        async def handle_in(self, event: str, payload: Payload,
                            socket: SocketState) -> HandlerResult:
            if isinstance(payload, dict):          # a client may push any JSON, or bytes
                return reply("ok", {"echo": payload.get("body")})
            return noreply()

    socket = Socket()
    socket.channel("room:*", RoomChannel)

    @socket.connect
    def connect(params: JSONObject, socket: SocketState,
                connect_info: JSONObject) -> SocketState | bool:
        return socket.assign(user=params.get("user", "anonymous"))

``handle_out`` and ``handle_info`` return an ``OutResult``; ``Channel`` declares every
callback's result as ``MaybeAwaitable[...]`` so that an override may be ``def`` or
``async def``.
"""
from zchannels.workers.api import (
    BadReturn,
    Channel,
    ConnectResult,
    History,
    HistoryEntry,
    HistoryUnavailable,
    Socket,
    SocketState,
    Timer,
    broadcast,
    error,
    noreply,
    ok,
    reply,
    stop,
)
from zchannels.workers.payload import JSON, Binary, BroadcastPayload, JSONObject, OutPayload, Payload
from zchannels.workers.presence import PresenceEntry, PresenceState, presence_list
from zchannels.workers.results import HandlerResult, JoinResult, MaybeAwaitable, OutResult
from zchannels.workers.loadapp import AppLoadError, load_app
from zchannels.workers.token import TokenError, sign as sign_token, verify as verify_token

__all__ = [
    "Channel", "Socket", "SocketState", "Timer", "ok", "error", "reply", "noreply", "stop",
    "History", "HistoryEntry", "HistoryUnavailable",
    "broadcast", "presence_list", "BadReturn", "AppLoadError", "load_app", "sign_token", "verify_token", "TokenError",
    # types
    "JSON", "JSONObject", "Binary", "Payload", "BroadcastPayload", "OutPayload",
    "JoinResult", "HandlerResult", "OutResult", "MaybeAwaitable", "ConnectResult",
    "PresenceEntry", "PresenceState",
]
