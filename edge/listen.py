"""The edge's HTTP listening sockets, bound before anything else starts.

A port that cannot be bound (in use, privileged, an address this machine does not have, a
host name that does not resolve) is a ``StartupError`` naming the host and the port, so
`zchannels edge` says it in one line and exits with code 2 before it connects to the bus.
`edge --processes N` reserves the port the same way for its children (edge/multiproc.py).
"""
from __future__ import annotations

import errno
import socket

from tornado.netutil import bind_sockets

from zchannels.bus.startup import StartupError


def _where(host: str, port: int) -> str:
    return f"port {port} on {host}" if ":" not in host else f"port {port} on [{host}]"


def bind_problem(host: str, port: int, exc: OSError) -> str:
    """One line on why ``host``:``port`` could not be bound, naming the flags to change."""
    where = _where(host, port)
    if isinstance(exc, socket.gaierror):
        return f"--host {host!r} is not an address or a name this machine can resolve ({exc.strerror})"
    if exc.errno == errno.EADDRINUSE:
        return (f"{where} is already in use: stop the other process or choose another --port "
                f"(--port 0 takes any free one)")
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); choose another --port"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine"
    return f"cannot listen on {where}: {exc.strerror or exc}"


def listen_sockets(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Bound, listening sockets for ``host``:``port`` (IPv4 unless ``host`` has a colon)."""
    family = socket.AF_INET if ":" not in host else socket.AF_UNSPEC
    try:
        return bind_sockets(port, host, family=family, reuse_port=reuse_port)
    except OverflowError:   # a port number out of range, from the socket module
        raise StartupError(f"--port {port} is not a port number (0-65535)") from None
    except OSError as exc:
        raise StartupError(bind_problem(host, port, exc)) from None


def reserve_port(host: str, port: int = 0) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket on ``port`` (0: a free one, picked here):
    the port that `edge --processes N` children share, kept from others until they listen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OverflowError:
        sock.close()
        raise StartupError(f"--port {port} is not a port number (0-65535)") from None
    except OSError as exc:
        sock.close()
        raise StartupError(bind_problem(host, port, exc)) from None
    return sock
