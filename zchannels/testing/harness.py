"""``ChannelTest``: the user's handler module on a real worker, in the test's own process.

The worker is ``workers.runner.Worker``, the class a worker process runs, with its channel
table, mailboxes, intercepts, timers and presence tracker; only its place on the bus is in
memory (membus.py).  This object plays the rest of the system around it: the edge that sends
it connects, joins, pushes, leaves and terminates (clients.py) and routes its replies and
pushes back to the test's clients, and the broker's fan-out that hands each broadcast to the
clients joined on its topic (the fastlane, minus the events a channel intercepts and the
sender of a ``broadcast_from``) and back to the worker for ``handle_out`` and presence.

Everything runs on one event loop (clock.py) that turns only while a call of the test is
running, so the test itself stays synchronous.
"""
from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import traceback
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar, cast
from unittest.mock import ANY

import orjson

from zchannels.bus import broadcasts, wire
from zchannels.bus.peer import BusPeer
from zchannels.workers import api, presence
from zchannels.workers.api import Socket
from zchannels.workers.channels import ChannelProc
from zchannels.workers.loadapp import load_app
from zchannels.workers.payload import JSONObject
from zchannels.workers.presence import PRESENCE_TOPIC, PresenceState
from zchannels.workers.runner import Worker
from zchannels.testing.clients import END_TIMEOUT, ClientChannel, ClientSocket, ConnectRefused, ended
from zchannels.testing.clock import JumpingLoop
from zchannels.testing.mailbox import Mailbox, Message, decode, show
from zchannels.testing.membus import Frames, MemoryBus

DEFAULT_TIMEOUT = 0.1      # seconds of loop time, like ExUnit's assert_receive

_T = TypeVar("_T")
_CHANNEL_FRAMES = frozenset((wire.JOIN_REPLY, wire.REPLY, wire.PUSH, wire.CHANNEL_CLOSE, wire.CHANNEL_ERROR))


class _ErrorLog(logging.Handler):
    """The worker's error lines (a crashed channel's exception among them), for failures."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += ": " + "".join(traceback.format_exception_only(record.exc_info[1])).strip()
        self.lines.append(text)


class ChannelTest:
    """A handler module running on an in-process worker, and the clients that talk to it.

    ``app`` is an app spec as ``zchannels workers`` takes it (``path/to/channels.py``,
    ``package.module[:attr]``, loaded afresh for a file path) or a ``workers.Socket``.
    ``timeout`` (seconds) is how long assertions wait by default.  ``autojump`` lets the
    loop's clock jump over idle time (zchannels/testing/clock.py), so timers cost no real
    time; turn it off for handlers that wait on things the loop cannot see.
    Use it as a context manager, or call ``close()``; ``channel_app`` makes a pytest fixture.
    """

    def __init__(self, app: str | os.PathLike[str] | Socket, *, timeout: float = DEFAULT_TIMEOUT,
                 autojump: bool = True):
        self.app = app if isinstance(app, Socket) else load_app(os.fspath(app))
        self.timeout = timeout
        self.loop = JumpingLoop(autojump)
        self.edge_id = wire.new_peer_id(wire.ROLE_EDGE, "test")
        self.broadcasts = Mailbox()
        self.closed = False
        self._channels: dict[tuple[bytes, bytes, bytes], ClientChannel] = {}
        self._sockets: list[ClientSocket] = []
        self._connect_replies: dict[bytes, tuple[bytes, bytes]] = {}
        self._ids = itertools.count(1)
        self._waker: asyncio.Future[None] | None = None
        self._errors = _ErrorLog()
        self._worker_log = logging.getLogger("zchannels.worker")
        self._worker_log.addHandler(self._errors)
        # MemoryBus stands in for the BusPeer: it has everything of it a Worker uses.
        peer = cast(Callable[..., BusPeer],
                    functools.partial(MemoryBus, to_edge=self._from_worker, fan_out=self._fan_out))
        try:
            self.worker: Worker = self.loop.run_until_complete(self._start(peer))
        except BaseException:
            self._worker_log.removeHandler(self._errors)
            self.loop.close()
            raise

    async def _start(self, peer: Callable[..., BusPeer]) -> Worker:
        return Worker(self.app, None, 0, wire.new_peer_id(wire.ROLE_WORKER, "test"), lambda: None, peer=peer)

    def timeout_or(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # --- the test's calls ---------------------------------------------------------------

    def connect(self, params: JSONObject | None = None, connect_info: JSONObject | None = None, *,
                timeout: float | None = None) -> ClientSocket:
        """Connect a client: runs the app's ``connect(params, socket, connect_info)`` (and
        ``@socket.id``) and returns the connection, or raises ``ConnectRefused``."""
        request_id = b"rpc%d" % next(self._ids)
        request = orjson.dumps({"params": params or {}, "connect_info": connect_info or {}})
        self._deliver(wire.connect(self.edge_id, request_id, request))
        answer = self._wait(lambda: self._connect_replies.pop(request_id, None), timeout)
        if answer is None:
            raise AssertionError(f"connect got no answer within {self.timeout_or(timeout) * 1000:g} ms "
                                 "(is the app's connect still running?)")
        status, body = answer
        reply = orjson.loads(body)
        if status != b"ok":
            raise ConnectRefused(str(reply.get("reason", "refused")))
        return self.socket(reply.get("assigns") or {}, reply.get("id"))

    def socket(self, assigns: JSONObject | None = None, id: str | None = None) -> ClientSocket:
        """A connection with these ``assigns`` and ``id``, without running ``connect``
        (Phoenix's ``socket/3``)."""
        client = ClientSocket(self, b"%d" % next(self._ids), dict(assigns or {}), id)
        self._sockets.append(client)
        return client

    def broadcast(self, topic: str, event: str, payload: JSONObject | bytes) -> None:
        """Broadcast on ``topic`` from outside the channels, as ``zchannels.Publisher`` or
        ``workers.broadcast`` do: clients joined on it get it, intercepting channels through
        ``handle_out``."""
        self._publish(topic, event, payload, b"")

    def assert_broadcast(self, topic: str, event: str, payload: object = ANY, *,
                         timeout: float | None = None) -> Any:
        """Assert that ``event`` (with ``payload``, if given; ``==``, so ``ANY`` matches
        anything) is broadcast on ``topic`` within ``timeout``, by a channel, ``broadcast``
        or presence.  Takes it out of the mailbox; returns its payload."""
        found = self._wait(lambda: self.broadcasts.find(topic, event, payload, take=True), timeout)
        if found is None:
            matching = "" if payload is ANY else f" matching {show(payload)}"
            raise AssertionError(f"no broadcast {event!r}{matching} on {topic!r} within "
                                 f"{self.timeout_or(timeout) * 1000:g} ms\n"
                                 f"{self.broadcasts.describe(topic, 'broadcasts on this topic')}")
        return found.payload

    def refute_broadcast(self, topic: str, event: str, payload: object = ANY, *,
                         timeout: float | None = None) -> None:
        """Assert that no ``event`` (with ``payload``, if given) is broadcast on ``topic``
        within ``timeout`` (and none is waiting unasserted)."""
        found = self._wait(lambda: self.broadcasts.find(topic, event, payload), timeout)
        if found is not None:
            raise AssertionError(f"unexpected broadcast {event!r} on {topic!r}: {show(found.payload)}")

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of loop time pass: ``send_after`` timers and presence diffs due by
        then fire (at once with ``autojump``; else in real time)."""
        self._run(self._advance(seconds))

    def presence_list(self, topic: str) -> PresenceState:
        """Everyone tracked on ``topic`` (``workers.presence_list``)."""
        return self._run(self._inline(self.worker.presence.list, topic))

    def close(self) -> None:
        """Stop the worker as on shutdown (``terminate("shutdown")`` for every channel still
        joined) and close the loop.  Called by ``with`` and by the ``channel_app`` fixture."""
        if self.closed:
            return
        try:
            self._run(self.worker.shutdown())
        finally:
            self.closed = True
            self._worker_log.removeHandler(self._errors)
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.wait(pending))
            self.loop.close()

    def __enter__(self) -> "ChannelTest":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- running the loop (clients.py calls these too) ----------------------------------

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run the loop until ``coro`` is done, with this worker as the process's runtime
        (``workers.broadcast``, presence), as in a worker process."""
        if self.closed:
            coro.close()
            raise RuntimeError("this ChannelTest is closed")
        saved = api._runtime, presence._tracker
        api._runtime, presence._tracker = self.worker, self.worker.presence
        try:
            return self.loop.run_until_complete(coro)
        finally:
            api._runtime, presence._tracker = saved

    @staticmethod
    async def _inline(fn: Callable[..., _T], *args: Any) -> _T:
        return fn(*args)

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        """Call ``fn`` on the running loop: the handler code it runs may use the loop."""
        self._run(self._inline(fn, *args))

    def _deliver(self, frames: Frames) -> None:
        """A message from the edge, as the broker delivers it, to the worker."""
        self._call(self.worker.on_direct, frames)

    def _publish(self, topic: str, event: str, payload: JSONObject | bytes, origin: bytes) -> None:
        data, fmt = broadcasts.encode(topic, event, payload)
        self._call(self.worker.bus.publish, topic, event, data, fmt, origin)

    def _wait(self, find: Callable[[], _T | None], timeout: float | None) -> _T | None:
        """Run the loop until ``find()`` returns something (returned) or ``timeout`` passes."""
        return self._run(self._until(find, self.timeout_or(timeout)))

    async def _until(self, find: Callable[[], _T | None], timeout: float) -> _T | None:
        deadline = self.loop.time() + timeout
        while True:
            found = find()
            if found is not None:
                return found
            left = deadline - self.loop.time()
            if left <= 0:
                return None
            self._waker = waker = self.loop.create_future()
            await asyncio.wait([waker], timeout=left)

    def _wake(self) -> None:
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    def _wait_ended(self, procs: list[ChannelProc | None], timeout: float | None, what: str) -> None:
        """Run the loop until the worker is done with these channels (terminate has run)."""
        limit = END_TIMEOUT if timeout is None else timeout
        if not self._run(self._until_ended(procs, limit)):
            raise AssertionError(f"{what}: terminate still running after {limit * 1000:g} ms")

    async def _until_ended(self, procs: list[ChannelProc | None], timeout: float) -> bool:
        deadline = self.loop.time() + timeout
        for proc in procs:
            while proc is not None and proc.running:   # its mailbox (terminate) still runs
                left = deadline - self.loop.time()
                if left <= 0 or proc.task is None:
                    return False
                await asyncio.wait([proc.task], timeout=left)
        return all(ended(p) for p in procs)

    async def _advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self.loop.settle()

    # --- the edge and the broker's fan-out ----------------------------------------------

    def _add_channel(self, channel: ClientChannel) -> None:
        self._channels[(channel.socket.conn_id, channel.topic_b, channel.join_ref_b)] = channel

    def _from_worker(self, frames: Frames) -> None:
        """What the worker sends an edge: to the client channel it is for."""
        kind = frames[0]
        msg = wire.parse(frames)
        if kind == wire.CONNECT_REPLY:
            self._connect_replies[msg.request_id] = (msg.status, msg.body)
        elif kind in _CHANNEL_FRAMES:
            channel = self._channels.get((msg.conn_id, msg.topic, msg.join_ref))
            if channel is not None:
                channel._from_worker(kind, msg)
        self._wake()

    def _fan_out(self, frames: Frames) -> None:
        """A broadcast through the broker: recorded, and to every client joined on its topic."""
        msg = wire.parse_broadcast(frames)
        topic, event = wire.topic_from_key(msg.key), msg.event.decode()
        if topic == PRESENCE_TOPIC:   # the workers' own replication
            return
        self.broadcasts.add(Message(topic, event, decode(msg.payload, msg.fmt)))
        for channel in list(self._channels.values()):
            if channel.topic == topic:
                channel._broadcast(Message(topic, event, decode(msg.payload, msg.fmt)), msg.origin)
        if event == "disconnect":   # to a socket id: the edge closes those connections
            for client in self._sockets:
                if client.id_key == msg.key and not client.closed:
                    self._disconnect(client)
        self._wake()

    def _disconnect(self, client: ClientSocket) -> None:
        client.closed = True
        for channel in client.channels.values():
            if channel.live:
                channel.ended = "terminated"
                self.worker.on_direct(wire.terminate(self.edge_id, client.conn_id, channel.topic_b,
                                                     channel.join_ref_b, b"disconnected"))

    def _crash_of(self, channel: ClientChannel) -> str | None:
        """The last error the worker logged for this channel (its crash)."""
        proc = channel._proc
        if proc is None:
            return None
        mark = repr(proc)
        return next((line for line in reversed(self._errors.lines) if mark in line), None)
