"""Publish broadcasts from any Python process: a web app, a cron job, a script.

Workers broadcast from inside channel callbacks; everything else that wants to reach
subscribed clients uses this client.  It is a ZeroMQ PUB socket connected to the broker's
publish-in endpoint (``--bus`` port + 1), exactly like a worker's, sending the same
``BROADCAST`` frames (``bus/wire.py``), so edges cannot tell the two apart::

    from zchannels import Publisher

    with Publisher("tcp://127.0.0.1:5570") as pub:
        pub.wait_connected(5)          # see "slow joiner" below
        pub.broadcast("room:lobby", "new_msg", {"body": "deploy finished"})

Delivery is at most once, like every broadcast:

- **Slow joiner.**  A PUB socket sends only what some subscriber asked for, and the broker
  tells a new publisher which topics are subscribed right after the connection is made.
  Until then (a few milliseconds on loopback, about one round trip elsewhere) messages are
  dropped, so a process that publishes right after starting should call ``wait_connected``
  first, which waits for the connection and then ``SETTLE`` seconds for the subscriptions.
- **Reconnects.**  ZeroMQ reconnects by itself.  A socket monitor tracks whether the
  publish-in connection is up; ``broadcast`` returns False while it is down (the message is
  most likely lost) and raises ``PublishError`` once it has been down for longer than
  ``unreachable_timeout``, so a dead broker is an exception, not silence.
- **Bounded queue.**  At most ``queue_size`` messages wait for the network (ZeroMQ's SNDHWM,
  plus the socket buffers); a full queue raises ``PublishError`` instead of blocking.

There is no ``broadcast_from``: its ``origin`` names one client connection on one edge
(``edge_id/conn_id``), which only the worker holding that client's channel knows.  Code
outside a worker has no such connection to exclude; it broadcasts to everyone.

``AsyncPublisher`` is the same for asyncio applications (methods are coroutines; nothing in
it blocks the event loop except ``close``'s flush, which runs in a thread).
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from typing import Any, TypeAlias

import orjson
import zmq
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from zchannels.bus import broadcasts, curve, history, wire

__all__ = ["Publisher", "AsyncPublisher", "PublishError", "Payload", "DEFAULT_BUS", "SETTLE"]

#: What a broadcast carries: a JSON object (a dict with str keys), or bytes sent as a binary
#: frame; ``workers.BroadcastPayload`` for handlers.
Payload: TypeAlias = dict[str, Any] | bytes | bytearray | memoryview
#: A key file's path (``curve_server_key=``, ``curve_secret=``).
KeyPath: TypeAlias = str | os.PathLike[str]

DEFAULT_BUS = "tcp://127.0.0.1:5570"
SETTLE = 0.25   # seconds after connecting for the broker's subscription list to arrive
_EVENTS = (zmq.EVENT_CONNECT_DELAYED | zmq.EVENT_CONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class PublishError(RuntimeError):
    """The bus cannot take the message: unreachable for too long, queue full, or closed."""


def encode(topic: str, event: str, payload: Payload) -> bytes:
    """One packed BROADCAST message; TypeError / ValueError for what no edge could deliver
    (bus/broadcasts.py: the checks every publisher shares, system topics refused)."""
    data, fmt = broadcasts.encode(topic, event, payload, outside=True)
    return wire.pack_broadcast(wire.broadcast_frames(topic, event, data, fmt))


class _Link:
    """The publish-in connection's state, fed with socket monitor events (no I/O here)."""

    def __init__(self, bus: str, endpoint: str, unreachable_timeout: float):
        self.bus = bus
        self.endpoint = endpoint
        self.timeout = unreachable_timeout
        self.connected = False
        self.since = time.monotonic()      # when `connected` last changed
        self.problem = "no connection made yet"
        self._last = 0   # the previous event

    # A connection counts once its ZMTP handshake succeeded (EVENT_CONNECTED is TCP only):
    # a CURVE broker that refuses this key accepts the TCP connection, then closes it.
    def on_event(self, event: int, now: float) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.connected, self.since = True, now
        elif event == zmq.EVENT_DISCONNECTED:
            if self.connected:
                self.connected, self.since = False, now
                self.problem = "connection lost, reconnecting"
            else:   # TCP connected, closed before the handshake was through
                self.problem = self._refused()
        elif event & _FAILED:
            self.problem = self._refused()
        elif event == zmq.EVENT_CONNECT_RETRIED and self._last == zmq.EVENT_CONNECT_DELAYED:
            self.problem = "connection attempts fail, retrying"   # TCP connect itself failed
        self._last = event

    @staticmethod
    def _refused() -> str:
        return ("handshake refused: the broker closes the connection; with CURVE on the bus, "
                "check that curve_server_key is the broker's broker.key and that this key is "
                "in its --curve-clients")

    def ready(self, now: float) -> bool:
        return self.connected and now - self.since >= SETTLE

    def unreachable(self) -> str:
        return (f"bus {self.bus} unreachable for more than {self.timeout:g} s "
                f"(publish-in {self.endpoint}: {self.problem})")

    def check(self, now: float) -> bool:
        """True when connected; False within the grace period; PublishError after it."""
        if self.connected:
            return True
        if now - self.since > self.timeout:
            raise PublishError(self.unreachable())
        return False


class _Base:
    def __init__(self, bus: str, queue_size: int, unreachable_timeout: float,
                 curve_server_key: KeyPath | None, curve_secret: KeyPath | None):
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        if unreachable_timeout < 0:
            raise ValueError(f"unreachable_timeout must be >= 0, got {unreachable_timeout}")
        endpoint = wire.bus_endpoints(bus)[1]
        keys = curve.load_client_keys(None if curve_server_key is None else os.fspath(curve_server_key),
                                      None if curve_secret is None else os.fspath(curve_secret),
                                      ("curve_server_key", "curve_secret"))
        self.bus = bus
        self.queue_size = queue_size
        self._link = _Link(bus, endpoint, unreachable_timeout)
        self._closed = False
        # Own context: close() can then flush queued messages (term waits up to the linger).
        self._ctx = zmq.Context(io_threads=1)
        sock = self._ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, queue_size)
        # A PUB drops silently at the HWM; with NODROP the send fails with EAGAIN instead,
        # which is the "queue full" error this client promises.
        sock.setsockopt(zmq.XPUB_NODROP, 1)
        curve.secure_client(sock, keys)   # no keys: an edge's or worker's installed ones, if any
        self._monitor = sock.get_monitor_socket(_EVENTS, addr=f"inproc://zchannels-publisher-{id(self):x}")
        sock.connect(endpoint)
        self._sock = sock
        # The broker's history rule table (docs/recovery.md), published once a second: until
        # it is known every broadcast goes through the broker's sequencer.
        self._rules = history.RuleTable()
        self._rules_seen = b""
        rules = self._ctx.socket(zmq.SUB)
        rules.setsockopt(zmq.LINGER, 0)
        rules.setsockopt(zmq.RCVHWM, 16)
        curve.secure_client(rules, keys)
        rules.setsockopt(zmq.SUBSCRIBE, wire.RULES_KEY)
        rules.connect(wire.bus_endpoints(bus)[2])
        self._rules_sock = rules

    def _refresh_rules(self) -> None:
        """Take the latest rule table announced, if one came since the last broadcast."""
        latest = None
        while True:
            try:
                latest = self._rules_sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        if latest is not None:
            try:
                packed = wire.parse_rules_announcement(latest)
                if packed != self._rules_seen:
                    self._rules.update(history.unpack_rules(packed))
                    self._rules_seen = packed
            except ValueError:   # BusFrameError included: keep the table known so far
                pass

    def _send(self, data: bytes, topic: str) -> bool:
        if self._closed:
            raise PublishError("publisher is closed")
        connected = self._link.check(time.monotonic())
        self._refresh_rules()
        if self._rules.needs_sequencer(topic):
            data = wire.SEQUENCER_PREFIX + data
        try:
            self._sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            raise PublishError(f"send queue full: {self.queue_size} message(s) are waiting for bus "
                               f"{self.bus}; the broker or the network is not keeping up") from None
        return connected

    @property
    def connected(self) -> bool:
        """Whether the connection to the broker's publish-in endpoint is up right now."""
        return self._link.connected

    def _close_sockets(self, linger: float) -> None:
        self._rules_sock.close(linger=0)
        self._sock.close(linger=max(0, int(linger * 1000)))
        self._ctx.term()   # returns once queued messages left or the linger passed


class Publisher(_Base):
    """Publish broadcasts to the bus from any thread of any Python process.

    ``bus`` is the broker's base endpoint, as in ``--bus`` (the publisher connects to PORT+1).
    ``curve_server_key`` / ``curve_secret`` are key files, as ``--curve-server-key`` /
    ``--curve-secret`` of edges and workers (the secret key's public half must be admitted by
    the broker's ``--curve-clients``).  Create it after any ``fork``; ``close`` it (or use
    ``with``) to flush what is queued.  Thread-safe.
    """

    def __init__(self, bus: str = DEFAULT_BUS, *, queue_size: int = 10_000,
                 unreachable_timeout: float = 5.0, curve_server_key: KeyPath | None = None,
                 curve_secret: KeyPath | None = None):
        super().__init__(bus, queue_size, unreachable_timeout, curve_server_key, curve_secret)
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="zchannels-publisher-monitor",
                                        daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        mon = self._monitor
        try:
            while not self._stop.is_set():
                if not mon.poll(100):
                    continue
                event = recv_monitor_message(mon)["event"]
                if event == zmq.EVENT_MONITOR_STOPPED:
                    return
                with self._cond:
                    self._link.on_event(event, time.monotonic())
                    self._cond.notify_all()
        except zmq.ZMQError:
            pass   # closing
        finally:
            mon.close(linger=0)

    def broadcast(self, topic: str, event: str, payload: Payload) -> bool:
        """Send ``event`` with ``payload`` (dict -> JSON, bytes -> binary) to every subscriber
        of ``topic`` on every edge.

        Returns True when handed to a connected bus, False when the bus has been unreachable
        for less than ``unreachable_timeout`` (the message is then most likely lost).  Raises
        ``PublishError`` when it has been unreachable for longer, when the send queue is full
        or after ``close``; TypeError / ValueError for a bad topic, event or payload.
        """
        data = encode(topic, event, payload)
        with self._lock:
            return self._send(data, topic)

    def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until connected and ``SETTLE`` s have passed for the subscriptions to arrive;
        False if that did not happen within ``timeout`` seconds (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                if self._link.ready(now):
                    return True
                if self._closed or (deadline is not None and now >= deadline):
                    return False
                wake = self._link.since + SETTLE if self._link.connected else now + 0.1
                if deadline is not None:
                    wake = min(wake, deadline)
                self._cond.wait(max(0.001, wake - now))

    def unreachable_message(self) -> str:
        """The text of the unreachable error, e.g. for a command-line tool's message."""
        return self._link.unreachable()

    def close(self, linger: float = 1.0) -> None:
        """Close the connection, first waiting up to ``linger`` s for queued messages to leave."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._thread.join(2)
        with self._cond:
            self._cond.notify_all()
        self._close_sockets(linger)

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncPublisher(_Base):
    """``Publisher`` for asyncio: create it inside a running event loop, ``await`` its methods.

    The socket monitor is read by the loop itself (its descriptor is watched with
    ``add_reader``); sends never wait, since a full queue is an error.  Use it from the loop's
    thread only.
    """

    def __init__(self, bus: str = DEFAULT_BUS, *, queue_size: int = 10_000,
                 unreachable_timeout: float = 5.0, curve_server_key: KeyPath | None = None,
                 curve_secret: KeyPath | None = None):
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("AsyncPublisher must be created inside a running asyncio event loop "
                               "(use Publisher elsewhere)") from None
        super().__init__(bus, queue_size, unreachable_timeout, curve_server_key, curve_secret)
        self._changed = asyncio.Event()
        self._fd = self._monitor.fileno()   # its zmq.FD
        self._loop.add_reader(self._fd, self._drain)
        self._loop.call_soon(self._drain)   # the descriptor is edge-triggered: look once now

    def _drain(self) -> None:
        while not self._closed:
            try:
                frames = self._monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            self._link.on_event(parse_monitor_message(frames)["event"], time.monotonic())
            self._changed.set()

    async def broadcast(self, topic: str, event: str, payload: Payload) -> bool:
        """As ``Publisher.broadcast``; never waits."""
        return self._send(encode(topic, event, payload), topic)

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """As ``Publisher.wait_connected``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if self._link.ready(now):
                return True
            if self._closed or (deadline is not None and now >= deadline):
                return False
            wake = self._link.since + SETTLE if self._link.connected else now + 0.1
            if deadline is not None:
                wake = min(wake, deadline)
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.001, wake - now))
            except asyncio.TimeoutError:
                pass

    def unreachable_message(self) -> str:
        return self._link.unreachable()

    async def close(self, linger: float = 1.0) -> None:
        """Close, first waiting up to ``linger`` s (in a thread) for queued messages to leave."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        self._monitor.close(linger=0)
        await self._loop.run_in_executor(None, self._close_sockets, linger)

    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- `zchannels publish` ------------------------------------------------------------------

def cli(args: Any) -> int:
    """`zchannels publish TOPIC EVENT JSON`: one broadcast; exit 1 when the bus is unreachable."""
    prog = "zchannels publish"
    try:
        payload = orjson.loads(args.json)
    except orjson.JSONDecodeError as exc:
        print(f"{prog}: error: JSON is not valid JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(payload, dict):
        print(f"{prog}: error: JSON must be an object ({{...}}), got {type(payload).__name__}",
              file=sys.stderr)
        return 2
    try:
        encode(args.topic, args.event, payload)
    except (TypeError, ValueError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        pub = Publisher(args.bus, unreachable_timeout=args.timeout,
                        curve_server_key=args.curve_server_key, curve_secret=args.curve_secret)
    except ValueError as exc:   # a malformed --bus or --timeout (key files were checked already)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        if not pub.wait_connected(args.timeout):
            print(f"{prog}: error: {pub.unreachable_message()}", file=sys.stderr)
            return 1
        pub.broadcast(args.topic, args.event, payload)
    except PublishError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        pub.close(linger=args.timeout)
    print(f"published {args.event!r} to {args.topic!r} on {args.bus}")
    return 0
