"""The `zchannels` command: one entry point, one subcommand per process kind.

Each subcommand's options are argparse flags; zchannels/config.py fills the ones a command
line leaves out from ZCHANNELS_* environment variables and a TOML config file, and
`zchannels config COMMAND ...` shows the result.  A mistake found before or while a process
starts is one line, ``zchannels COMMAND: error: ...``, and exit code 2 (bus/startup.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from zchannels.bus.startup import STARTUP_ERROR_EXIT, StartupError
from zchannels import config

DEFAULT_BUS = "tcp://127.0.0.1:5570"
# What `zchannels dev` runs without an APP: the chat example, from a checkout's examples/ or
# as the package ships it (zchannels/chat).
CHAT_EXAMPLE = next((path for path in (
    Path(__file__).resolve().parent.parent / "examples" / "chat" / "channels.py",
    Path(__file__).resolve().parent / "chat" / "channels.py") if path.is_file()),
    Path(__file__).resolve().parent / "chat" / "channels.py")


class _Parser(argparse.ArgumentParser):
    """A usage error is one line, not the whole usage block (`--help` has that)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def _add_bus(p: argparse.ArgumentParser, curve: str = "client") -> None:
    """--bus, and the CURVE key options of a bus `server` (broker), `client` (edge,
    workers) or of `dev` (all three on one machine)."""
    p.add_argument("--bus", default=DEFAULT_BUS,
                   help="broker base endpoint tcp://HOST:PORT; the broker uses PORT, PORT+1 and "
                        "PORT+2 (routing, publish-in, subscribe-out). Port 0 on `broker` picks "
                        "free ports. Default: %(default)s")
    g = p.add_argument_group("bus security (CURVE; make keys with `zchannels keys DIR`, "
                             "without them the bus is plain TCP)")
    if curve == "server":
        g.add_argument("--curve-secret", metavar="FILE",
                       help="the broker's secret key file (broker.key_secret); with --curve-clients "
                            "every bus endpoint is encrypted and admits only known keys")
        g.add_argument("--curve-clients", metavar="DIR",
                       help="directory of the public key files (*.key) of the edges and workers "
                            "allowed to connect")
    elif curve == "client":
        g.add_argument("--curve-server-key", metavar="FILE",
                       help="the broker's public key file (broker.key)")
        g.add_argument("--curve-secret", metavar="FILE",
                       help="this process's secret key file (e.g. client.key_secret)")
    else:
        g.add_argument("--curve-keys", metavar="DIR",
                       help="a directory made by `zchannels keys`: the broker uses its broker keys "
                            "and admits its *.key, the edge and workers use client.key_secret")


def _add_bus_limit(p: argparse.ArgumentParser) -> None:
    from zchannels.bus.wire import DEFAULT_MAX_BUS_MESSAGE
    p.add_argument("--max-bus-message", type=int, default=DEFAULT_MAX_BUS_MESSAGE, metavar="BYTES",
                   help="largest message on the bus (ZeroMQ MAXMSGSIZE of every bus socket): the "
                        "broker closes the connection of a peer that sends a larger one, and edges "
                        "and workers refuse to send one (counted, logged). Give every process the "
                        "same value; an edge needs at least 4 x --max-frame-size + 64 KiB "
                        "(default: %(default)s)")


def _add_status(p: argparse.ArgumentParser, dev: bool = False) -> None:
    if dev:
        text = ("the token of the status page and the zchannels:status topic (default: env "
                "ZCHANNELS_STATUS_TOKEN, else a random one, printed with the page's URL); "
                "'off' turns them off")
    else:
        text = ("serve the status page /status?status_token=TOKEN and let clients that give "
                "the token join the zchannels:status topic (default: env ZCHANNELS_STATUS_TOKEN; "
                "unset = /status answers 404 and joins get {\"reason\":\"unauthorized\"}). The "
                "environment variable keeps the token out of process listings")
    p.add_argument("--status-token", default=None, metavar="TOKEN", help=text)


def _add_log(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: %(default)s)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text: one line per event for people; json: one JSON object per line "
                        "(time, level, process, pid, logger, message) (default: %(default)s)")


def _history_rule(text: str):
    from zchannels.bus.history import parse_rule
    try:
        return parse_rule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _history_store(text: str) -> str:
    if text != "memory" and not text.startswith("redis://"):
        raise argparse.ArgumentTypeError(f"expected memory or redis://HOST:PORT/DB, got {text!r}")
    return text


def _add_history(p: argparse.ArgumentParser) -> None:
    p.add_argument("--history", action="append", type=_history_rule, default=None,
                   metavar="PATTERN=KEEP/SECONDS",
                   help="keep the last KEEP broadcasts of each topic matching PATTERN (an exact "
                        "topic or a prefix ending in *), none older than SECONDS, for clients "
                        "that rejoin to recover what they missed (docs/recovery.md); repeatable, "
                        "before the apps' own rules, e.g. 'room:*=1000/300'")
    p.add_argument("--history-store", type=_history_store, default="memory", metavar="STORE",
                   help="where history is kept: memory (lost with the broker) or "
                        "redis://HOST:PORT/DB (Redis Streams) (default: %(default)s)")


def _add_metrics(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help=f"serve Prometheus metrics of {what} at http://HOST:PORT/metrics; "
                        "0 = any free port (announced on stdout); default: off")


def _origin_list(text: str) -> str:
    """Checked here so a typo fails at once; the edge parses the text again."""
    from zchannels.edge.origin import parse_allowed
    try:
        parse_allowed(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _add_edge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP listen address (default: %(default)s)")
    p.add_argument("--port", type=int, default=4000, help="HTTP listen port, 0 = any free port "
                   "(default: %(default)s)")
    p.add_argument("--certfile", default=None, metavar="FILE",
                   help="serve https:// and wss:// with this PEM certificate (its chain after it); "
                        "needs --keyfile (default: plain http://, e.g. behind a TLS-terminating "
                        "proxy)")
    p.add_argument("--keyfile", default=None, metavar="FILE",
                   help="the unencrypted PEM private key of --certfile")
    p.add_argument("--static", default=None, metavar="DIR",
                   help="directory served at / (index.html); phoenix.js is always served at "
                        "/js/phoenix.js")
    p.add_argument("--heartbeat-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="close a WebSocket that sent nothing for this long (default: %(default)s)")
    p.add_argument("--max-frame-size", type=int, default=1_048_576, metavar="BYTES",
                   help="largest client frame accepted; larger ones close the socket with 1009 "
                        "(default: %(default)s)")
    p.add_argument("--max-inbound-buffered", type=_positive(int), default=64 * 1_048_576,
                   metavar="BYTES",
                   help="bytes of unfinished incoming WebSocket messages (frames not fully "
                        "arrived, fragments) the edge holds for all connections together, beyond "
                        "64 KiB each; a connection that would go over is closed with 1013 "
                        "(default: %(default)s)")
    p.add_argument("--compress", action="store_true",
                   help="offer permessage-deflate (RFC 7692) to WebSocket clients: a broadcast is "
                        "compressed once for all the clients that accept it (default: off)")
    p.add_argument("--max-channels", type=int, default=100,
                   help="joined channels per connection (default: %(default)s)")
    p.add_argument("--max-outbound", type=int, default=4 * 1_048_576, metavar="BYTES",
                   help="unsent bytes a slow client may queue; then it gets no more data, a close "
                        "frame 1013, and is cut off if it has not closed 5 s later (default: %(default)s)")
    p.add_argument("--max-rate", type=float, default=200.0, metavar="MSGS_PER_S",
                   help="messages per second one connection may send (heartbeats and leaves "
                        "excepted, WebSocket pings and pongs included); more get the error reply {\"reason\":\"rate limited\"}, and over "
                        "100 refused within 5 s close it with 1008; 0 = no limit (default: %(default)s)")
    p.add_argument("--max-burst", type=int, default=400, metavar="MSGS",
                   help="messages a connection may send at once above --max-rate after being "
                        "quiet; 0 = no limit (default: %(default)s)")
    p.add_argument("--check-origin", choices=["true", "false"], default="true",
                   help="refuse WebSocket upgrades (403) and LongPoll requests ({\"status\":403}) "
                        "whose Origin header is not allowed; requests without Origin pass "
                        "(default: %(default)s)")
    p.add_argument("--allowed-origins", type=_origin_list, default=None, metavar="LIST",
                   help="comma-separated origins allowed instead of the request's own host, as in "
                        "Phoenix's check_origin: https://example.com (scheme, host and port 443), "
                        "//another.com:888 (any scheme), //*.other.com (other.com and subdomains)")
    p.add_argument("--longpoll-window", type=float, default=10.0, metavar="SECONDS",
                   help="longest a LongPoll GET waits for something to deliver (default: %(default)s)")
    p.add_argument("--longpoll-inactivity", type=float, default=None, metavar="SECONDS",
                   help="end a LongPoll session nobody polled for this long "
                        "(default: 1.5 x --longpoll-window)")
    p.add_argument("--drain-period", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM, stop accepting and close the open connections (WebSocket "
                        "1012, LongPoll sessions ended) in batches every 0.5 s spread over this "
                        "long, so clients come back through the load balancer a few at a time; "
                        "0 = all at once; a second SIGTERM closes the rest at once (default: %(default)s)")
    from zchannels.bus import timing
    p.add_argument("--bus-loss-timeout", type=float, default=timing.BUS_LOSS_TIMEOUT, metavar="SECONDS",
                   help="after this long without the broker, close every client (1012, LongPoll "
                        f"sessions ended, within {timing.BUS_LOSS_DRAIN:g} s) so it reconnects "
                        "through the load balancer to an edge that has the bus; new connections "
                        "get 503 as soon as the broker is silent for "
                        f"{timing.BROKER_SILENCE_LIMIT:g} s; 0 = keep clients, better without "
                        "other edges to go to (default: %(default)s)")
    p.add_argument("--no-websocket", action="store_true",
                   help="do not serve /socket/websocket (LongPoll only)")
    p.add_argument("--no-longpoll", action="store_true", help="do not serve /socket/longpoll")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="enable POST /api/broadcast for callers sending 'Authorization: Bearer KEY' "
                        "(default: env ZCHANNELS_API_KEY; unset = the endpoint answers 404). The "
                        "environment variable keeps the key out of process listings")
    _add_bus_limit(p)


def _trusted_proxies(text: str) -> str:
    """Checked here so a typo fails at once; the edge parses the text again."""
    from zchannels.edge.forwarded import parse_networks
    try:
        parse_networks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
        return value
    parse.__name__ = kind.__name__   # argparse names the type in its "invalid value" message
    return parse


def _add_edge_http_limits(p: argparse.ArgumentParser) -> None:
    """Bounds on what an HTTP client may make the edge wait for or hold (docs/security.md)."""
    g = p.add_argument_group("HTTP limits (before the WebSocket upgrade; see docs/security.md)")
    g.add_argument("--header-timeout", type=_positive(float), default=15.0, metavar="SECONDS",
                   help="a request's whole header block must arrive within this time, however "
                        "it trickles in; else 408 and close (default: %(default)s)")
    g.add_argument("--body-timeout", type=_positive(float), default=15.0, metavar="SECONDS",
                   help="a request's whole body must arrive within this time of its headers; "
                        "else 408 and close (default: %(default)s)")
    g.add_argument("--max-api-body", type=_positive(int), default=4 * 1_048_576, metavar="BYTES",
                   help="largest POST /api/broadcast body; larger ones get 413 before they are "
                        "read (default: %(default)s). LongPoll POSTs may carry 100 frames of "
                        "--max-frame-size, at most 8 MiB; other requests 64 KiB")
    g.add_argument("--max-body-inflight", type=_positive(int), default=64 * 1_048_576, metavar="BYTES",
                   help="request-body bytes the edge holds at once, all requests together; a body "
                        "that would go over gets 503 (default: %(default)s)")
    g.add_argument("--max-pending-per-peer", type=_positive(int), default=64, metavar="N",
                   help="connections one client address may hold before its request is read "
                        "(unfinished upgrades, slow headers or bodies, idle keep-alives); more are "
                        "refused at accept with 503; trusted proxies are exempt (default: %(default)s)")
    g.add_argument("--max-pending", type=_positive(int), default=2000, metavar="N",
                   help="such connections on the whole edge (default: %(default)s)")
    g.add_argument("--trusted-proxies", type=_trusted_proxies, default="", metavar="CIDR,...",
                   help="believe X-Forwarded-For / X-Real-Ip / X-Forwarded-Proto / X-Scheme only "
                        "from these peers, e.g. 127.0.0.1/32,10.0.0.0/8; from others connect_info "
                        "shows the socket peer (default: none)")


def _add_edge_process_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run N edge processes sharing the port with SO_REUSEPORT, one per core "
                        "(default: %(default)s)")
    p.add_argument("--reuse-port", action="store_true",
                   help="bind with SO_REUSEPORT, so separately started edges can share the port")


def _add_worker_options(p: argparse.ArgumentParser, default_app: str | None = None) -> None:
    p.add_argument("-n", "--workers", type=int, default=2, help="worker processes (default: %(default)s)")
    p.add_argument("--stuck-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="kill and restart a worker whose event loop made no progress for this long "
                        "(default: %(default)s)")
    # Optional to argparse so that it may come from env ZCHANNELS_APP or the config file;
    # zchannels/config.py insists on it when there is no default.
    p.add_argument("app", metavar="APP", nargs="?", default=default_app,
                   help="handler module: package.module[:attr] or path/to/file.py[:attr]; "
                        "attr defaults to `socket`" +
                        (" (default: the chat example, %(default)s)" if default_app else ""))


def _chat_example() -> str | None:
    """The chat example's handler module, as a path from the current directory when it is
    below it; None where it is not (an installed package without the examples)."""
    if not CHAT_EXAMPLE.is_file():
        return None
    try:
        return str(CHAT_EXAMPLE.relative_to(Path.cwd()))
    except ValueError:
        return str(CHAT_EXAMPLE)


def _add_edge_command(p: argparse.ArgumentParser) -> None:
    _add_bus(p)
    _add_edge_options(p)
    _add_status(p)
    _add_edge_http_limits(p)
    _add_edge_process_options(p)
    _add_log(p)


# What `edge --processes N` (edge/multiproc.py) gives each of its processes itself.
_PER_PROCESS = ("processes", "port", "reuse_port")


def edge_process_options(args: argparse.Namespace) -> list[str]:
    """The options that start one process of the edge ``args`` describe: every `edge` option
    as given or defaulted, in its long form, less --processes, --port and --reuse-port, which
    `edge --processes N` sets for each process.  ``main`` puts them in ``args.process_options``."""
    parser = argparse.ArgumentParser(add_help=False)
    _add_edge_command(parser)
    options: list[str] = []
    for action in parser._actions:   # argparse has no public list of a parser's options
        # Secrets go to the children through their environment (``args.process_env``).
        if not action.option_strings or action.dest in _PER_PROCESS or config.is_secret(action):
            continue
        value = getattr(args, action.dest, None)
        if action.nargs == 0:   # a flag (store_true)
            if value:
                options.append(action.option_strings[-1])
        elif value is not None:
            options += [action.option_strings[-1], str(value)]
    return options


def build_parser() -> argparse.ArgumentParser:
    from zchannels.version import version
    parser = _Parser(prog="zchannels", description="Phoenix Channels for Python.")
    parser.add_argument("--version", action="version", version=f"zchannels {version()}")
    config.add_config_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("broker", help="run the central ZeroMQ broker")
    _add_bus(p, curve="server")
    from zchannels.bus.timing import PEER_LIVENESS
    p.add_argument("--peer-timeout", type=float, default=PEER_LIVENESS, metavar="SECONDS",
                   help="declare a still-connected edge or worker dead after this long without "
                        "a heartbeat (a closed connection is noticed at once); longer than the "
                        "link cuts to ride out (default: %(default)s)")
    _add_metrics(p, "the broker (on the --bus host)")
    _add_history(p)
    _add_bus_limit(p)
    _add_log(p)

    p = sub.add_parser("edge", help="run an edge: WebSocket and LongPoll endpoints for Phoenix clients")
    _add_edge_command(p)

    p = sub.add_parser("workers", help="run a supervisor with N worker processes for APP")
    _add_bus(p)
    _add_worker_options(p)
    _add_metrics(p, "the supervisor and all its workers (on 127.0.0.1)")
    _add_bus_limit(p)
    _add_log(p)

    p = sub.add_parser("dev", help="broker + one edge + workers on this machine")
    _add_bus(p, curve="dev")
    _add_edge_options(p)
    _add_status(p, dev=True)
    _add_worker_options(p, default_app=_chat_example())
    p.add_argument("--reload", action="store_true",
                   help="watch the APP's Python files and roll the workers onto the new code "
                        "when one changes (clients rejoin by themselves)")
    _add_log(p)

    p = sub.add_parser("publish", help="publish one broadcast to TOPIC on the bus and exit")
    p.add_argument("topic", metavar="TOPIC", help="channel topic, e.g. room:lobby")
    p.add_argument("event", metavar="EVENT", help="event name the clients receive")
    p.add_argument("json", metavar="JSON", help="the payload, a JSON object, e.g. '{\"body\": \"hi\"}'")
    _add_bus(p)
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the bus; exit code 1 if it is unreachable for longer "
                        "(default: %(default)s)")

    p = sub.add_parser("keys", help="make CURVE keys for the bus: a broker keypair and client keypairs")
    p.add_argument("dir", metavar="DIR", help="where to write the key files (created if missing)")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="make the client keypair NAME.key / NAME.key_secret (repeatable; default: "
                        "client); an existing broker keypair in DIR is kept")

    for p in config.commands(parser).values():
        config.add_config_option(p)
    p = sub.add_parser("config", help="print the configuration COMMAND would run with, and where "
                                      "each value comes from (flag, env, file, default)")
    config.add_config_option(p)
    p.add_argument("shown", nargs=argparse.REMAINDER, metavar="COMMAND [FLAGS...]",
                   help="the command line to show the configuration of, e.g. `edge --port 4001`")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `zchannels` command line ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        resolved = config.resolve(parser, argv)
        if resolved.command == "config":
            return _show_config(resolved.args)
    except config.ConfigError as exc:
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return _start(parser, resolved) or 0
    except StartupError as exc:
        print(f"zchannels {resolved.command}: error: {exc}", file=sys.stderr)
        return STARTUP_ERROR_EXIT


def _show_config(args: argparse.Namespace) -> int:
    from zchannels.showconfig import render
    shown = list(args.shown)
    names = [name for name in config.commands(build_parser()) if name != "config"]
    if not shown or shown[0] not in names:
        print(f"zchannels config: error: name the COMMAND to show, one of {', '.join(names)}; "
              f"got {shown[0] if shown else 'none'}", file=sys.stderr)
        return 2
    if getattr(args, "config", None):
        shown[1:1] = ["--config", args.config]
    resolved = config.resolve(build_parser(), shown, require=False)
    print(render(resolved), end="")
    return 0


def _start(parser: argparse.ArgumentParser, resolved: config.Resolved) -> int:
    """Check what can be checked before anything starts, then run the command."""
    args = resolved.args
    if args.command == "keys":
        from zchannels.keys import main as run
        return run(args)
    from zchannels.preflight import check
    args.curve = check(args)   # StartupError: one line before anything starts
    # Children (`dev`'s processes, `edge --processes N`) get every option on their command
    # line, secrets in their environment, and no ZCHANNELS_* configuration to read again.
    args.process_env = config.child_environ(parser, os.environ, resolved.settings)
    if args.command == "broker":
        from zchannels.broker.server import main as run
    elif args.command == "edge":
        args.process_options = edge_process_options(args)
        from zchannels.edge.app import main as run
    elif args.command == "workers":
        from zchannels.workers.supervisor import main as run
    elif args.command == "publish":
        from zchannels.publisher import cli as run
    else:
        from zchannels.dev import main as run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
