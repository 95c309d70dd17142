"""What `zchannels` checks before it starts a process: each mistake one line, exit code 2.

The command line (zchannels/cli.py) calls ``check`` once the options are known (flags,
environment, config file): a --bus that could never work, key files that are missing or wrong,
a bus message limit too small for the frame size, a port number out of range, a --static folder
that is not there.  Each raises ``StartupError`` (bus/startup.py) before anything listens,
connects or forks; the processes themselves find what only binding or importing can tell
(a port in use, a handler module that cannot load).
"""
from __future__ import annotations

import argparse
import os
import sys

from zchannels.bus import curve, loopsock, wire
from zchannels.bus.startup import StartupError


def check(args: argparse.Namespace):
    """Check ``args`` of a broker, edge, workers, dev or publish command; returns the CURVE
    keys to run with (see ``load_curve``).  Raises StartupError."""
    problem = bus_problem(args.bus, args.command)
    if problem:   # before anything starts (for workers: before forking, so none is started)
        raise StartupError(problem)
    try:
        keys = load_curve(args)
    except curve.CurveError as exc:
        raise StartupError(str(exc)) from None
    problem = check_bus_limit(args)
    if problem is not None:
        raise StartupError(problem)
    check_ports(args)
    check_static(args)
    return keys


def load_curve(args: argparse.Namespace):
    """Read and check the key files before anything starts; edges and workers install theirs."""
    if args.command == "broker":
        keys = curve.load_server_keys(args.curve_secret, args.curve_clients)
    elif args.command == "dev":
        return curve.dev_flags(args.curve_keys)
    else:
        keys = curve.load_client_keys(args.curve_server_key, args.curve_secret)
        curve.install(keys)
    for warning in curve.secret_file_warnings(args.curve_secret):
        print(f"zchannels {args.command}: warning: {warning}", file=sys.stderr)
    return keys


def check_bus_limit(args: argparse.Namespace) -> str | None:
    """Install the bus message limit of this process; an error text if it cannot work."""
    limit = getattr(args, "max_bus_message", None)
    if limit is None:
        return None
    if limit <= 0:
        return f"--max-bus-message must be a positive number of bytes, got {limit}"
    frame = getattr(args, "max_frame_size", None)
    if frame is not None and wire.edge_bus_message_need(frame) > limit:
        return (f"--max-frame-size {frame} needs --max-bus-message of at least "
                f"{wire.edge_bus_message_need(frame)} (4 x the frame size + 64 KiB, on every "
                f"process), got {limit}")
    loopsock.set_max_message(limit)
    return None


def bus_problem(bus: str, command: str) -> str:
    """Why this --bus address could never work for ``command``; "" when it is well formed.
    The broker binds it (any interface: *, port 0: free ports); the others connect to it."""
    binds = command in ("broker", "dev")
    try:
        wire.bus_endpoints(bus[:-1] + "1" if binds and bus.endswith(":0") else bus)
    except ValueError as exc:
        return str(exc)
    host = bus.partition("://")[2].rpartition(":")[0]
    if not host or (host == "*" and command != "broker") or any(c.isspace() for c in host) or \
            host.startswith("[") != host.endswith("]"):
        return f"--bus must name the broker's host, as in tcp://HOST:PORT, got {bus!r}"
    return ""


def check_ports(args: argparse.Namespace) -> None:
    """A port number out of range (the socket module would wrap it around)."""
    for flag in ("port", "metrics_port"):
        port = getattr(args, flag, None)
        if port is not None and not 0 <= port <= 65535:
            raise StartupError(f"--{flag.replace('_', '-')} {port} is not a port number (0-65535)")


def check_static(args: argparse.Namespace) -> None:
    """A --static folder that is not there (the edge would answer 404 to everything)."""
    static = getattr(args, "static", None)
    if static is not None and not os.path.isdir(static):
        raise StartupError(f"--static {static}: no such directory" if not os.path.exists(static)
                           else f"--static {static}: not a directory")
