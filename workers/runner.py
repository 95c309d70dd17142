"""One worker process: the user's channels, driven by bus frames from the broker.

The supervisor forks a child and calls ``run_worker``.  The worker holds a DEALER to
the broker's ROUTER (connects, joins, client pushes in; replies and pushes out), a PUB
into the broadcast proxy and a SUB that receives only the topics some local channel
intercepts.  Each channel instance is a mailbox: its messages run one at a time, in
order; a drain task exists only while it has messages (10k+ idle channels cost no
tasks).  Heartbeats leave from this event loop, so a stuck loop stops them and the
broker and supervisor notice.
"""
from __future__ import annotations

import argparse
import asyncio
import collections.abc
import copy
import faulthandler
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any, Callable

import orjson
import zmq

from broker import wire
from broker.logsetup import announce_ready, setup_logging
from broker.loopsock import LoopSocket
from workers import api
from workers.api import BadReturn, Channel, Error, NoReply, Reply, SocketState, Stop, Timer, check_result
from workers.routes import AppLoadError, load_app
from workers.supervisor import HANDLER_LOAD_ERROR  # exit code: the app cannot be loaded


HEARTBEAT_INTERVAL = 0.5     # seconds
BROKER_SILENT_WARNING = 3.0  # seconds without any frame from the broker before we say so
SHUTDOWN_GRACE = 2.0         # seconds for terminate() callbacks when the worker stops
CLOSE_LINGER_MS = 500        # lets BYE and last broadcasts leave on a graceful stop
HWM = 100_000

log = logging.getLogger("zchannels.worker")

JOINING, JOINED, ENDING, CLOSED = range(4)
_CRASHED = object()
_STARTED = object()
_OK, _ERROR = b"ok", b"error"
_EMPTY_JSON = b"{}"


class ChannelProc:
    """Runtime record of one channel instance: identity, state, mailbox, timers."""
    __slots__ = ("worker", "channel", "edge", "conn", "topic", "topic_b", "join_ref",
                 "intercept", "state", "joined", "mailbox", "running", "task", "timers",
                 "subscribed")

    def __init__(self, worker: "Worker", channel: Channel, edge: bytes, conn: bytes,
                 topic_b: bytes, join_ref: bytes, intercept: frozenset):
        self.worker = worker
        self.channel = channel
        self.edge, self.conn, self.topic_b, self.join_ref = edge, conn, topic_b, join_ref
        self.topic = channel.topic
        self.intercept = intercept
        self.state = JOINING
        self.joined = False           # join() returned ok(): push/broadcast allowed
        self.mailbox: deque | None = None
        self.running = False
        self.task: asyncio.Task | None = None
        self.timers: set | None = None
        self.subscribed = False

    @property
    def origin(self) -> bytes:
        return wire.origin_of(self.edge, self.conn)

    def __repr__(self) -> str:
        return (f"{type(self.channel).__name__} {self.topic!r} (edge {self.edge.decode(errors='replace')} "
                f"conn {self.conn.decode(errors='replace')} join_ref {self.join_ref.decode(errors='replace')})")


class _Resumed(collections.abc.Coroutine):
    """A coroutine already run up to its first suspension, handed over to a Task.

    The Task's first step gets what the coroutine is waiting for; after that, every
    step (and a cancellation, even one before the first step) goes straight to it.
    """
    __slots__ = ("coro", "pending")

    def __init__(self, coro: Any, pending: Any):
        self.coro, self.pending = coro, pending

    def send(self, value: Any) -> Any:
        if self.pending is not _STARTED:
            pending, self.pending = self.pending, _STARTED
            return pending
        return self.coro.send(value)

    def throw(self, *exc: Any) -> Any:
        self.pending = _STARTED
        return self.coro.throw(*exc)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Any:
        raise TypeError("a _Resumed coroutine is driven by its Task only")


class Worker:
    def __init__(self, app: api.Socket, dealer: zmq.Socket, pub: zmq.Socket, sub: zmq.Socket,
                 slot: int, peer_id: bytes, alive: Callable[[], None]):
        self.app, self.slot, self.peer_id, self.alive = app, slot, peer_id, alive
        self.loop = asyncio.get_running_loop()
        self.dealer = LoopSocket(dealer, self.on_dealer, self.loop, name="worker dealer")
        self.pub = LoopSocket(pub, None, self.loop, name="worker pub")
        self.sub_sock = sub
        self.sub = LoopSocket(sub, self.on_sub, self.loop, name="worker sub")
        self.channels: dict[tuple[bytes, bytes, bytes], ChannelProc] = {}
        self.intercepts: dict[bytes, set[ChannelProc]] = {}   # topic key -> intercepting channels
        self.tasks: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.ready = False
        self.bad_frames = 0
        self.last_broker = time.monotonic()
        self.broker_silent = False
        self.ppid = os.getppid()
        self.handlers = {
            wire.CONNECT: self.on_connect, wire.JOIN: self.on_join, wire.IN: self.on_in,
            wire.LEAVE: self.on_leave, wire.TERMINATE: self.on_terminate,
            wire.HEARTBEAT: self.on_heartbeat, wire.EDGE_DOWN: self.on_edge_down,
            wire.UNROUTABLE: self.on_unroutable,
        }
        self._intercept_cache: dict[type, tuple[frozenset, bytes]] = {}

    # --- bus input --------------------------------------------------------------------

    def on_dealer(self, frames: list[bytes]) -> None:
        self.last_broker = time.monotonic()
        kind = frames[0]
        handler = self.handlers.get(kind)
        try:
            if handler is None:
                raise wire.BusFrameError(f"unknown bus kind {kind[:8]!r}")
            if kind in wire.EDGE_TO_WORKER:
                wire.check_frames(frames)
            elif len(frames) < 2:
                raise wire.BusFrameError(f"bus kind {kind!r} without fields")
            handler(frames)
        except (wire.BusFrameError, ValueError) as exc:  # ValueError: bad UTF-8 or JSON
            self.bad_frame(frames, exc)

    def on_sub(self, frames: list[bytes]) -> None:
        try:
            wire.check_broadcast(frames)
            procs = self.intercepts.get(frames[0])
            if not procs:
                return
            event, origin, data, fmt = frames[2].decode(), frames[3], frames[4], frames[5]
            targets = [p for p in procs if event in p.intercept and not (origin and origin == p.origin)]
            for proc in targets:   # each channel gets its own decoded copy to change at will
                payload = orjson.loads(data) if fmt == wire.JSON else data
                self.post(proc, self.step_out, event, payload)
        except (wire.BusFrameError, ValueError) as exc:
            self.bad_frame(frames, exc, source=f"broadcast on {frames[0][:60]!r}")

    def bad_frame(self, frames: list[bytes], exc: Exception, source: str = "") -> None:
        self.bad_frames += 1
        if self.bad_frames <= 10 or self.bad_frames % 1000 == 0:
            what = source or f"{frames[0][:8]!r} frame from peer {frames[1][:60] if len(frames) > 1 else b'?'!r}"
            log.warning("worker %s: dropped a bad %s (%d so far): %s", self.slot, what, self.bad_frames, exc)

    def on_heartbeat(self, frames: list[bytes]) -> None:
        if self.broker_silent:
            self.broker_silent = False
            log.info("worker %s: broker answering again", self.slot)
        if not self.ready:
            self.ready = True
            announce_ready(worker=self.slot, pid=os.getpid(), id=self.peer_id.decode())
            log.info("worker ready: slot %s pid %s id %s", self.slot, os.getpid(), self.peer_id.decode())

    def on_unroutable(self, frames: list[bytes]) -> None:
        log.debug("worker %s: broker could not deliver a %r to %r", self.slot,
                  frames[2] if len(frames) > 2 else b"?", frames[1])

    def on_edge_down(self, frames: list[bytes]) -> None:
        edge = frames[1]
        procs = [p for p in self.channels.values() if p.edge == edge]
        log.info("worker %s: edge %r down, terminating its %d channel(s)", self.slot, edge, len(procs))
        for proc in procs:
            self.end(proc, self.step_end, ("shutdown", "closed"))

    # --- connect ----------------------------------------------------------------------

    def on_connect(self, frames: list[bytes]) -> None:
        self.start(self.connect(frames[1], frames[2], frames[3]))

    async def connect(self, edge: bytes, conn: bytes, request: bytes) -> None:
        status, body = await self.run_connect(edge, conn, request)
        self.dealer.send([wire.CONNECT_REPLY, edge, conn, status, body])

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

    # --- channel lifecycle ------------------------------------------------------------

    def on_join(self, frames: list[bytes]) -> None:
        _, edge, conn, topic_b, join_ref, ref, socket_json, payload_b = frames
        topic = topic_b.decode()
        route = self.app.route(topic)
        if route is None:
            self.dealer.send([wire.JOIN_REPLY, edge, conn, topic_b, join_ref, ref, _ERROR,
                              b'{"reason":"unmatched topic"}', b"[]"])
            return
        info, payload = orjson.loads(socket_json), orjson.loads(payload_b)
        if not isinstance(info, dict) or not isinstance(info.get("assigns", {}), dict):
            raise wire.BusFrameError("join socket_json is not {\"assigns\": {...}, \"id\": ...}")
        old = self.channels.get((edge, conn, topic_b))
        if old is not None:
            self.kill(old)   # a duplicate join the edge has not terminated yet
        assigns = info.get("assigns") or {}
        if route.assigns:
            assigns.update(copy.deepcopy(route.assigns))   # changes stay in this channel
        socket = SocketState(assigns, info.get("id"), topic, join_ref.decode() or None)
        cls = route.channel
        try:
            channel = cls.__new__(cls)
            channel.topic, channel.socket = topic, socket
            proc = channel._proc = ChannelProc(self, channel, edge, conn, topic_b, join_ref,
                                               self.intercepts_of(cls)[0])
            channel.__init__()
        except Exception:
            log.exception("%s.__init__ crashed (topic %r edge %r conn %r)", cls.__name__, topic, edge, conn)
            self.dealer.send([wire.JOIN_REPLY, edge, conn, topic_b, join_ref, ref, _ERROR,
                              b'{"reason":"join crashed"}', b"[]"])
            return
        self.channels[(edge, conn, topic_b)] = proc
        self.post(proc, self.step_join, ref, payload)

    async def step_join(self, proc: ChannelProc, ref: bytes, payload: Any) -> None:
        result = await self.call(proc, "join", proc.topic, payload)
        try:
            response = b"" if result is _CRASHED else orjson.dumps(result.reply)
        except TypeError as exc:
            log.error("channel %r crashed: the join response is not JSON-serialisable: %s", proc, exc)
            result = _CRASHED
        if result is _CRASHED:
            self.detach(proc, CLOSED)
            self.join_reply(proc, ref, _ERROR, b'{"reason":"join crashed"}', b"[]")
        elif type(result) is Error:
            self.join_reply(proc, ref, _ERROR, response, b"[]")
            self.detach(proc, ENDING)
            await self.terminate(proc, "shutdown")
            proc.state = CLOSED
        else:
            proc.joined = True
            if proc.state == JOINING:   # else a leave/close arrived meanwhile and is queued
                proc.state = JOINED
                self.subscribe(proc)
            self.join_reply(proc, ref, _OK, response, self.intercepts_of(type(proc.channel))[1])

    def join_reply(self, proc: ChannelProc, ref: bytes, status: bytes, response: bytes, intercept: bytes) -> None:
        self.dealer.send([wire.JOIN_REPLY, proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                          status, response, intercept])

    def on_in(self, frames: list[bytes]) -> None:
        _, edge, conn, topic_b, join_ref, ref, event, data, fmt = frames
        proc = self.channels.get((edge, conn, topic_b))
        if proc is None or (join_ref and join_ref != proc.join_ref):
            log.debug("worker %s: no channel %r for conn %r join_ref %r; dropped", self.slot, topic_b, conn, join_ref)
            return
        if fmt == wire.JSON:
            payload = orjson.loads(data)
        elif fmt == wire.BINARY:
            payload = data
        else:
            raise wire.BusFrameError(f"unknown payload format {fmt[:8]!r}")
        self.post(proc, self.step_in, ref, event.decode(), payload)

    async def step_in(self, proc: ChannelProc, ref: bytes, event: str, payload: Any) -> None:
        if proc.state == CLOSED:
            return
        socket = proc.channel.socket
        socket.ref = ref.decode() or None
        try:
            result = await self.call(proc, "handle_in", event, payload)
        finally:
            socket.ref = None
        await self.outcome(proc, result, ref)

    async def step_out(self, proc: ChannelProc, event: str, payload: Any) -> None:
        if proc.state != CLOSED:
            await self.outcome(proc, await self.call(proc, "handle_out", event, payload))

    async def step_info(self, proc: ChannelProc, msg: Any) -> None:
        if proc.state != CLOSED:
            await self.outcome(proc, await self.call(proc, "handle_info", msg))

    async def call(self, proc: ChannelProc, callback: str, *args: Any) -> Any:
        """Run one callback of the channel and check its return shape; _CRASHED if it failed."""
        channel = proc.channel
        try:
            result = getattr(channel, callback)(*args, channel.socket)
            if hasattr(result, "__await__"):
                result = await result
            check_result(channel, callback, result)
            return result
        except BadReturn as exc:
            log.error("channel %r crashed: %s", proc, exc)
        except Exception:
            log.exception("channel %r crashed in %s.%s", proc, type(channel).__name__, callback)
        return _CRASHED

    async def outcome(self, proc: ChannelProc, result: Any, ref: bytes = b"") -> None:
        kind = type(result)
        if kind is NoReply:
            return
        try:
            if kind is Reply:
                self.reply(proc, ref, result)
                return
            if kind is Stop and result.reply is not None:
                self.reply(proc, ref, result.reply)
        except TypeError as exc:
            log.error("channel %r crashed: the reply response is not JSON-serialisable: %s", proc, exc)
            kind = None
        if kind is Stop:
            self.detach(proc, ENDING)
            await self.terminate(proc, result.reason)
            self.close(proc, wire.CHANNEL_CLOSE if result.graceful else wire.CHANNEL_ERROR)
        else:   # crashed: Phoenix does not call terminate after a raise
            self.detach(proc, CLOSED)
            self.close(proc, wire.CHANNEL_ERROR)

    def reply(self, proc: ChannelProc, ref: bytes, result: Reply) -> None:
        response = result.response
        if isinstance(response, bytes):
            data, fmt = response, wire.BINARY
        else:
            data, fmt = orjson.dumps(response), wire.JSON
        self.dealer.send([wire.REPLY, proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                          result.status.encode(), data, fmt])

    def close(self, proc: ChannelProc, kind: bytes) -> None:
        proc.state = CLOSED
        self.dealer.send([kind, proc.edge, proc.conn, proc.topic_b, proc.join_ref])

    def on_leave(self, frames: list[bytes]) -> None:
        _, edge, conn, topic_b, join_ref, ref = frames
        proc = self.channels.get((edge, conn, topic_b))
        if proc is None:   # not joined here (any more): Phoenix still answers ok
            self.dealer.send([wire.REPLY, edge, conn, topic_b, join_ref, ref, _OK, _EMPTY_JSON, wire.JSON])
        elif not join_ref or join_ref == proc.join_ref:
            self.end(proc, self.step_leave, ref)

    async def step_leave(self, proc: ChannelProc, ref: bytes) -> None:
        if proc.state == CLOSED:   # stopped by itself before the leave got its turn
            self.dealer.send([wire.REPLY, proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                              _OK, _EMPTY_JSON, wire.JSON])
            return
        await self.terminate(proc, ("shutdown", "left"))
        self.dealer.send([wire.REPLY, proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                          _OK, _EMPTY_JSON, wire.JSON])
        self.close(proc, wire.CHANNEL_CLOSE)

    def on_terminate(self, frames: list[bytes]) -> None:
        _, edge, conn, topic_b, join_ref, reason = frames
        proc = self.channels.get((edge, conn, topic_b))
        if proc is None or (join_ref and join_ref != proc.join_ref):
            return
        if reason == b"duplicate_join":   # an exit signal in Phoenix: terminate is not called
            self.kill(proc)
        else:
            self.end(proc, self.step_end, ("shutdown", reason.decode()))

    async def step_end(self, proc: ChannelProc, reason: Any) -> None:
        if proc.state != CLOSED:
            await self.terminate(proc, reason)
            proc.state = CLOSED

    async def terminate(self, proc: ChannelProc, reason: Any) -> None:
        channel = proc.channel
        if type(channel).terminate is Channel.terminate:
            return
        try:
            await _maybe_await(channel.terminate(reason, channel.socket))
        except Exception:
            log.exception("channel %r: terminate(%r) raised", proc, reason)

    def end(self, proc: ChannelProc, step: Callable, *args: Any) -> None:
        """The channel ends once the messages already in its mailbox are handled."""
        self.detach(proc, ENDING)
        self.post(proc, step, *args, force=True)

    def kill(self, proc: ChannelProc) -> None:
        """End a channel at once, like an exit signal: no terminate, no frames."""
        self.detach(proc, CLOSED)
        if proc.mailbox is not None:
            proc.mailbox.clear()
        if proc.task is not None:
            proc.task.cancel()

    def detach(self, proc: ChannelProc, state: int) -> None:
        """Take the channel out of every table; no new message reaches it."""
        proc.state = max(proc.state, state)
        key = (proc.edge, proc.conn, proc.topic_b)
        if self.channels.get(key) is proc:
            del self.channels[key]
        if proc.subscribed:
            self.unsubscribe(proc)
        if proc.timers:
            for timer in list(proc.timers):
                timer.cancel()

    # --- intercepts -------------------------------------------------------------------

    def intercepts_of(self, cls: type) -> tuple[frozenset, bytes]:
        cached = self._intercept_cache.get(cls)
        if cached is None:
            events = list(dict.fromkeys(cls.intercept or ()))
            cached = self._intercept_cache[cls] = (frozenset(events), orjson.dumps(events))
        return cached

    def subscribe(self, proc: ChannelProc) -> None:
        if not proc.intercept:
            return
        key = wire.topic_key(proc.topic)
        procs = self.intercepts.get(key)
        if procs is None:
            procs = self.intercepts[key] = set()
            self.sub_sock.setsockopt(zmq.SUBSCRIBE, key)
            self.sub._schedule()   # setsockopt may consume the edge-triggered FD signal
        procs.add(proc)
        proc.subscribed = True

    def unsubscribe(self, proc: ChannelProc) -> None:
        proc.subscribed = False
        key = wire.topic_key(proc.topic)
        procs = self.intercepts.get(key)
        if procs is not None:
            procs.discard(proc)
            if not procs:
                del self.intercepts[key]
                self.sub_sock.setsockopt(zmq.UNSUBSCRIBE, key)
                self.sub._schedule()

    # --- mailbox ----------------------------------------------------------------------

    def post(self, proc: ChannelProc, step: Callable, *args: Any, force: bool = False) -> None:
        if proc.state >= ENDING and not force:
            return
        box = proc.mailbox
        if box is None:
            box = proc.mailbox = deque()
        box.append((step, args))
        if not proc.running:
            proc.running = True
            proc.task = self.start(self.drain(proc))

    async def drain(self, proc: ChannelProc) -> None:
        box = proc.mailbox
        try:
            while box:
                step, args = box.popleft()
                try:
                    await step(proc, *args)
                except Exception:
                    log.exception("worker %s: internal error in %s for channel %r", self.slot,
                                  step.__name__, proc)
        finally:
            proc.running = False
            proc.task = None
            proc.mailbox = None

    def start(self, coro: Any) -> asyncio.Task | None:
        """Run ``coro`` now; give it a Task only if it really waits for something.

        Most callbacks finish without waiting (sync handlers, or async ones that only
        push): they run inline, with no Task and no extra loop turn per message.
        """
        try:
            pending = coro.send(None)
        except StopIteration:
            return None
        except Exception:
            log.exception("worker %s: internal error", self.slot)
            return None
        task = self.loop.create_task(_Resumed(coro, pending))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- called by workers.api --------------------------------------------------------

    def push(self, proc: ChannelProc, event: str, data: bytes, fmt: bytes) -> None:
        if proc.state == CLOSED:
            log.debug("push %r from closed channel %r dropped", event, proc)
            return
        self.dealer.send([wire.PUSH, proc.edge, proc.conn, proc.topic_b, proc.join_ref,
                          event.encode(), data, fmt])

    def publish(self, topic: str, event: str, data: bytes, fmt: bytes, origin: bytes) -> None:
        self.pub.send(wire.broadcast_frames(topic, event, data, fmt, origin))

    def post_info(self, proc: ChannelProc, msg: Any) -> None:
        self.post(proc, self.step_info, msg)

    def send_after(self, proc: ChannelProc, ms: float, msg: Any) -> Timer:
        if proc.timers is None:
            proc.timers = set()
        timer = Timer(None, proc.timers)
        timer.handle = self.loop.call_later(max(ms, 0) / 1000, self.fire, proc, timer, msg)
        proc.timers.add(timer)
        return timer

    def fire(self, proc: ChannelProc, timer: Timer, msg: Any) -> None:
        proc.timers.discard(timer)
        self.post(proc, self.step_info, msg)

    # --- process life -----------------------------------------------------------------

    async def heartbeat(self) -> None:
        load_frames = [wire.HEARTBEAT, wire.ROLE_WORKER]
        alive_failed = False
        while not self.stopping.is_set():
            self.dealer.send(load_frames + [str(len(self.channels)).encode()])
            try:
                self.alive()
            except Exception:
                if not alive_failed:
                    log.exception("worker %s: the supervisor's liveness callback failed", self.slot)
                alive_failed = True
            if os.getppid() != self.ppid:
                log.warning("worker %s: parent process gone; stopping", self.slot)
                self.stopping.set()
            silent = time.monotonic() - self.last_broker
            if silent > BROKER_SILENT_WARNING and not self.broker_silent:
                self.broker_silent = True
                log.warning("worker %s: no answer from the broker for %.0f s; still trying", self.slot, silent)
            try:
                await asyncio.wait_for(self.stopping.wait(), HEARTBEAT_INTERVAL)
            except asyncio.TimeoutError:
                pass

    async def shutdown(self) -> None:
        """BYE to the broker, then terminate("shutdown") for every channel, bounded in time."""
        self.dealer.send([wire.BYE, wire.ROLE_WORKER])
        procs = list(self.channels.values())
        for proc in procs:
            self.kill(proc)
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


async def _maybe_await(value: Any) -> Any:
    if hasattr(value, "__await__"):
        return await value
    return value


async def _serve(app: api.Socket, socks: tuple, slot: int, peer_id: bytes,
                 alive: Callable[[], None]) -> None:
    worker = Worker(app, *socks, slot=slot, peer_id=peer_id, alive=alive)
    api._runtime = worker
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stopping.set)
    beat = loop.create_task(worker.heartbeat())
    try:
        await worker.stopping.wait()
        await worker.shutdown()
    finally:
        beat.cancel()
        api._runtime = None


def run_worker(app_spec: str, bus: str, slot: int, log_level: str, alive: Callable[[], None]) -> int:
    """Run one worker until SIGTERM/SIGINT; return the process exit code."""
    setup_logging(log_level, f"worker{slot}")
    faulthandler.enable()   # SIGABRT from the supervisor on a stuck loop prints the stack
    try:
        app = load_app(app_spec)
    except AppLoadError as exc:
        log.error("%s", exc, exc_info=exc.__cause__ is not None)
        return HANDLER_LOAD_ERROR
    if not app.routes:
        log.warning("app %s declares no channels (socket.channel(...)): every join is refused", app_spec)
    try:
        router_ep, publish_ep, subscribe_ep = wire.bus_endpoints(bus)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    peer_id = wire.new_peer_id(wire.ROLE_WORKER, f"w{slot}")
    ctx = zmq.Context()
    dealer, pub, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    dealer.setsockopt(zmq.ROUTING_ID, peer_id)
    for sock in (dealer, pub, sub):
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, HWM)
        sock.setsockopt(zmq.RCVHWM, HWM)
    dealer.connect(router_ep)
    pub.connect(publish_ep)
    sub.connect(subscribe_ep)
    log.info("worker %s starting: pid %s app %s bus %s", slot, os.getpid(), app_spec, bus)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(_serve(app, (dealer, pub, sub), slot, peer_id, alive))
        else:
            uvloop.run(_serve(app, (dealer, pub, sub), slot, peer_id, alive))
    finally:
        for sock in (dealer, pub, sub):
            sock.close(linger=CLOSE_LINGER_MS)
        ctx.term()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m workers.runner APP --bus tcp://HOST:PORT``: one worker, no supervisor."""
    parser = argparse.ArgumentParser(prog="python -m workers.runner", description=main.__doc__)
    parser.add_argument("app")
    parser.add_argument("--bus", default="tcp://127.0.0.1:5570")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    return run_worker(args.app, args.bus, args.slot, args.log_level, lambda: None)


if __name__ == "__main__":
    sys.exit(main())
