"""The `zchannels` command: one entry point, one subcommand per process kind."""
from __future__ import annotations

import argparse
import sys

DEFAULT_BUS = "tcp://127.0.0.1:5570"


def _add_bus(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bus", default=DEFAULT_BUS,
                   help="broker base endpoint tcp://HOST:PORT; the broker uses PORT, PORT+1 and "
                        "PORT+2 (routing, publish-in, subscribe-out). Port 0 on `broker` picks "
                        "free ports. Default: %(default)s")


def _add_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: %(default)s)")


def _add_edge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=4000, help="HTTP listen port, 0 = any free port "
                   "(default: %(default)s)")
    p.add_argument("--static", default=None, metavar="DIR",
                   help="directory served at / (index.html); phoenix.js is always served at "
                        "/js/phoenix.js")
    p.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="close a WebSocket that sent nothing for this long (default: %(default)s)")
    p.add_argument("--max-frame-size", type=int, default=1_048_576, metavar="BYTES",
                   help="largest client frame accepted; larger ones close the socket with 1009 "
                        "(default: %(default)s)")
    p.add_argument("--max-channels", type=int, default=100,
                   help="joined channels per connection (default: %(default)s)")
    p.add_argument("--max-outbound", type=int, default=4 * 1_048_576, metavar="BYTES",
                   help="unsent bytes a slow client may queue before it is closed with 1013 "
                        "(default: %(default)s)")
    p.add_argument("--longpoll-window", type=float, default=10.0, metavar="SECONDS",
                   help="longest a LongPoll GET waits for something to deliver (default: %(default)s)")
    p.add_argument("--longpoll-inactivity", type=float, default=None, metavar="SECONDS",
                   help="end a LongPoll session nobody polled for this long "
                        "(default: 1.5 x --longpoll-window)")
    p.add_argument("--no-websocket", action="store_true",
                   help="do not serve /socket/websocket (LongPoll only)")
    p.add_argument("--no-longpoll", action="store_true", help="do not serve /socket/longpoll")


def _add_edge_process_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run N edge processes sharing the port with SO_REUSEPORT, one per core "
                        "(default: %(default)s)")
    p.add_argument("--reuse-port", action="store_true",
                   help="bind with SO_REUSEPORT, so separately started edges can share the port")


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    p.add_argument("--stuck-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="kill and restart a worker whose event loop made no progress for this long "
                        "(default: %(default)s)")
    p.add_argument("app", metavar="APP",
                   help="handler module: package.module[:attr] or path/to/file.py[:attr]; "
                        "attr defaults to `socket`")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zchannels", description="Phoenix Channels for Python.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the central ZeroMQ broker")
    _add_bus(p)
    p.add_argument("--peer-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="declare a still-connected edge or worker dead after this long without "
                        "a heartbeat (a closed connection is noticed at once; default: %(default)s)")
    _add_log(p)

    p = sub.add_parser("edge", help="run an edge: WebSocket and LongPoll endpoints for Phoenix clients")
    _add_bus(p)
    _add_edge_options(p)
    _add_edge_process_options(p)
    _add_log(p)

    p = sub.add_parser("workers", help="run a supervisor with N worker processes for APP")
    _add_bus(p)
    _add_worker_options(p)
    _add_log(p)

    p = sub.add_parser("dev", help="broker + one edge + workers on this machine")
    _add_bus(p)
    _add_edge_options(p)
    _add_worker_options(p)
    _add_log(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "broker":
        from broker.server import main as run
    elif args.command == "edge":
        from edge.app import main as run
    elif args.command == "workers":
        from workers.supervisor import main as run
    else:
        from zchannels.dev import main as run
    return run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
