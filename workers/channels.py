"""The channels of one worker process: a serial mailbox per channel, and its lifecycle.

workers/runner.py reads the bus and decodes each frame into a call here; this module
runs the user's Channel callbacks and sends what they produce (replies, pushes,
channel closes, broadcasts).  It exists so that the Phoenix channel semantics live in
one place, apart from sockets and process life:

* each channel instance is a mailbox: its messages run one at a time, in order; a
  drain task exists only while it has messages (10k+ idle channels cost no tasks),
  and a callback that never waits runs inline, with no task at all;
* join, handle_in/out/info, leave and terminate follow Phoenix: a crash ends that
  channel only, ``stop`` calls terminate, an exit signal does not;
* the SUB socket subscribes to a topic only while some local channel intercepts it
  (counted by the worker's BusPeer, so the proxy sends this process nothing else).
"""
from __future__ import annotations

import asyncio
import collections.abc
import logging
import time
from collections import deque
from typing import Any, Callable

import orjson

from zchannels.bus import wire
from zchannels.bus.peer import BusPeer
from zchannels.workers import metrics
from zchannels.workers.api import BadReturn, Channel, Error, NoReply, Reply, Stop, Timer, check_result

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

    def __init__(self, worker: "ChannelHost", channel: Channel, edge: bytes, conn: bytes,
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



class ChannelHost:
    """The table of live channels of a worker, and the calls ``workers.api`` makes on it.

    The base class of ``workers.runner.Worker``, which supplies the event loop and
    the bus peer declared below; ``ChannelProc.worker`` is that Worker.
    """
    loop: asyncio.AbstractEventLoop
    slot: int
    bus: BusPeer            # subscriptions (intercepts) and broadcasts
    presence: Any = None    # workers.presence.Tracker: entries end with their channel

    def __init__(self) -> None:
        self.channels: dict[tuple[bytes, bytes, bytes], ChannelProc] = {}
        self.edges: set[bytes] = set()     # every edge that joined a channel here (until EDGE_DOWN)
        self.intercepts: dict[bytes, set[ChannelProc]] = {}   # topic key -> intercepting channels
        self.tasks: set[asyncio.Task] = set()
        self._intercept_cache: dict[type, tuple[frozenset, bytes]] = {}

    def sync_edges(self) -> None:
        """The broker restarted, and messages in flight then may be lost (an edge's TERMINATE,
        our CHANNEL_CLOSE).  Tell each edge which of its channels we hold (perhaps none); it
        terminates those it no longer has and errors those it holds here that we no longer
        list."""
        by_edge: dict[bytes, list[tuple[bytes, bytes, bytes]]] = {edge: [] for edge in self.edges}
        for proc in self.channels.values():
            by_edge.setdefault(proc.edge, []).append((proc.conn, proc.topic_b, proc.join_ref))
        for edge, channels in by_edge.items():
            self.bus.send(wire.sync(edge, channels))
        log.info("worker %s: after a broker restart or silence, told %d edge(s) which of their channels are here",
                 self.slot, len(by_edge))

    # --- channel lifecycle (the bus frames are decoded in workers.runner) -------------

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
        self.bus.send(wire.join_reply(proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                                         status, response, intercept))

    async def step_in(self, proc: ChannelProc, ref: bytes, event: str, payload: Any) -> None:
        if proc.state == CLOSED:
            return
        socket = proc.channel.socket
        socket.ref = wire.decode_ref(ref)
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
        started = time.perf_counter()
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
        finally:
            metrics.recorder.observe(callback, time.perf_counter() - started)
        metrics.recorder.crashed(callback)
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
            self.close(proc, wire.channel_close if result.graceful else wire.channel_error)
        else:   # crashed: Phoenix does not call terminate after a raise
            self.detach(proc, CLOSED)
            self.close(proc, wire.channel_error)

    def reply(self, proc: ChannelProc, ref: bytes, result: Reply) -> None:
        response = result.response
        if isinstance(response, bytes):
            data, fmt = response, wire.BINARY
        else:
            data, fmt = orjson.dumps(response), wire.JSON
        self.bus.send(wire.reply(proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                                    result.status.encode(), data, fmt))

    def close(self, proc: ChannelProc, end: Callable[..., list[bytes]]) -> None:
        """``end`` is wire.channel_close (phx_close) or wire.channel_error (phx_error)."""
        proc.state = CLOSED
        self.bus.send(end(proc.edge, proc.conn, proc.topic_b, proc.join_ref))

    async def step_leave(self, proc: ChannelProc, ref: bytes) -> None:
        if proc.state == CLOSED:   # stopped by itself before the leave got its turn
            self.bus.send(wire.reply(proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                                        _OK, _EMPTY_JSON, wire.JSON))
            return
        await self.terminate(proc, ("shutdown", "left"))
        self.bus.send(wire.reply(proc.edge, proc.conn, proc.topic_b, proc.join_ref, ref,
                                    _OK, _EMPTY_JSON, wire.JSON))
        self.close(proc, wire.channel_close)

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
            metrics.recorder.crashed("terminate")

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
        if self.presence is not None and proc in self.presence.by_proc:
            self.presence.drop_proc(proc)

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
        if proc not in procs:
            procs.add(proc)
            self.bus.subscribe(key)
        proc.subscribed = True

    def unsubscribe(self, proc: ChannelProc) -> None:
        proc.subscribed = False
        key = wire.topic_key(proc.topic)
        procs = self.intercepts.get(key)
        if procs is not None and proc in procs:
            procs.remove(proc)
            self.bus.unsubscribe(key)
            if not procs:
                del self.intercepts[key]

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
        self.bus.send(wire.push(proc.edge, proc.conn, proc.topic_b, proc.join_ref,
                                   event.encode(), data, fmt))

    def publish(self, topic: str, event: str, data: bytes, fmt: bytes, origin: bytes) -> None:
        self.bus.publish(topic, event, data, fmt, origin)

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


async def _maybe_await(value: Any) -> Any:
    if hasattr(value, "__await__"):
        return await value
    return value
