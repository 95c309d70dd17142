"""zchannels workers: write Phoenix channel handlers in Python.

``from workers import Channel, Socket, ok, error, reply, noreply, stop, broadcast`` —
see ``workers.api`` for the manual.
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
from workers.routes import AppLoadError, load_app

__all__ = [
    "Channel", "Socket", "SocketState", "Timer", "ok", "error", "reply", "noreply", "stop",
    "broadcast", "BadReturn", "AppLoadError", "load_app",
]
