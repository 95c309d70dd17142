"""The edge process: Tornado app with the socket endpoint, the page and phoenix.js."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

from tornado import web

from zchannels.bus.logsetup import announce_ready, setup_logging
from zchannels.bus.loopsock import run_loop
from zchannels.bus.timing import BUS_LOSS_TIMEOUT
from zchannels.edge.accept import Acceptor
from zchannels.edge.admission import Admission, Refusals, raise_nofile_limit
from zchannels.edge.drain import drain, wait_closed
from zchannels.edge.forwarded import TrustedProxies
from zchannels.edge.httplimits import REFUSAL_KINDS, EdgeHTTPServer, HttpLimits, longpoll_body_limit
from zchannels.edge.hub import EdgeHub, Limits
from zchannels.edge.listen import listen_sockets, reserve_port
from zchannels.edge.longpoll import LongPollHandler
from zchannels.edge.metrics import MetricsHandler, make_registry
from zchannels.edge.origin import OriginCheck
from zchannels.edge.publish_api import PATH as PUBLISH_PATH, BroadcastHandler
from zchannels.edge.status import StatusAccess, StatusPage
from zchannels.edge.tls import HANDSHAKE_FAILURE_KINDS, TLSConfigError, install_handshake_failure_log, load_context
from zchannels.edge.websocket import WebSocketUpgrade

log = logging.getLogger("edge")

# Refusals made by handlers from the headers, before reading a body (edge/httplimits.py has
# the gate's own, edge/admission.py those at accept).
HANDLER_REFUSAL_KINDS = ("longpoll_posts_refused", "api_key_refusals", "connect_refusals",
                         "connect_unavailable", "origin_refusals")

ROOT = Path(__file__).resolve().parent.parent
# An installed package carries phoenix.js (scripts/build copies it from npm); a checkout
# serves it from node_modules.
BUNDLED_JS = Path(__file__).resolve().parent / "static_js"
# The message-recovery helper for phoenix.js, served next to it (and packaged in the wheel).
RECOVERY_JS = Path(__file__).resolve().parent / "static_recovery"
PHOENIX_JS_CANDIDATES = (
    BUNDLED_JS,
    Path.cwd() / "node_modules/phoenix/priv/static",
    ROOT / "node_modules/phoenix/priv/static",
)


def phoenix_js_dir() -> Path | None:
    for path in PHOENIX_JS_CANDIDATES:
        if (path / "phoenix.js").is_file():
            return path
    return None


class PhoenixJS(web.StaticFileHandler):
    def get_content_type(self) -> str:
        return "application/javascript; charset=utf-8"


class AccessLog:
    """Tornado's access log, with error answers rate-limited: a client collecting 4xx answers
    must not be able to write a log line each.  At debug level every request is logged."""

    def __init__(self) -> None:
        self.log = logging.getLogger("tornado.access")
        self.counts: dict[int, int] = {}
        self._last: dict[int, float] = {}

    def __call__(self, handler: web.RequestHandler) -> None:
        status = handler.get_status()
        summary = handler._request_summary()   # "METHOD /path (ip)", as Tornado logs it
        if self.log.isEnabledFor(logging.DEBUG):
            self.log.debug("%d %s %.2fms", status, summary, 1000 * handler.request.request_time())
            return
        if status < 400:
            return
        self.counts[status] = n = self.counts.get(status, 0) + 1
        now = time.monotonic()
        if now - self._last.get(status, -1.0) >= 1.0:
            self._last[status] = now
            self.log.log(logging.WARNING if status < 500 else logging.ERROR,
                         "%d %s (%d answers %d so far)", status, summary, n, status)


def make_app(hub: EdgeHub, static_dir: str | None = None, websocket: bool = True,
             longpoll: bool = True, api_key: str | None = None,
             refusals: Refusals | None = None) -> web.Application:
    refusals = refusals or Refusals(hub.stats, HANDLER_REFUSAL_KINDS)
    routes: list = []
    if websocket:
        routes.append((r"/socket/websocket", WebSocketUpgrade, {"hub": hub, "refused": refusals}))
    if longpoll:
        routes.append((r"/socket/longpoll", LongPollHandler, {"hub": hub, "refused": refusals}))
    js = phoenix_js_dir()
    if js is not None:
        routes.append((r"/js/(phoenix(?:\.min)?\.js)", PhoenixJS, {"path": str(js)}))
    else:
        log.warning("phoenix.js not found (run `npm ci` in the project); /js/phoenix.js is off")
    routes.append((r"/js/(zchannels-recovery\.js)", PhoenixJS, {"path": str(RECOVERY_JS)}))
    routes.append((r"/status", StatusPage, {"access": hub.status_access}))   # edge/status.py
    routes.append((r"/metrics", MetricsHandler, {"registry": make_registry(hub)}))   # Prometheus
    # Always routed, so a disabled endpoint is a 404 even with --static's catch-all below.
    routes.append((PUBLISH_PATH, BroadcastHandler, {"hub": hub, "api_key": api_key,
                                                    "refused": refusals}))
    if static_dir:
        routes.append((r"/(.*)", web.StaticFileHandler, {"path": static_dir, "default_filename": "index.html"}))
    return web.Application(routes, log_function=AccessLog())


def http_limits_from(args) -> HttpLimits:
    """The edge's HTTP limits from its command line (defaults for options it lacks)."""
    d = HttpLimits()
    return HttpLimits(
        header_timeout=getattr(args, "header_timeout", d.header_timeout),
        body_timeout=getattr(args, "body_timeout", d.body_timeout),
        longpoll_body=longpoll_body_limit(args.max_frame_size),
        api_body=getattr(args, "max_api_body", d.api_body),
        max_body_inflight=getattr(args, "max_body_inflight", d.max_body_inflight),
        max_pending=getattr(args, "max_pending", d.max_pending),
        max_pending_per_peer=getattr(args, "max_pending_per_peer", d.max_pending_per_peer))


async def serve(args, origin_check: OriginCheck, sockets: list[socket.socket],
                tls: ssl.SSLContext | None = None) -> int:
    window = args.longpoll_window
    limits = Limits(max_channels=args.max_channels, max_frame_size=args.max_frame_size,
                    heartbeat_timeout=args.heartbeat_timeout, max_outbound=args.max_outbound,
                    max_rate=args.max_rate, max_burst=args.max_burst,
                    longpoll_window=window,
                    longpoll_inactivity=args.longpoll_inactivity or 1.5 * window,
                    max_inbound_buffered=getattr(args, "max_inbound_buffered",
                                                 Limits.max_inbound_buffered),
                    compress=getattr(args, "compress", False))
    hub = EdgeHub(args.bus, limits, origin_check=origin_check,
                  status_access=StatusAccess.from_options(getattr(args, "status_token", None)),
                  bus_loss_timeout=getattr(args, "bus_loss_timeout", BUS_LOSS_TIMEOUT))
    hub.start()
    refusals = Refusals(hub.stats, REFUSAL_KINDS + Admission.KINDS + HANDLER_REFUSAL_KINDS +
                        HANDSHAKE_FAILURE_KINDS)
    if tls is not None:
        install_handshake_failure_log(refusals)
    api_key = getattr(args, "api_key", None) or os.environ.get("ZCHANNELS_API_KEY") or None
    app = make_app(hub, args.static, websocket=not args.no_websocket, longpoll=not args.no_longpoll,
                   api_key=api_key, refusals=refusals)
    if api_key:
        log.info("HTTP publishing on: POST /api/broadcast (API key from %s)",
                 "--api-key" if getattr(args, "api_key", None) else "ZCHANNELS_API_KEY")
    http_limits = http_limits_from(args)
    trusted = TrustedProxies.parse(getattr(args, "trusted_proxies", None))
    admission = Admission(http_limits.max_pending, http_limits.max_pending_per_peer,
                          http_limits.max_body_inflight, trusted, refusals)
    server = EdgeHTTPServer(app, limits=http_limits, admission=admission, trusted=trusted,
                            refusals=refusals)
    acceptors = [Acceptor(server, sock, admission, tls) for sock in sockets]
    for acceptor in acceptors:
        acceptor.start()
    port = sockets[0].getsockname()[1]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    scheme = "https" if tls is not None else "http"
    log.info("edge %s up on %s://%s:%d, bus %s; origins allowed: %s; rate limit: %s; "
             "status page: %s", hub.edge_id.decode(), scheme, args.host, port, args.bus,
             origin_check.describe(), f"{limits.max_rate:g}/s, burst {limits.max_burst}"
             if limits.max_rate > 0 and limits.max_burst > 0 else "off",
             "on (/status?status_token=...)" if hub.status_access.enabled else "off")
    log.info("HTTP limits: %s; forwarding headers trusted from: %s; descriptor reserve %d",
             http_limits.describe(), trusted.describe(), admission.reserve_size)
    if tls is not None:
        log.info("TLS on: certificate %s, key %s (https:// and wss://)", args.certfile, args.keyfile)
    announce_ready(http=f"{scheme}://{args.host}:{port}", edge=hub.edge_id.decode())
    await stop.wait()
    # Drain: no new connections (the balancer sees the port closed and picks another edge),
    # then the open ones in batches over --drain-period; a second signal closes the rest at once.
    for acceptor in acceptors:
        acceptor.stop()
    hub.connects.refuse_all()   # also on HTTP connections kept alive
    hurry = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, hurry.set)
    log.info("edge stopping: draining %d connection(s) over %.1fs", len(hub.connections), args.drain_period)
    await drain(hub, args.drain_period, "service restart", hurry=hurry)
    await wait_closed(hub)
    hub.close()
    log.info("edge stopped")
    return 0


def main(args) -> int:
    setup_logging(args.log_level, "edge", getattr(args, "log_format", "text"))
    try:
        origin_check = OriginCheck.from_options(args.check_origin, args.allowed_origins)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        tls = load_context(getattr(args, "certfile", None), getattr(args, "keyfile", None))
    except TLSConfigError as exc:
        print(f"zchannels edge: error: {exc}", file=sys.stderr)
        return 2
    if args.log_level != "debug":
        # One line per WebSocket upgrade is noise at 10k clients; errors still show.
        logging.getLogger("tornado.access").setLevel(logging.WARNING)
    # The port first: one that cannot be bound is one line (StartupError) before the bus.
    if args.processes > 1:
        reserved = reserve_port(args.host, args.port)
        raise_nofile_limit()   # before any child starts: they inherit it
        from zchannels.edge.multiproc import run_many
        return run_many(args, reserved)
    sockets = listen_sockets(args.host, args.port, args.reuse_port)
    raise_nofile_limit()
    return run_loop(serve(args, origin_check, sockets, tls))
