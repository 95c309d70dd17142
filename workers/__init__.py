"""zchannels workers: write Phoenix channel handlers in Python.

``from workers import Channel, Socket, ok, error, reply, noreply, stop, broadcast`` —
see ``workers.api`` for the manual.  ``presence_list(topic)`` and the channel methods
``track``/``update``/``untrack`` are
Presence (``workers.presence``).  ``sign_token`` / ``verify_token`` / ``TokenError`` are
Phoenix.Token (``workers.token``), for ``connect`` handlers and the web apps minting tokens.
"""
from workers.api import (
    BadReturn,
    Channel,
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
from workers.presence import presence_list
from workers.loadapp import AppLoadError, load_app
from workers.token import TokenError, sign as sign_token, verify as verify_token

__all__ = [
    "Channel", "Socket", "SocketState", "Timer", "ok", "error", "reply", "noreply", "stop",
    "broadcast", "presence_list", "BadReturn", "AppLoadError", "load_app", "sign_token", "verify_token", "TokenError",
]
