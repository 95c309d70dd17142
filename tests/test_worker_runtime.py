"""One real worker process (workers/runner.py) against a fake broker made of real zmq sockets.

The test plays the broker and an edge: a ROUTER on port P (the worker's DEALER connects),
a SUB on P+1 capturing what the worker's PUB sends (broadcasts, and the messages for the
edge's inbox), and an XPUB on P+2 feeding broadcasts to the worker's SUB (its subscription
messages tell us when it listens).  Messages go in as
the broker delivers them (a wire constructor given the sending edge as its peer), and what
comes back is compared with the constructors' frames or read through ``wire.parse``.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zmq

from zchannels.bus import wire
from tests.conftest import wait_until
from zchannels.workers.presence import PRESENCE_KEY

ROOT = Path(__file__).resolve().parent.parent
APP = str(ROOT / "tests" / "apps" / "e2e_app.py")
EDGE = b"E-test-edge"
TIMEOUT = 5.0


class FakeBroker:
    """The broker's three sockets on consecutive loopback ports, plus one worker subprocess."""

    def __init__(self, tmp: Path, app: str = APP):
        self.ctx = zmq.Context()
        self.router, self.capture, self.feed, port = self._bind()
        self.bus = f"tcp://127.0.0.1:{port}"
        self.stderr_path = tmp / f"worker-{port}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zchannels.workers.runner", app, "--bus", self.bus, "--log-level", "debug"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "wb"))
        self.worker_id: bytes | None = None
        self.loads: list[int] = []
        self.instance = b""   # the broker instance our heartbeat replies name
        self.inbox: list[list[bytes]] = []        # the worker's messages for edges, not read yet
        self.broadcasts: list[bytes] = []         # its broadcasts, not read yet
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.capture, zmq.POLLIN)

    def _bind(self):
        for _ in range(50):
            router = self.ctx.socket(zmq.ROUTER)
            port = router.bind_to_random_port("tcp://127.0.0.1", min_port=20000, max_port=60000)
            capture, feed = self.ctx.socket(zmq.SUB), self.ctx.socket(zmq.XPUB)
            try:
                capture.bind(f"tcp://127.0.0.1:{port + 1}")
                feed.bind(f"tcp://127.0.0.1:{port + 2}")
            except zmq.ZMQError:
                for s in (router, capture, feed):
                    s.close(linger=0)
                continue
            capture.setsockopt(zmq.SUBSCRIBE, b"")
            return router, capture, feed, port
        raise RuntimeError("no three consecutive free ports")

    # --- the worker's point-to-point messages ---

    def _read(self) -> list[bytes]:
        """One message from the worker, heartbeats answered and counted."""
        wid, packed = self.router.recv_multipart()
        self.worker_id = wid
        frames = wire.unpack(packed)
        if frames[0] == wire.HEARTBEAT:   # wire.heartbeat(role, load)
            self.loads.append(int(frames[2]))
            self.router.send_multipart([wid, wire.pack(wire.broker_heartbeat(self.instance))])
        return frames

    def _capture(self) -> None:
        """What the worker's PUB sent: messages for edges and broadcasts wait in their lists."""
        data = self.capture.recv()
        if data.startswith(wire.SEQUENCER_PREFIX):   # a broadcast on a history topic
            data = data[len(wire.SEQUENCER_PREFIX):]
        if not wire.is_inbox(data):
            self.broadcasts.append(data)
            return
        dest = data[len(wire.INBOX_PREFIX):data.index(wire.TOPIC_TERMINATOR)]
        for frames in wire.unpack_inbox(data):   # as sent: [kind, dest, *fields], like the ROUTER's
            self.inbox.append([frames[0], dest, *frames[2:]])

    def _pump(self, timeout_ms: int) -> list[bytes] | None:
        """Wait up to timeout_ms for one socket event and handle it; a ROUTER message (its
        heartbeat answered) is returned, captured ones are queued."""
        events = dict(self.poller.poll(timeout_ms))
        if self.capture in events:
            self._capture()
        if self.router in events:
            return self._read()
        return None

    def recv(self, timeout: float = TIMEOUT) -> list[bytes]:
        """The next non-heartbeat message from the worker (through the broker's ROUTER or
        for the edge's inbox)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.inbox:
                return self.inbox.pop(0)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no frame from the worker within {timeout} s\n{self.stderr()}")
            frames = self._pump(int(left * 1000))
            if frames is not None and frames[0] != wire.HEARTBEAT:
                return frames

    def recv_as(self, kind: bytes, timeout: float = TIMEOUT):
        """The next non-heartbeat message, which must be of `kind`, parsed (wire.parse)."""
        frames = self.recv(timeout)
        assert frames[0] == kind, f"expected a {kind!r} message, got {frames}"
        return wire.parse(frames)

    def expect(self, frames: list[bytes], timeout: float = TIMEOUT) -> None:
        got = self.recv(timeout)
        assert got == frames, f"expected {frames}\n     got {got}"

    def nothing_pending(self) -> list[list[bytes]]:
        """Messages already waiting, heartbeats left out."""
        frames = []
        while self.poller.poll(0):
            f = self._pump(0)
            if f is not None and f[0] != wire.HEARTBEAT:
                frames.append(f)
        frames += self.inbox
        self.inbox = []
        return frames

    def send(self, frames: list[bytes]) -> None:
        """Deliver a message (a wire constructor's frames, its peer the sender) to the worker."""
        self.router.send_multipart([self.worker_id, wire.pack(frames)])

    def next_load(self) -> int:
        """The channel count of the next heartbeat."""
        self.loads.clear()
        deadline = time.monotonic() + TIMEOUT
        while not self.loads and time.monotonic() < deadline:
            frames = self._pump(50)
            if frames is not None:
                assert frames[0] == wire.HEARTBEAT, f"unexpected {frames}"
        assert self.loads, "no heartbeat"
        return self.loads[-1]

    # --- edge-like helpers ---

    def join(self, conn: bytes, topic: str, join_ref: bytes = b"1", payload: dict | None = None,
             assigns: dict | None = None, edge: bytes = EDGE) -> wire.JoinReply:
        self.send(wire.join(edge, conn, topic.encode(), join_ref, join_ref,
                            orjson.dumps({"assigns": assigns or {}, "id": None}), orjson.dumps(payload or {})))
        return self.recv_as(wire.JOIN_REPLY)

    def join_ok(self, conn: bytes, topic: str, join_ref: bytes = b"1", **kw) -> None:
        assert_joined(self.join(conn, topic, join_ref, **kw), kw.get("edge", EDGE), conn, topic, join_ref)

    def push(self, conn: bytes, topic: str, event: str, payload=None, ref: bytes = b"2",
             join_ref: bytes = b"1", edge: bytes = EDGE) -> None:
        if isinstance(payload, bytes):
            data, fmt = payload, wire.BINARY
        else:
            data, fmt = orjson.dumps({} if payload is None else payload), wire.JSON
        self.send(wire.inbound(edge, conn, topic.encode(), join_ref, ref, event.encode(), data, fmt))

    def expect_reply(self, conn: bytes, topic: str, ref: bytes, status: bytes, response,
                     join_ref: bytes = b"1", fmt: bytes = wire.JSON) -> None:
        data = response if fmt == wire.BINARY else orjson.dumps(response)
        self.expect(wire.reply(EDGE, conn, topic.encode(), join_ref, ref, status, data, fmt))

    # --- broadcasts ---

    def broadcast(self, timeout: float = TIMEOUT) -> wire.Broadcast:
        """The worker's next broadcast, skipping its once-a-second status snapshots and
        presence replication (workers/presence.py)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.broadcasts:
                msg = wire.parse_broadcast(wire.unpack_broadcast(self.broadcasts.pop(0)))
                if msg.key not in (wire.topic_key(wire.STATUS_TOPIC), PRESENCE_KEY):
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._pump(int(left * 1000))
        raise AssertionError(f"no broadcast from the worker within {timeout} s\n{self.stderr()}")

    def publish(self, frames: list[bytes]) -> None:
        """Feed a broadcast to the worker's SUB, as the broker's XPUB would."""
        self.feed.send(wire.pack_broadcast(frames))

    def subscription(self, timeout: float = TIMEOUT) -> bytes:
        """The worker's next (un)subscription, skipping its standing presence subscription."""
        while True:
            if not self.feed.poll(int(timeout * 1000)):
                raise AssertionError(f"no (un)subscription from the worker within {timeout} s")
            sub = self.feed.recv()
            if sub not in (b"\x01" + PRESENCE_KEY, b"\x01" + wire.inbox_key(self.worker_id or b"?")):
                return sub

    # --- lifecycle ---

    def start(self) -> str:
        """Answer heartbeats until the worker prints its READY line; return that line."""
        deadline = time.monotonic() + 10
        line = b""
        while not line.endswith(b"\n"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"worker not ready (exit code {self.proc.poll()})\n{self.stderr()}")
            self._pump(20)
            if select.select([self.proc.stdout], [], [], 0)[0]:
                line += os.read(self.proc.stdout.fileno(), 1000)
        return line.decode()

    def probe_broadcasts(self, conn: bytes, topic: str, event: str, payload: dict, replies: bool) -> None:
        """PUB/SUB slow joiner: push a broadcasting event until one reaches our SUB, then drain."""
        for i in range(200):
            self.push(conn, topic, event, payload, ref=str(i).encode())
            if replies:
                self.expect_reply(conn, topic, str(i).encode(), b"ok", {})
            self._pump(50)
            if self.broadcasts:
                break
        while self.poller.poll(200):
            self._pump(0)
        self.broadcasts.clear()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for s in (self.router, self.capture, self.feed):
            s.close(linger=0)
        self.ctx.term()


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    fake = FakeBroker(tmp_path_factory.mktemp("worker"))
    fake.ready_line = fake.start()
    fake.join_ok(b"probe", "echo:probe")
    fake.probe_broadcasts(b"probe", "echo:probe", "bcast", {}, replies=True)
    yield fake
    fake.stop()


@pytest.fixture
def bus(worker):
    assert worker.proc.poll() is None, worker.stderr()
    leftovers = worker.nothing_pending()
    assert not leftovers, leftovers
    return worker


def assert_joined(reply: wire.JoinReply, edge: bytes, conn: bytes, topic: str, join_ref: bytes) -> None:
    assert (reply.peer, reply.conn_id, reply.topic, reply.join_ref, reply.ref, reply.status) == \
        (edge, conn, topic.encode(), join_ref, join_ref, b"ok"), reply


def answer(reply: wire.JoinReply) -> tuple[bytes, bytes, bytes]:
    return reply.status, reply.response, reply.intercept


def terminations(fake: FakeBroker) -> dict:
    msg = fake.broadcast()
    assert msg.event == b"terminated", msg
    return {"topic": wire.topic_from_key(msg.key), **orjson.loads(msg.payload)}


# --- process ----------------------------------------------------------------------------

def test_ready_line_names_slot_pid_and_routing_id(bus):
    fields = dict(f.split("=", 1) for f in bus.ready_line.split()[1:])
    assert bus.ready_line.startswith("READY ")
    assert fields == {"worker": "0", "pid": str(bus.proc.pid), "id": bus.worker_id.decode()}
    assert bus.worker_id.startswith(wire.ROLE_WORKER + b"w0-")
    assert "worker ready" in bus.stderr()


def test_heartbeat_reports_the_number_of_channels(bus):
    before = bus.next_load()
    bus.join_ok(b"hb", "echo:hb")
    deadline = time.monotonic() + TIMEOUT
    while bus.next_load() != before + 1:
        assert time.monotonic() < deadline, bus.loads


# --- connect ----------------------------------------------------------------------------

def connect(fake: FakeBroker, conn: bytes, params: dict) -> tuple[bytes, dict]:
    fake.send(wire.connect(EDGE, conn, orjson.dumps({"params": params, "connect_info": {}})))
    reply = fake.recv_as(wire.CONNECT_REPLY)
    assert (reply.peer, reply.request_id) == (EDGE, conn), reply
    return reply.status, orjson.loads(reply.body)


def test_connect_accepts_with_assigns_and_socket_id(bus):
    assert connect(bus, b"c-ok", {"user": "ann", "socket_id": "u:1"}) == \
        (b"ok", {"assigns": {"user": "ann", "socket_id": "u:1"}, "id": "u:1"})
    assert connect(bus, b"c-ok2", {}) == (b"ok", {"assigns": {"user": None}, "id": None})


def test_connect_refusal_and_crash_become_error_replies(bus):
    assert connect(bus, b"c-rej", {"reject": True}) == (b"error", {"reason": "rejected"})
    assert connect(bus, b"c-crash", {"crash": True}) == (b"error", {"reason": "connect crashed"})
    assert "connect crashed" in bus.stderr()


# --- join -------------------------------------------------------------------------------

def test_join_ok_replies_with_the_join_response_and_intercepts(bus):
    assert bus.join(b"j1", "echo:a", b"7") == wire.JoinReply(
        EDGE, b"j1", b"echo:a", b"7", b"7", b"ok", b'{"joined":"echo:a"}', b"[]")
    assert answer(bus.join(b"j1", "intercept:a", b"8")) == (b"ok", b'{"joined":"intercept:a"}', b'["filtered"]')
    assert bus.subscription() == b"\x01" + wire.topic_key("intercept:a")


def test_join_error_crash_and_unmatched_topic(bus):
    assert answer(bus.join(b"j2", "private:x")) == (b"error", b'{"reason":"unauthorized"}', b"[]")
    assert answer(bus.join(b"j2", "crashjoin:x")) == (b"error", b'{"reason":"join crashed"}', b"[]")
    assert answer(bus.join(b"j2", "nowhere:x")) == (b"error", b'{"reason":"unmatched topic"}', b"[]")
    assert "join raised on purpose" in bus.stderr()


def test_push_inside_join_crashes_the_join(bus):
    assert bus.join(b"j3", "echo:early", payload={"push_in_join": True}).status == b"error"
    assert "before the join of 'echo:early' completed" in bus.stderr()


def test_route_error_join_terminates_with_shutdown_and_is_gone(bus):
    bus.join_ok(b"j4", "echo:gone")
    assert bus.join(b"j4", "private:gone").status == b"error"
    bus.push(b"j4", "private:gone", "ping", {"a": 1}, ref=b"3")   # no such channel: dropped
    bus.push(b"j4", "echo:gone", "ping", {"a": 2}, ref=b"4")
    bus.expect_reply(b"j4", "echo:gone", b"4", b"ok", {"a": 2})


# --- handle_in --------------------------------------------------------------------------

def test_handle_in_reply_shapes(bus):
    c, t = b"in1", "echo:in"
    bus.join_ok(c, t)
    bus.push(c, t, "ping", {"q": [1, "x"]}, ref=b"10")
    bus.expect_reply(c, t, b"10", b"ok", {"q": [1, "x"]})
    bus.push(c, t, "error", ref=b"11")
    bus.expect_reply(c, t, b"11", b"error", {})
    bus.push(c, t, "custom", {"z": 1}, ref=b"12")
    bus.expect_reply(c, t, b"12", b"custom", {"z": 1})
    bus.push(c, t, "noreply", ref=b"13")
    bus.push(c, t, "ping", ref=b"14")
    bus.expect_reply(c, t, b"14", b"ok", {})


def test_binary_payload_in_and_binary_reply_out(bus):
    c, t = b"bin", "echo:bin"
    bus.join_ok(c, t)
    bus.push(c, t, "binary", b"\x00\x01abc", ref=b"5")
    bus.expect_reply(c, t, b"5", b"ok", b"cba\x01\x00", fmt=wire.BINARY)
    bus.push(c, t, "binary", {"not": "binary"}, ref=b"6")
    bus.expect_reply(c, t, b"6", b"error", {"reason": "expected a binary payload"})


def test_stale_or_unknown_join_ref_is_dropped_and_null_join_ref_passes(bus):
    c, t = b"stale", "echo:stale"
    bus.join_ok(c, t, b"3")
    bus.push(c, t, "ping", {"n": 1}, ref=b"4", join_ref=b"2")
    bus.push(c, t, "ping", {"n": 2}, ref=b"5", join_ref=b"")
    bus.expect_reply(c, t, b"5", b"ok", {"n": 2}, join_ref=b"3")


def test_stop_with_reply_sends_the_reply_then_close(bus):
    c, t = b"stop1", "echo:stop1"
    bus.join_ok(c, t)
    bus.push(c, t, "stop_reply", ref=b"9")
    bus.expect_reply(c, t, b"9", b"ok", {"bye": True})
    bus.expect(wire.channel_close(EDGE, c, t.encode(), b"1"))


def test_stop_normal_closes_and_stop_other_reason_errors(bus):
    bus.join_ok(b"stop2", "echo:n")
    bus.push(b"stop2", "echo:n", "stop_normal")
    bus.expect(wire.channel_close(EDGE, b"stop2", b"echo:n", b"1"))
    bus.join_ok(b"stop2", "echo:c")
    bus.push(b"stop2", "echo:c", "stop_crash")
    bus.expect(wire.channel_error(EDGE, b"stop2", b"echo:c", b"1"))


def test_stop_runs_terminate_with_the_reason(bus):
    bus.join_ok(b"stop3", "terminate:s")
    bus.push(b"stop3", "terminate:s", "stop_crash")
    bus.expect(wire.channel_error(EDGE, b"stop3", b"terminate:s", b"1"))
    assert terminations(bus) == {"topic": "terminations:terminate:s", "reason": "boom"}


def test_raise_in_handle_in_is_a_channel_error_and_the_worker_lives_on(bus):
    c, t = b"raise", "terminate:raise"
    bus.join_ok(c, t)
    bus.push(c, t, "raise", ref=b"2")
    bus.expect(wire.channel_error(EDGE, c, t.encode(), b"1"))
    bus.push(c, t, "ping", ref=b"3")          # the channel is gone: dropped
    bus.join_ok(c, t, b"4")                   # phoenix.js rejoins
    bus.push(c, t, "ping", {"again": 1}, ref=b"5", join_ref=b"4")
    bus.expect_reply(c, t, b"5", b"ok", {"again": 1}, join_ref=b"4")
    bus.send(wire.leave(EDGE, c, t.encode(), b"4", b"6"))
    bus.expect_reply(c, t, b"6", b"ok", {}, join_ref=b"4")
    bus.expect(wire.channel_close(EDGE, c, t.encode(), b"4"))
    # terminate ran for the leave only, not for the raise
    assert terminations(bus)["reason"] == "('shutdown', 'left')"
    assert "raised on purpose by the e2e app" in bus.stderr()


def test_bad_return_value_crashes_with_a_log_line_naming_callback_shapes_and_value(bus):
    c, t = b"badret", "echo:badret"
    bus.join_ok(c, t)
    bus.push(c, t, "bad_return")
    bus.expect(wire.channel_error(EDGE, c, t.encode(), b"1"))
    assert ("EchoChannel.handle_in returned 42 (int); valid returns: reply(status, response=None), "
            "noreply(), stop(reason, reply=None)") in bus.stderr()


# --- push, broadcast, timers ------------------------------------------------------------

def test_push_and_send_after_push_carry_the_join_ref(bus):
    c, t = b"push", "echo:push"
    bus.join_ok(c, t, b"12")
    bus.push(c, t, "push", {"p": 1}, join_ref=b"12")
    bus.expect(wire.push(EDGE, c, t.encode(), b"12", b"pushed", b'{"p":1}', wire.JSON))
    bus.push(c, t, "push_after", {"later": True}, join_ref=b"12")
    bus.expect(wire.push(EDGE, c, t.encode(), b"12", b"push_after", b'{"later":true}', wire.JSON))


def test_broadcast_and_broadcast_from_publish_with_origin(bus):
    c, t = b"bc", "echo:bc"
    bus.join_ok(c, t)
    bus.push(c, t, "bcast", {"b": 1}, ref=b"2")
    bus.expect_reply(c, t, b"2", b"ok", {})
    assert bus.broadcast() == wire.Broadcast(wire.topic_key(t), b"bcast", b"", b'{"b":1}', wire.JSON)
    bus.push(c, t, "bcast_from", {"b": 2}, ref=b"3")
    bus.expect_reply(c, t, b"3", b"ok", {})
    assert bus.broadcast() == wire.Broadcast(wire.topic_key(t), b"bcast", wire.origin_of(EDGE, c),
                                             b'{"b":2}', wire.JSON)


@pytest.mark.parametrize("topic, event, error", [
    ("echo:nul\x00x", "disconnect",
     "ValueError: broadcast topic must not contain NUL (it ends topic keys), got 'echo:nul\\x00x'"),
    ("echo:nul", "dis\x00connect", "ValueError: broadcast event must not contain NUL, got 'dis\\x00connect'"),
])
def test_broadcast_with_a_nul_crashes_the_handler_with_a_clear_error(bus, topic, event, error):
    # A NUL ends topic keys on the bus: published, "echo:nul\0x" would reach "echo:nul".
    c, t = b"nul", "echo:nulcaller"
    bus.join_ok(c, t)
    bus.push(c, t, "kick", {"topic": topic, "event": event})
    bus.expect(wire.channel_error(EDGE, c, t.encode(), b"1"))
    wait_until(lambda: error in bus.stderr(), TIMEOUT, message=f"no {error!r} in the worker's log")
    bus.join_ok(c, t, b"3")                   # the worker lives on
    bus.push(c, t, "ping", {"n": 1}, ref=b"4", join_ref=b"3")
    bus.expect_reply(c, t, b"4", b"ok", {"n": 1}, join_ref=b"3")
    bus.send(wire.leave(EDGE, c, t.encode(), b"3", b"5"))
    bus.expect_reply(c, t, b"5", b"ok", {}, join_ref=b"3")
    bus.expect(wire.channel_close(EDGE, c, t.encode(), b"3"))


# --- intercepts ---------------------------------------------------------------------------

def test_intercepted_broadcasts_run_handle_out_per_channel(bus):
    t = "intercept:room"
    key = wire.topic_key(t)
    bus.join_ok(b"ia", t, assigns={"user": "ann"})
    assert bus.subscription() == b"\x01" + key
    bus.join_ok(b"ib", t, assigns={"user": "bob"})
    # not intercepted: the edge's fast lane delivers it, the worker ignores it
    bus.publish(wire.broadcast_frames(t, "plain", b'{"x":0}'))
    bus.publish(wire.broadcast_frames(t, "filtered", b'{"x":1}'))
    got = sorted([bus.recv(), bus.recv()])
    assert got == [wire.push(EDGE, conn, t.encode(), b"1", b"filtered", data, wire.JSON)
                   for conn, data in [(b"ia", b'{"x":1,"seen_by":"ann"}'), (b"ib", b'{"x":1,"seen_by":"bob"}')]]
    # handle_out may filter; broadcast_from skips its origin
    bus.publish(wire.broadcast_frames(t, "filtered", b'{"drop":true}'))
    bus.publish(wire.broadcast_frames(t, "filtered", b'{"x":2}', origin=wire.origin_of(EDGE, b"ia")))
    bus.expect(wire.push(EDGE, b"ib", t.encode(), b"1", b"filtered", b'{"x":2,"seen_by":"bob"}', wire.JSON))
    # the last intercepting channel leaving unsubscribes the topic
    for ref, conn in [(b"5", b"ia"), (b"6", b"ib")]:
        bus.send(wire.leave(EDGE, conn, t.encode(), b"1", ref))
        bus.expect_reply(conn, t, ref, b"ok", {})
        bus.expect(wire.channel_close(EDGE, conn, t.encode(), b"1"))
    assert bus.subscription() == b"\x00" + key


def test_default_handle_out_pushes_unchanged_and_default_handle_info_only_logs(bus):
    c, t = b"df", "defaults:df"
    bus.join_ok(c, t)
    assert bus.subscription() == b"\x01" + wire.topic_key(t)
    bus.publish(wire.broadcast_frames(t, "filtered", b'{"x":1}'))
    bus.expect(wire.push(EDGE, c, t.encode(), b"1", b"filtered", b'{"x":1}', wire.JSON))
    bus.push(c, t, "info", "hello", ref=b"7")
    bus.expect_reply(c, t, b"7", b"ok", {})
    bus.push(c, t, "ping", ref=b"8")   # the channel lives on after the default handle_info
    bus.expect_reply(c, t, b"8", b"ok", {})
    assert "got a message but defines no handle_info: 'hello'" in bus.stderr()
    bus.send(wire.terminate(EDGE, c, t.encode(), b"1", b"closed"))
    assert bus.subscription() == b"\x00" + wire.topic_key(t)


# --- leave, terminate, edge down ----------------------------------------------------------

def test_leave_runs_terminate_then_replies_then_closes(bus):
    c, t = b"lv", "terminate:lv"
    bus.join_ok(c, t, b"3")
    bus.send(wire.leave(EDGE, c, t.encode(), b"3", b"4"))
    bus.expect_reply(c, t, b"4", b"ok", {}, join_ref=b"3")
    bus.expect(wire.channel_close(EDGE, c, t.encode(), b"3"))
    assert terminations(bus) == {"topic": "terminations:" + t, "reason": "('shutdown', 'left')"}


def test_leave_of_unknown_channel_replies_ok_and_stale_leave_is_ignored(bus):
    bus.send(wire.leave(EDGE, b"lv2", b"echo:never", b"9", b"10"))
    bus.expect(wire.reply(EDGE, b"lv2", b"echo:never", b"9", b"10", b"ok", b"{}", wire.JSON))
    bus.join_ok(b"lv2", "echo:stale", b"3")
    bus.send(wire.leave(EDGE, b"lv2", b"echo:stale", b"2", b"4"))      # an older instance: nothing
    bus.push(b"lv2", "echo:stale", "ping", ref=b"5", join_ref=b"3")
    bus.expect_reply(b"lv2", "echo:stale", b"5", b"ok", {}, join_ref=b"3")


def test_terminate_closed_runs_terminate_and_duplicate_join_does_not(bus):
    bus.join_ok(b"tm", "terminate:dup")
    bus.join_ok(b"tm", "terminate:closed")
    bus.send(wire.terminate(EDGE, b"tm", b"terminate:dup", b"1", b"duplicate_join"))
    bus.send(wire.terminate(EDGE, b"tm", b"terminate:closed", b"1", b"closed"))
    # the first terminate broadcast is the closed one: duplicate_join ran none
    assert terminations(bus) == {"topic": "terminations:terminate:closed", "reason": "('shutdown', 'closed')"}
    assert bus.nothing_pending() == []


def test_duplicate_join_replaces_the_old_instance_silently(bus):
    c, t = b"dup", "terminate:again"
    bus.join_ok(c, t, b"1")
    bus.join_ok(c, t, b"5")
    bus.push(c, t, "ping", {"old": 1}, ref=b"6", join_ref=b"1")   # old instance: gone
    bus.push(c, t, "stop_normal", ref=b"7", join_ref=b"5")
    bus.expect(wire.channel_close(EDGE, c, t.encode(), b"5"))
    assert terminations(bus)["reason"] == "normal"              # only the new one terminated


def test_duplicate_join_cancels_a_handler_still_running_in_the_old_instance(bus):
    c, t = b"dup2", "slow:again"
    bus.join_ok(c, t, b"1")
    bus.push(c, t, "sleep", {"s": 0.3}, ref=b"2", join_ref=b"1")
    bus.join_ok(c, t, b"3")
    bus.push(c, t, "sleep", {"s": 0.6}, ref=b"4", join_ref=b"3")
    # the old reply (due at 0.3 s) never comes; the new one (0.6 s) does
    bus.expect_reply(c, t, b"4", b"ok", {"s": 0.6}, join_ref=b"3")


def test_edge_down_terminates_that_edges_channels_only(bus):
    other = b"E-other-edge"
    bus.join_ok(b"ed1", "terminate:ed1", edge=other)
    bus.join_ok(b"ed2", "terminate:ed2")
    bus.send(wire.edge_down(other))
    assert terminations(bus) == {"topic": "terminations:terminate:ed1", "reason": "('shutdown', 'closed')"}
    bus.push(b"ed1", "terminate:ed1", "ping", ref=b"2", edge=other)   # gone
    bus.push(b"ed2", "terminate:ed2", "ping", ref=b"3")               # still there
    bus.expect_reply(b"ed2", "terminate:ed2", b"3", b"ok", {})


def test_a_new_broker_instance_makes_the_worker_list_its_channels_to_each_edge(bus):
    bus.join_ok(b"sy1", "echo:sy1", join_ref=b"4")
    bus.instance = b"first-broker"
    bus.next_load()
    bus.next_load()   # the worker has seen our reply naming it
    bus.instance = b"second-broker"
    bus.next_load()
    syncs: dict[bytes, set] = {}
    while EDGE not in syncs:   # one per edge that joined a channel here (earlier tests' too)
        sync = bus.recv_as(wire.SYNC, timeout=3)
        syncs[sync.peer] = sync.channels
    assert (b"sy1", b"echo:sy1", b"4") in syncs[EDGE]
    time.sleep(0.2)   # the SYNCs to the other edges left in the same turn
    assert all(f[0] == wire.SYNC for f in bus.nothing_pending())
    bus.send(wire.terminate(EDGE, b"sy1", b"echo:sy1", b"4", b"closed"))   # as the edge would answer
    bus.instance = b""


# --- mailbox ----------------------------------------------------------------------------

def test_messages_of_one_channel_are_handled_in_order(bus):
    c, t = b"ord", "slow:ord"
    bus.join_ok(c, t)
    bus.push(c, t, "sleep", {"s": 0.2}, ref=b"1000")
    for i in range(200):
        bus.push(c, t, "ping", {"i": i}, ref=str(i).encode())
    bus.expect_reply(c, t, b"1000", b"ok", {"s": 0.2})
    for i in range(200):
        bus.expect_reply(c, t, str(i).encode(), b"ok", {"i": i})


def test_a_slow_channel_does_not_block_other_channels(bus):
    bus.join_ok(b"slow", "slow:a")
    bus.join_ok(b"fast", "echo:fast")
    start = time.monotonic()
    bus.push(b"slow", "slow:a", "sleep", {"s": 1.5}, ref=b"2")
    bus.push(b"fast", "echo:fast", "ping", ref=b"3")
    bus.expect_reply(b"fast", "echo:fast", b"3", b"ok", {})
    assert time.monotonic() - start < 1.0
    bus.expect_reply(b"slow", "slow:a", b"2", b"ok", {"s": 1.5})


# --- robustness ---------------------------------------------------------------------------

def test_bad_bus_frames_are_logged_and_dropped(bus):
    bus.send([b"~", b"junk"])                                                       # no such kind
    bus.send(wire.inbound(EDGE, b"bad", b"echo:bad", b"1", b"2", b"ping", b"{}", wire.JSON)[:3])  # cut short
    bus.send(wire.join(EDGE, b"bad", b"echo:bad", b"1", b"1", b"not json", b"{}"))
    bus.send(wire.inbound(EDGE, b"bad", b"\xff\xfe", b"1", b"2", b"ping", b"{}", wire.JSON))
    bus.join_ok(b"bad", "intercept:bad")
    assert bus.subscription() == b"\x01" + wire.topic_key("intercept:bad")
    bus.publish(wire.broadcast_frames("intercept:bad", "filtered", b"{}")[:3])   # cut short
    bus.publish(wire.broadcast_frames("intercept:bad", "filtered", b"{not json"))
    bus.join_ok(b"bad", "echo:bad2")
    bus.push(b"bad", "echo:bad2", "ping", b"raw", ref=b"3")
    bus.expect_reply(b"bad", "echo:bad2", b"3", b"ok", b"raw", fmt=wire.BINARY)
    expected = ("unknown bus kind b'~'", "needs 9 frames, got 3", "malformed broadcast (3 frames)",
                "broadcast on b'intercept:bad\\x00'")
    # The SUB socket's broadcasts and the DEALER's frames are read by separate handlers: wait
    # for every line rather than assume the order.
    wait_until(lambda: all(line in bus.stderr_path.read_text(errors="replace") for line in expected),
               5, message=f"missing log lines: {bus.stderr()}")
    assert bus.proc.poll() is None


# --- separate workers ---------------------------------------------------------------------

def test_sigterm_says_bye_runs_terminate_and_exits_zero(tmp_path):
    fake = FakeBroker(tmp_path)
    try:
        fake.start()
        fake.join_ok(b"probe", "echo:probe")
        fake.probe_broadcasts(b"probe", "echo:probe", "bcast", {}, replies=True)
        fake.join_ok(b"sd", "terminate:sd")
        fake.proc.send_signal(signal.SIGTERM)
        fake.expect(wire.bye(wire.ROLE_WORKER))
        assert terminations(fake) == {"topic": "terminations:terminate:sd", "reason": "shutdown"}
        assert fake.proc.wait(5) == 0
    finally:
        fake.stop()


def test_app_that_cannot_load_exits_with_handler_load_error(tmp_path):
    from zchannels.workers.supervisor import HANDLER_LOAD_ERROR
    bad = tmp_path / "broken_app.py"
    bad.write_text("import no_such_module_for_zchannels\n")
    fake = FakeBroker(tmp_path, app=str(bad))
    try:
        assert fake.proc.wait(10) == HANDLER_LOAD_ERROR
        assert f"cannot load app '{bad}'" in fake.stderr()
        assert "no_such_module_for_zchannels" in fake.stderr()
    finally:
        fake.stop()


# --- the chat example ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    fake = FakeBroker(tmp_path_factory.mktemp("chat"), app=str(ROOT / "examples" / "chat" / "channels.py"))
    fake.start()
    fake.join_ok(b"probe", "room:lobby", assigns={"user": "probe"})
    fake.probe_broadcasts(b"probe", "room:lobby", "new_msg", {"body": "probe"}, replies=False)
    assert fake.subscription() == b"\x01" + wire.topic_key("room:lobby")
    yield fake
    fake.stop()


def test_chat_connect_defaults_user_to_anonymous(chat):
    assert connect(chat, b"cc", {}) == (b"ok", {"assigns": {"user": "anonymous"}, "id": None})
    assert connect(chat, b"cc", {"user": "ann"}) == (b"ok", {"assigns": {"user": "ann"}, "id": None})


def test_chat_lobby_is_open_and_other_rooms_are_private(chat):
    assert answer(chat.join(b"c1", "room:lobby", assigns={"user": "ann"})) == (b"ok", b"{}", b'["user_joined"]')
    assert answer(chat.join(b"c1", "room:secret")) == (b"error", b'{"reason":"unauthorized"}', b"[]")


def test_chat_announces_joins_from_handle_info_and_broadcasts_messages(chat):
    chat.join_ok(b"c2", "room:lobby", assigns={"user": "bob"}, payload={"announce": True})
    pushed = chat.recv_as(wire.PUSH)   # then tracked in presence, with the full state pushed to the client
    assert (pushed.peer, pushed.conn_id, pushed.topic, pushed.join_ref, pushed.event) == \
        (EDGE, b"c2", b"room:lobby", b"1", b"presence_state")
    assert list(orjson.loads(pushed.payload)) == ["bob"]
    assert chat.broadcast() == wire.Broadcast(wire.topic_key("room:lobby"), b"user_joined", b"",
                                              b'{"user":"bob"}', wire.JSON)
    diff = chat.broadcast()
    assert diff.event == b"presence_diff" and list(orjson.loads(diff.payload)["joins"]) == ["bob"]
    chat.push(b"c2", "room:lobby", "new_msg", {"body": "hi"})
    msg = chat.broadcast()
    assert (msg.event, msg.origin, msg.payload) == (b"new_msg", b"", b'{"body":"hi","user":"bob"}')
    chat.push(b"c2", "room:lobby", "ping", {"t": 1}, ref=b"9")
    chat.expect_reply(b"c2", "room:lobby", b"9", b"ok", {"t": 1})


def test_chat_handle_out_filters_ignored_users(chat):
    chat.join_ok(b"c3", "room:lobby", assigns={"user": "cid"}, payload={"ignore": ["eve"]})
    chat.publish(wire.broadcast_frames("room:lobby", "user_joined", b'{"user":"eve"}'))
    chat.publish(wire.broadcast_frames("room:lobby", "user_joined", b'{"user":"fay"}'))
    seen = []   # pushes to every lobby member, until c3's push of fay
    while (b"c3", b'{"user":"fay"}') not in seen:
        push = chat.recv_as(wire.PUSH)
        assert push.event == b"user_joined", push
        seen.append((push.conn_id, push.payload))
    # c3 handles eve's broadcast before fay's: had it pushed eve, that push would be in `seen`
    assert [data for conn, data in seen if conn == b"c3"] == [b'{"user":"fay"}']
    assert (b"probe", b'{"user":"eve"}') in seen


# --- less common callback shapes (a handler module written by the test) -------------------

QUIRKS_APP = '''
import asyncio
from zchannels.workers import Channel, Socket, error, noreply, ok, reply


class Quirk(Channel):
    async def join(self, topic, payload, socket):
        await asyncio.sleep(0.01)             # an async join that really waits
        socket.assign(joined_with=payload)
        self.send("hello")                    # the idiom for "push right after join"
        self.timer = self.send_after(100, "cancelled")
        return ok({"assigns": socket.assigns})

    def handle_info(self, msg, socket):
        if msg == "hello":
            self.timer.cancel()
            self.push("hello", {"from": "handle_info"})
        else:
            self.push("should_not_happen", {"msg": msg})
        return noreply()

    async def handle_in(self, event, payload, socket):
        if event == "wait":
            await asyncio.sleep(payload["s"])
            return reply("ok")
        if event == "socket":
            return reply("ok", {"ref": socket.ref, "join_ref": socket.join_ref, "topic": socket.topic,
                                "assigns": socket.assigns})
        if event == "bad_reply":
            return reply("ok", {"x": object()})
        if event == "bad_push":
            self.push("x", [1, 2])
        if event == "await_push":
            await self.push("awaited", {})
            await self.broadcast("awaited", {})
            return noreply()
        return reply("ok", payload)


socket = Socket()
socket.channel("q:*", Quirk, assigns={"route": {"nested": 1}})


@socket.connect
async def connect(params, socket, connect_info):
    mode = params.get("mode")
    if mode == "true":
        socket.assign(a=1)
        return True
    if mode in ("none", "false"):
        return None if mode == "none" else False
    if mode == "invalid":
        return 42
    if mode == "unserialisable":
        return socket.assign(x=object())
    if mode == "info":
        return socket.assign(info=connect_info)
    if mode == "badid":
        return socket.assign(sid=5)
    return socket.assign(sid=params.get("sid"))


@socket.id
def socket_id(socket):
    return socket.assigns.get("sid")
'''


@pytest.fixture(scope="module")
def quirks_worker(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quirks")
    (tmp / "quirks_app.py").write_text(QUIRKS_APP)
    fake = FakeBroker(tmp, app=str(tmp / "quirks_app.py"))
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def quirks(quirks_worker):
    assert quirks_worker.proc.poll() is None, quirks_worker.stderr()
    leftovers = quirks_worker.nothing_pending()
    assert not leftovers, leftovers
    return quirks_worker


def test_connect_return_values(quirks):
    assert connect(quirks, b"q", {"mode": "true"}) == (b"ok", {"assigns": {"a": 1}, "id": None})
    assert connect(quirks, b"q", {"mode": "none"}) == (b"error", {"reason": "refused"})
    assert connect(quirks, b"q", {"mode": "false"}) == (b"error", {"reason": "refused"})
    assert connect(quirks, b"q", {"mode": "invalid"}) == (b"error", {"reason": "connect returned an invalid value"})
    assert connect(quirks, b"q", {"mode": "unserialisable"}) == (b"error", {"reason": "assigns are not JSON-serialisable"})
    assert connect(quirks, b"q", {"mode": "badid"}) == (b"error", {"reason": "id returned an invalid value"})
    assert connect(quirks, b"q", {"sid": "users:7"}) == (b"ok", {"assigns": {"sid": "users:7"}, "id": "users:7"})
    request = {"params": {"mode": "info"}, "connect_info": {"peer": "1.2.3.4"}}
    quirks.send(wire.connect(EDGE, b"q", orjson.dumps(request)))
    reply = quirks.recv_as(wire.CONNECT_REPLY)
    assert (reply.status, reply.body) == (b"ok", b'{"assigns":{"info":{"peer":"1.2.3.4"}},"id":null}')
    log = quirks.stderr()
    assert "connect returned 42 (int) for edge" in log and "valid returns: the socket" in log and "not JSON-serialisable" in log


def test_async_join_merges_route_assigns_and_pushes_from_handle_info_after_the_reply(quirks):
    reply = quirks.join(b"j", "q:1", payload={"p": 1}, assigns={"user": "ann"})
    assert reply.status == b"ok"
    assert orjson.loads(reply.response) == {"assigns": {"user": "ann", "route": {"nested": 1}, "joined_with": {"p": 1}}}
    quirks.expect(wire.push(EDGE, b"j", b"q:1", b"1", b"hello", b'{"from":"handle_info"}', wire.JSON))
    # the cancelled send_after (due at 100 ms) never arrives: a wait past it, then two more messages
    quirks.push(b"j", "q:1", "wait", {"s": 0.2}, ref=b"2")
    quirks.expect_reply(b"j", "q:1", b"2", b"ok", {})
    quirks.push(b"j", "q:1", "echo", {"e": 1}, ref=b"3")
    quirks.expect_reply(b"j", "q:1", b"3", b"ok", {"e": 1})


def test_socket_fields_during_handle_in_and_assigns_copied_per_channel(quirks):
    for topic, payload in [("q:a", {"a": 1}), ("q:b", {"b": 2})]:
        quirks.join_ok(b"s", topic, b"7", payload=payload, assigns={"user": "bob"})
        assert quirks.recv_as(wire.PUSH).event == b"hello"
    quirks.push(b"s", "q:a", "socket", ref=b"8", join_ref=b"7")
    quirks.expect_reply(b"s", "q:a", b"8", b"ok", {"ref": "8", "join_ref": "7", "topic": "q:a", "assigns": {
        "user": "bob", "route": {"nested": 1}, "joined_with": {"a": 1}}}, join_ref=b"7")
    quirks.push(b"s", "q:b", "socket", ref=b"9", join_ref=b"7")
    assert orjson.loads(quirks.recv_as(wire.REPLY).response)["assigns"]["joined_with"] == {"b": 2}


def test_unserialisable_reply_and_non_object_push_crash_the_channel(quirks):
    for topic in ("q:reply", "q:push"):
        quirks.join_ok(b"x", topic)
        assert quirks.recv_as(wire.PUSH).event == b"hello"
    quirks.push(b"x", "q:reply", "bad_reply")
    quirks.expect(wire.channel_error(EDGE, b"x", b"q:reply", b"1"))
    quirks.push(b"x", "q:push", "bad_push")
    quirks.expect(wire.channel_error(EDGE, b"x", b"q:push", b"1"))
    assert "push payload must be a dict (JSON object) or bytes, got list" in quirks.stderr()


def test_push_and_broadcast_may_be_awaited(quirks):
    quirks.join_ok(b"aw", "q:aw")
    assert quirks.recv_as(wire.PUSH).event == b"hello"
    quirks.push(b"aw", "q:aw", "await_push")
    quirks.expect(wire.push(EDGE, b"aw", b"q:aw", b"1", b"awaited", b"{}", wire.JSON))


def test_duplicate_join_while_the_first_async_join_waits(quirks):
    for join_ref in (b"1", b"2"):   # back to back: the first join is killed before it resumes
        quirks.send(wire.join(EDGE, b"dj", b"q:dj", join_ref, join_ref, b'{"assigns":{},"id":null}', b"{}"))
    assert_joined(quirks.recv_as(wire.JOIN_REPLY), EDGE, b"dj", "q:dj", b"2")
    quirks.expect(wire.push(EDGE, b"dj", b"q:dj", b"2", b"hello", b'{"from":"handle_info"}', wire.JSON))
    quirks.push(b"dj", "q:dj", "echo", {"n": 1}, ref=b"3", join_ref=b"2")
    quirks.expect_reply(b"dj", "q:dj", b"3", b"ok", {"n": 1}, join_ref=b"2")
    assert "Task was destroyed" not in quirks.stderr() and "never awaited" not in quirks.stderr()


# --- the eager start of mailboxes (in-process) --------------------------------------------

def test_resumed_coroutine_finishes_in_its_task_and_cancels_where_it_waits():
    import asyncio
    from zchannels.workers.channels import _Resumed

    async def body(events, delay):
        try:
            await asyncio.sleep(delay)
            return "done"
        finally:
            events.append("finally")

    async def main():
        loop = asyncio.get_running_loop()
        finished, cancelled = [], []
        coro = body(finished, 0.01)
        done = loop.create_task(_Resumed(coro, coro.send(None)))
        coro = body(cancelled, 10)
        killed = loop.create_task(_Resumed(coro, coro.send(None)))
        killed.cancel()                      # before the task ever ran a step
        assert await done == "done"
        with pytest.raises(asyncio.CancelledError):
            await killed
        return finished, cancelled

    assert asyncio.run(asyncio.wait_for(main(), 5)) == (["finally"], ["finally"])
