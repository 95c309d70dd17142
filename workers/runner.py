"""One worker process: its place on the bus, and the user's channels driven by bus frames.

The supervisor forks a child and calls ``run_worker``.  The worker is a BusPeer (bus/peer.py):
a DEALER to the broker's ROUTER (connects, joins, client pushes in; replies and pushes out), a
PUB into the broadcast proxy and a SUB that receives only the topics some local channel
intercepts, with heartbeats leaving from this event loop (so a stuck loop stops them and the
broker and supervisor notice).  This module decodes every bus frame and hands each channel
message to workers/channels.py, which runs the channel's serial mailbox.  Connects, which
belong to no channel, run here.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import faulthandler
import logging
import os
import signal
import sys
from typing import Callable

import orjson
import zmq

from zchannels.bus import curve, wire
from zchannels.bus.logsetup import announce_ready, setup_logging
from zchannels.bus.historyread import HistoryReads, HistoryUnavailable
from zchannels.bus.peer import BusPeer, PeerSockets, connect_peer
from zchannels.bus.timing import PRESENCE_ANNOUNCE_INTERVAL, WORKER_RESYNC_DELAY
from zchannels.workers import api, metrics, presence
from zchannels.workers.api import Channel, Error, HistoryEntry, SocketState
from zchannels.workers.channels import _EMPTY_JSON, _ERROR, _OK, ChannelHost, ChannelProc, _maybe_await
from zchannels.workers.configerror import HANDLER_LOAD_ERROR, ConfigError
from zchannels.workers.loadapp import AppLoadError, describe, load_app
from zchannels.workers.routes import SYSTEM_PREFIX
from zchannels.workers.status import publish_forever as publish_status, system_route


SHUTDOWN_GRACE = 2.0         # seconds for terminate() callbacks when the worker stops
CLOSE_LINGER_MS = 500        # lets BYE and last broadcasts leave on a graceful stop
HWM = 100_000

log = logging.getLogger("zchannels.worker")


class Worker(ChannelHost):
    """One worker process on the bus: frames in, connects, liveness and shutdown."""

    def __init__(self, app: api.Socket, sockets: PeerSockets | None, slot: int, peer_id: bytes,
                 alive: Callable[[], None], peer: Callable[..., BusPeer] = BusPeer):
        """``peer`` makes this worker's place on the bus from ``sockets`` and BusPeer's
        keyword arguments; zchannels.testing passes an in-memory stand-in (and no sockets)."""
        self.app, self.slot, self.peer_id, self.alive = app, slot, peer_id, alive
        self.loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.bus = peer(sockets, wire.ROLE_WORKER, on_direct=self.on_direct,
                        on_broadcast=self.on_sub, load=lambda: len(self.channels),
                        on_bus_state=self.on_bus_state, on_registered=self.on_registered,
                        on_beat=self.on_beat, on_bad_frame=self.bad_frame,
                        name=f"worker {slot}", logger=log, loop=self.loop)
        self.pub, self.sub = self.bus.pub, self.bus.sub
        self.bus.app_rules = tuple(getattr(app, "history", ()))
        self.history_reads = HistoryReads(self.bus.dealer.send, self.loop)
        super().__init__()   # the channel table, intercepts and tasks (workers/channels.py)
        self.presence = presence.Tracker(
            peer_id, lambda topic, event, data: self.publish(topic, event, data, wire.JSON, b""),
            self.loop.call_later)
        self.presence.catch_up = self.sub.drain
        self.bus.subscribe(presence.PRESENCE_KEY)   # every owner's replication
        self.ready = False
        self.bad_frames = 0
        self.alive_failed = False
        self.sync_scheduled = False
        self.ppid = os.getppid()
        self.handlers = {
            wire.CONNECT: self.on_connect, wire.JOIN: self.on_join, wire.IN: self.on_in,
            wire.LEAVE: self.on_leave, wire.TERMINATE: self.on_terminate,
            wire.EDGE_DOWN: self.on_edge_down, wire.WORKER_DOWN: self.on_worker_down,
            wire.UNROUTABLE: self.on_unroutable, wire.EVICTED: self.on_evicted,
            wire.EDGE_SYNC: self.on_edge_sync, wire.HISTORY: self.history_reads.on_answer,
        }

    # --- bus input --------------------------------------------------------------------

    def on_direct(self, frames: list[bytes]) -> None:
        """A point-to-point frame: from an edge's inbox message or the broker (its heartbeats stay
        with self.bus)."""
        kind = frames[0]
        handler = self.handlers.get(kind)
        try:
            if handler is None:
                raise wire.BusFrameError(f"unknown bus kind {kind[:8]!r}")
            handler(wire.parse(frames))   # checks the frame count and names the fields
        except (wire.BusFrameError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON
            self.bad_frame(frames, exc)

    async def read_history(self, topic: str, limit: int) -> list[HistoryEntry]:
        """``Channel.history``: the last ``limit`` stored broadcasts of ``topic``."""
        result = await self.history_reads.read(topic, None, limit)
        if result.status == wire.HISTORY_ERROR:
            raise HistoryUnavailable(f"the history store could not be read for {topic!r}")
        out = []
        for _offset, data in result.entries:
            b = wire.parse_broadcast(wire.unpack_broadcast(data))
            payload = orjson.loads(b.payload) if b.fmt == wire.JSON else b.payload
            out.append(HistoryEntry(b.event.decode(), payload, b.position.decode()))
        return out

    def on_sub(self, frames: list[bytes]) -> None:
        try:
            msg = wire.parse_broadcast(frames)
            if msg.key == presence.PRESENCE_KEY:
                self.presence.on_bus(msg.event.decode(), msg.payload)
                return
            procs = self.intercepts.get(msg.key)
            if not procs:
                return
            event, origin, data = msg.event.decode(), msg.origin, msg.payload
            targets = [p for p in procs if event in p.intercept and not (origin and origin == p.origin)]
            for proc in targets:   # each channel gets its own decoded copy to change at will
                payload = orjson.loads(data) if msg.fmt == wire.JSON else data
                self.post(proc, self.step_out, event, payload)
        except (wire.BusFrameError, ValueError) as exc:
            self.bad_frame(frames, exc, source=f"broadcast on {frames[0][:60]!r}")

    def bad_frame(self, frames: list[bytes], exc: Exception, source: str = "") -> None:
        self.bad_frames += 1
        if self.bad_frames <= 10 or self.bad_frames % 1000 == 0:
            what = source or f"{frames[0][:8]!r} frame from peer {frames[1][:60] if len(frames) > 1 else b'?'!r}"
            log.warning("worker %s: dropped a bad %s (%d so far): %s", self.slot, what, self.bad_frames, exc)

    def on_registered(self) -> None:
        """The broker's first heartbeat: it knows this worker, which is ready."""
        self.ready = True
        announce_ready(worker=self.slot, pid=os.getpid(), id=self.peer_id.decode())
        log.info("worker ready: slot %s pid %s id %s", self.slot, os.getpid(), self.peer_id.decode())

    def on_bus_state(self, up: bool) -> None:
        """Back on the bus after a silence or with a new broker: the link may have been remade,
        or the broker restarted, and messages lost."""
        if up:
            self.schedule_sync()

    def schedule_sync(self) -> None:
        """Settle channels with the edges (sync_edges) after a broker restart or a silence, once
        the peers have reconnected and resubscribed: what the sync sets off (terminate
        callbacks, presence leaves) may broadcast."""
        if not self.sync_scheduled:
            self.sync_scheduled = True
            self.loop.call_later(WORKER_RESYNC_DELAY, self._sync)

    def _sync(self) -> None:
        self.sync_scheduled = False
        self.sync_edges()

    def on_unroutable(self, msg: wire.Unroutable) -> None:
        log.debug("worker %s: broker could not deliver a %r to %r", self.slot, msg.kind, msg.dest)

    def on_edge_down(self, msg: wire.PeerDown) -> None:
        edge = msg.peer
        self.edges.discard(edge)
        procs = [p for p in self.channels.values() if p.edge == edge]
        log.info("worker %s: edge %r down, terminating its %d channel(s)", self.slot, edge, len(procs))
        for proc in procs:
            self.end(proc, self.step_end, ("shutdown", "closed"))

    def on_edge_sync(self, msg: wire.ChannelList) -> None:
        """An edge back on the bus after a silence lists every channel it has (joined or
        joining): end ours of that edge it does not list (its TERMINATE was lost), and answer
        with our list, so it errors those we no longer have (our close was lost)."""
        edge, listed = msg.peer, msg.channels
        kept, orphans = [], []
        for proc in [p for p in self.channels.values() if p.edge == edge]:
            key = (proc.conn, proc.topic_b, proc.join_ref)
            (kept if key in listed else orphans).append(proc)
        for proc in orphans:
            self.end(proc, self.step_end, ("shutdown", "closed"))
        if orphans:
            log.info("worker %s: edge %r back on the bus; ending %d channel(s) it no longer has",
                     self.slot, edge, len(orphans))
        self.edges.add(edge)
        self.bus.send(wire.sync(edge, [(p.conn, p.topic_b, p.join_ref) for p in kept]))

    def on_worker_down(self, msg: wire.PeerDown) -> None:
        """Another worker is gone: its presence entries leave now, not after OWNER_TIMEOUT."""
        self.presence.owner_down(msg.peer.decode(errors="replace"))

    def on_evicted(self, msg: wire.Evicted) -> None:
        """The broker declared us dead while we were only slow: every edge has already
        sent phx_error for our channels, so end them all; clients rejoin elsewhere."""
        procs = list(self.channels.values())
        log.warning("worker %s: the broker had declared this worker dead; ending its %d channel(s)",
                    self.slot, len(procs))
        for proc in procs:
            self.end(proc, self.step_end, ("shutdown", "closed"))

    # --- connect ----------------------------------------------------------------------

    def on_connect(self, msg: wire.Connect) -> None:
        self.start(self.connect(msg.peer, msg.request_id, msg.request))

    async def connect(self, edge: bytes, conn: bytes, request: bytes) -> None:
        status, body = await self.run_connect(edge, conn, request)
        self.bus.send(wire.connect_reply(edge, conn, status, body))

    async def run_connect(self, edge: bytes, conn: bytes, request: bytes) -> tuple[bytes, bytes]:
        def refuse(reason: str) -> tuple[bytes, bytes]:
            return _ERROR, orjson.dumps({"reason": reason})
        try:
            req = orjson.loads(request)
            params, info = req.get("params") or {}, req.get("connect_info") or {}
        except (ValueError, AttributeError) as exc:
            log.warning("worker %s: bad connect request from edge %r conn %r: %s", self.slot, edge, conn, exc)
            return refuse("bad connect request")
        socket = SocketState()
        try:
            result = True
            if self.app.connect_handler is not None:
                result = await _maybe_await(self.app.connect_handler(params, socket, info))
            if isinstance(result, SocketState):
                socket = result
            elif isinstance(result, Error) or result is False or result is None:
                reason = result.reply.get("reason", "refused") if isinstance(result, Error) else "refused"
                return refuse(reason if isinstance(reason, str) else str(reason))
            elif result is not True:
                log.error("connect returned %r (%s) for edge %r conn %r; valid returns: the socket "
                          "(socket.assign(...)) or True to accept, False, None or error(...) to refuse",
                          result, type(result).__name__, edge, conn)
                return refuse("connect returned an invalid value")
            sid = self.app.id_handler(socket) if self.app.id_handler is not None else None
            if sid is not None and not isinstance(sid, str):
                log.error("id returned %r (%s) for edge %r conn %r; valid returns: a string or None",
                          sid, type(sid).__name__, edge, conn)
                return refuse("id returned an invalid value")
        except Exception:
            log.exception("connect crashed (edge %r conn %r)", edge, conn)
            return refuse("connect crashed")
        try:
            return _OK, orjson.dumps({"assigns": socket.assigns, "id": sid})
        except TypeError as exc:
            log.error("connect for edge %r conn %r: the socket assigns are not JSON-serialisable (%s): %r",
                      edge, conn, exc, socket.assigns)
            return refuse("assigns are not JSON-serialisable")

    # --- channel frames (run by each channel's mailbox in workers/channels.py) --------

    def on_join(self, msg: wire.Join) -> None:
        edge, conn, topic_b, join_ref, ref = msg.peer, msg.conn_id, msg.topic, msg.join_ref, msg.ref
        self.edges.add(edge)
        topic = topic_b.decode()
        route = system_route(topic) if topic.startswith(SYSTEM_PREFIX) else self.app.route(topic)
        if route is None:
            self.bus.send(wire.join_reply(edge, conn, topic_b, join_ref, ref, _ERROR,
                                             b'{"reason":"unmatched topic"}', b"[]"))
            return
        info, payload = orjson.loads(msg.socket), orjson.loads(msg.payload)
        if not isinstance(info, dict) or not isinstance(info.get("assigns", {}), dict):
            raise wire.BusFrameError("join socket_json is not {\"assigns\": {...}, \"id\": ...}")
        old = self.channels.get((edge, conn, topic_b))
        if old is not None:
            self.kill(old)   # a duplicate join the edge has not terminated yet
        assigns = info.get("assigns") or {}
        if route.assigns:
            assigns.update(copy.deepcopy(route.assigns))   # changes stay in this channel
        socket = SocketState(assigns, info.get("id"), topic, wire.decode_ref(join_ref))
        cls = route.channel
        try:
            channel = cls.__new__(cls)
            channel.topic, channel.socket = topic, socket
            proc = channel._proc = ChannelProc(self, channel, edge, conn, topic_b, join_ref,
                                               self.intercepts_of(cls)[0])
            channel.__init__()
        except Exception:
            log.exception("%s.__init__ crashed (topic %r edge %r conn %r)", cls.__name__, topic, edge, conn)
            self.bus.send(wire.join_reply(edge, conn, topic_b, join_ref, ref, _ERROR,
                                             b'{"reason":"join crashed"}', b"[]"))
            return
        self.channels[(edge, conn, topic_b)] = proc
        self.post(proc, self.step_join, ref, payload)

    def on_in(self, msg: wire.In) -> None:
        proc = self.channels.get((msg.peer, msg.conn_id, msg.topic))
        join_ref = msg.join_ref
        if proc is None or (join_ref and join_ref != proc.join_ref):
            log.debug("worker %s: no channel %r for conn %r join_ref %r; dropped",
                      self.slot, msg.topic, msg.conn_id, join_ref)
            return
        fmt = msg.fmt
        if fmt == wire.JSON:
            payload = orjson.loads(msg.payload)
        elif fmt == wire.BINARY:
            payload = msg.payload
        else:
            raise wire.BusFrameError(f"unknown payload format {fmt[:8]!r}")
        self.post(proc, self.step_in, msg.ref, msg.event.decode(), payload)

    def on_leave(self, msg: wire.Leave) -> None:
        proc = self.channels.get((msg.peer, msg.conn_id, msg.topic))
        join_ref = msg.join_ref
        if proc is None:   # not joined here (any more): Phoenix still answers ok
            self.bus.send(wire.reply(msg.peer, msg.conn_id, msg.topic, join_ref, msg.ref,
                                        _OK, _EMPTY_JSON, wire.JSON))
        elif not join_ref or join_ref == proc.join_ref:
            self.end(proc, self.step_leave, msg.ref)

    def on_terminate(self, msg: wire.Terminate) -> None:
        proc = self.channels.get((msg.peer, msg.conn_id, msg.topic))
        join_ref, reason = msg.join_ref, msg.reason
        if proc is None or (join_ref and join_ref != proc.join_ref):
            return
        if reason == b"duplicate_join":   # an exit signal in Phoenix: terminate is not called
            self.kill(proc)
        else:
            self.end(proc, self.step_end, ("shutdown", reason.decode()))

    # --- process life -----------------------------------------------------------------

    def on_beat(self) -> None:
        """With each heartbeat to the broker: the supervisor's liveness file, metrics, and
        whether the supervisor is still there."""
        if self.stopping.is_set():
            return
        metrics.recorder.channels(len(self.channels))
        try:
            self.alive()
        except Exception:
            if not self.alive_failed:
                log.exception("worker %s: the supervisor's liveness callback failed", self.slot)
            self.alive_failed = True
        if os.getppid() != self.ppid:
            log.warning("worker %s: parent process gone; stopping", self.slot)
            self.stopping.set()

    async def shutdown(self) -> None:
        """BYE to the broker, then terminate("shutdown") for every channel, bounded in time."""
        self.bus.bye()
        procs = list(self.channels.values())
        for proc in procs:
            self.kill(proc)
        self.presence.flush()   # their presence leaves, before the PUB socket closes
        pending = [self.loop.create_task(self.terminate(p, "shutdown")) for p in procs
                   if p.joined and type(p.channel).terminate is not Channel.terminate]
        if pending:
            done, late = await asyncio.wait(pending, timeout=SHUTDOWN_GRACE)
            for task in late:
                task.cancel()
            if late:
                log.warning("worker %s: %d terminate() call(s) still running after %.0f s; abandoned",
                            self.slot, len(late), SHUTDOWN_GRACE)
        for task in list(self.tasks):
            task.cancel()
        log.info("worker %s stopped, %d channel(s) closed", self.slot, len(procs))


async def _serve(app: api.Socket, sockets: PeerSockets, slot: int, peer_id: bytes,
                 alive: Callable[[], None]) -> None:
    worker = Worker(app, sockets, slot=slot, peer_id=peer_id, alive=alive)
    api._runtime, presence._tracker = worker, worker.presence
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    status = loop.create_task(publish_status(worker))   # zchannels:status snapshots
    replicate = loop.create_task(presence_forever(worker))
    try:
        await worker.stopping.wait()
        await worker.shutdown()
    finally:
        worker.bus.bye()   # a no-op after a clean shutdown; stops the heartbeats in any case
        status.cancel()
        replicate.cancel()
        api._runtime = presence._tracker = None


async def presence_forever(worker: Worker) -> None:
    """Full presence state every PRESENCE_ANNOUNCE_INTERVAL; silent owners dropped twice as often."""
    tick = 0
    while not worker.stopping.is_set():
        try:
            if tick % 2 == 0:
                worker.presence.announce()
            worker.presence.expire()
        except Exception:   # never let presence take a worker down
            log.exception("worker %s: presence replication failed", worker.slot)
        tick += 1
        try:
            await asyncio.wait_for(worker.stopping.wait(), PRESENCE_ANNOUNCE_INTERVAL / 2)
        except asyncio.TimeoutError:
            pass


def run_worker(app_spec: str, bus: str, slot: int, log_level: str, alive: Callable[[], None],
               log_format: str = "text") -> int:
    """Run one worker until SIGTERM/SIGINT; return the process exit code.  Raises ConfigError
    when the app cannot be loaded or the bus address is malformed: no restart can fix those."""
    setup_logging(log_level, f"worker{slot}", log_format)
    faulthandler.enable()   # SIGABRT from the supervisor on a stuck loop prints every thread's stack
    try:
        wire.bus_endpoints(bus)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        app = load_app(app_spec)
    except AppLoadError as exc:
        if exc.__cause__ is not None:   # the whole traceback for whoever asks for debug logs
            log.debug("loading the app failed", exc_info=exc.__cause__)
        raise ConfigError(describe(exc)) from None
    if not app.routes:
        log.warning("app %s declares no channels (socket.channel(...)): every join is refused", app_spec)
    peer_id = wire.new_peer_id(wire.ROLE_WORKER, f"w{slot}")
    ctx = zmq.Context()
    try:
        sockets = connect_peer(ctx, bus, peer_id, HWM, pub_nodrop=True)
    except zmq.ZMQError as exc:   # libzmq refused the address itself: no retry can help
        ctx.destroy(linger=0)
        raise ConfigError(f"cannot connect to --bus {bus!r}: {exc}") from None
    log.info("worker %s starting: pid %s app %s bus %s", slot, os.getpid(), app_spec, bus)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(_serve(app, sockets, slot, peer_id, alive))
        else:
            uvloop.run(_serve(app, sockets, slot, peer_id, alive))
    finally:
        for sock in sockets:
            sock.close(linger=CLOSE_LINGER_MS)
        ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m zchannels.workers.runner APP --bus tcp://HOST:PORT``: one worker, no supervisor."""
    parser = argparse.ArgumentParser(prog="python -m zchannels.workers.runner", description=main.__doc__)
    parser.add_argument("app")
    parser.add_argument("--bus", default="tcp://127.0.0.1:5570")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-format", default="text", choices=["text", "json"])
    parser.add_argument("--curve-server-key", metavar="FILE", help="the broker's public key file")
    parser.add_argument("--curve-secret", metavar="FILE", help="this worker's secret key file")
    args = parser.parse_args(argv)
    try:
        curve.install(curve.load_client_keys(args.curve_server_key, args.curve_secret))
    except curve.CurveError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    try:
        return run_worker(args.app, args.bus, args.slot, args.log_level, lambda: None, args.log_format)
    except ConfigError as exc:   # the reserved code, so a supervisor that spawns us stops too
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return HANDLER_LOAD_ERROR


if __name__ == "__main__":
    sys.exit(main())
