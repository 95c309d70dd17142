"""The broker process: binds the three bus endpoints and runs fan-out and routing."""
from __future__ import annotations

import errno
import logging
import random
import signal

import zmq

from zchannels.bus import curve, wire
from zchannels.broker.busmonitor import BusMonitor
from zchannels.broker.fanout import Fanout
from zchannels.broker.history import open_store
from zchannels.broker.sequencer import Sequencer
from zchannels.bus.logsetup import announce_ready, setup_logging
from zchannels.bus.loopsock import tune_link
from zchannels.bus.startup import StartupError
from zchannels.bus.timing import BROKER_LINK_MARGIN_MS, PEER_LIVENESS
from zchannels.broker.router import Router

log = logging.getLogger("broker")

HWM = 200_000   # messages queued per peer before libzmq refuses more (at-most-once)


def bind_bus(ctx: zmq.Context, base: str, keys: curve.ServerKeys | None = None,
             max_message: int = wire.DEFAULT_MAX_BUS_MESSAGE, peer_timeout: float = PEER_LIVENESS
             ) -> tuple[str, zmq.Socket, zmq.Socket, zmq.Socket]:
    """Bind ROUTER, XSUB, XPUB on PORT, PORT+1, PORT+2; port 0 picks three free ones.
    With ``keys`` every one of them is a CURVE server.  A peer that sends a message over
    ``max_message`` bytes has its connection closed by libzmq before the body is read; a
    connection that carries nothing for ``peer_timeout`` + 1 s is closed.  Raises
    ``StartupError`` naming the port when one of them cannot be bound."""
    host = base.rpartition(":")[0]
    wire.bus_endpoints(base if not base.endswith(":0") else host + ":1")  # validates the form
    wanted = int(base.rpartition(":")[2])
    attempts = 50 if wanted == 0 else 1
    last_error = ""
    for _ in range(attempts):
        port = wanted or random.randrange(20000, 60000)
        sockets = [ctx.socket(kind) for kind in (zmq.ROUTER, zmq.XSUB, zmq.XPUB)]
        try:
            for offset, sock in enumerate(sockets):
                # Limits must be set before bind: connections take them from the listener.
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.SNDHWM, HWM)
                sock.setsockopt(zmq.RCVHWM, HWM)
                sock.setsockopt(zmq.MAXMSGSIZE, max_message)
                # A silent connection is kept as long as the router keeps its peer: a cut link
                # must not look like a dead peer.  Peers notice a cut within 2 s and reconnect
                # on their own (a ROUTER id is taken over: ROUTER_HANDOVER, broker/router.py).
                tune_link(sock, int(peer_timeout * 1000) + BROKER_LINK_MARGIN_MS)
                curve.secure_server(sock, keys)
                sock.bind(f"{host}:{port + offset}")
        except zmq.ZMQError as exc:
            last_error = _bind_problem(host, port + offset, offset, exc)
            for sock in sockets:
                sock.close(linger=0)
            continue
        return f"{host}:{port}", sockets[0], sockets[1], sockets[2]
    if wanted:
        raise StartupError(f"{last_error} (--bus {base} takes ports {wanted}, {wanted + 1} and {wanted + 2})")
    raise StartupError(f"--bus {base}: found no three free ports in a row in {attempts} tries; "
                       f"the last: {last_error}")


_ENDPOINT_NAMES = ("routing", "publish-in", "subscribe-out")


def _bind_problem(host: str, port: int, offset: int, exc: zmq.ZMQError) -> str:
    """One line on why ``host:port`` (the bus endpoint at ``offset``) could not be bound."""
    where = f"port {port} on {host.partition('://')[2]} (bus {_ENDPOINT_NAMES[offset]})"
    if exc.errno == errno.EADDRINUSE:
        return f"{where} is already in use: is another broker running?"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{where}: {host.partition('://')[2]} is not an address of this machine"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges)"
    return f"cannot bind {where}: {exc.strerror}"


def _is_loopback(bus: str) -> bool:
    host = bus.partition("://")[2].rpartition(":")[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


def main(args) -> int:
    setup_logging(args.log_level, "broker", getattr(args, "log_format", "text"))
    keys: curve.ServerKeys | None = getattr(args, "curve", None)
    max_message = getattr(args, "max_bus_message", None) or wire.DEFAULT_MAX_BUS_MESSAGE
    ctx = zmq.Context()
    # The ZAP handler must exist before the first connection is accepted.
    gate = curve.Gatekeeper(ctx, keys) if keys is not None else None
    try:
        bus, router_sock, xsub, xpub = bind_bus(ctx, args.bus, keys, max_message, args.peer_timeout)
    except (ValueError, StartupError) as exc:   # told as one line by the command line
        if gate is not None:
            gate.stop()
        ctx.term()
        raise StartupError(str(exc)) from None
    # Before the fan-out thread takes the sockets: libzmq sockets are not thread-safe.
    monitor = BusMonitor(ctx, {"routing": router_sock, "publish-in": xsub, "subscribe-out": xpub},
                         max_message)
    if gate is not None:
        gate.watch(monitor)
    monitor.start()
    if gate is not None:
        log.info("bus secured with CURVE: %d client key(s) admitted from %s (%s)", len(keys.clients),
                 keys.clients_dir, ", ".join(sorted(keys.clients.values())))
    elif not _is_loopback(bus):
        log.warning("the bus listens on %s without CURVE: anyone who reaches it can publish, "
                    "subscribe and route; see `zchannels keys` and --curve-secret/--curve-clients", bus)
    # The sequencer reaches the proxy from inside the process: bound before the proxy's thread
    # owns the sockets.
    xsub_inproc, xpub_inproc = f"inproc://zchannels-xsub-{id(xsub)}", f"inproc://zchannels-xpub-{id(xpub)}"
    xsub.bind(xsub_inproc)
    xpub.bind(xpub_inproc)
    fanout = Fanout(ctx, xsub, xpub)
    fanout.start()
    store_spec = getattr(args, "history_store", None) or "memory"
    sequencer = None
    try:
        sequencer = Sequencer(ctx, open_store(store_spec), xsub_inproc, xpub_inproc, max_message)
        sequencer.start()
    except Exception as exc:   # ImportError, a refused connection, a bad URL: one line
        _close(sequencer, fanout, monitor, None, router_sock, gate, ctx)
        raise StartupError(f"--history-store {store_spec}: cannot open the history store: {exc}") from None
    router = Router(router_sock, peer_timeout=args.peer_timeout, sequencer=sequencer,
                    operator_rules=tuple(getattr(args, "history", None) or ()))

    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))

    ready = {"bus": bus}
    metrics_server = None
    up = False
    try:
        if getattr(args, "metrics_port", None) is not None:
            from zchannels.broker import metrics
            host = metrics.metrics_host(bus)
            try:
                metrics_server = metrics.serve(router, host, args.metrics_port, monitor)
            except OSError as exc:   # one line by the command line, before READY
                raise StartupError(f"cannot serve metrics on {host} port {args.metrics_port} "
                                   f"(--metrics-port): {exc.strerror or exc}") from None
            ready["metrics"] = f"http://{host}:{metrics_server.server_port}/metrics"
            log.info("metrics at %s", ready["metrics"])
        log.info("broker up: routing %s, publish-in %s, subscribe-out %s; bus messages up to %d bytes",
                 *wire.bus_endpoints(bus), max_message)
        if sequencer is not None:
            log.info("history: epoch %s, store %s", sequencer.epoch, type(sequencer.store).__name__)
        announce_ready(**ready)
        up = True
        router.run(lambda: bool(stopping))
    finally:
        if up:
            log.info("broker stopping: %d frames routed, %d unroutable, %d malformed",
                     router.routed, router.unroutable, router.malformed)
        _close(sequencer, fanout, monitor, metrics_server, router_sock, gate, ctx)
    return 0


def _close(sequencer, fanout, monitor, metrics_server, router_sock, gate, ctx) -> None:
    """Stop what ``main`` started, in reverse order; ``None`` for what it did not get to."""
    if sequencer is not None:
        sequencer.stop()
    fanout.stop()
    monitor.stop()
    if metrics_server is not None:
        metrics_server.shutdown()
        metrics_server.server_close()
    router_sock.close(linger=0)
    if gate is not None:
        gate.stop()
    ctx.term()
