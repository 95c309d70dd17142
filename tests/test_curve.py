"""The bus secured with CURVE keys: clients still work end to end, and a bus peer without a
valid key can neither publish, subscribe nor route.

One module cluster (broker + 1 edge + 1 worker, tests/apps/e2e_app.py) runs with keys made by
`zchannels keys`.  Intruders are in-process ZeroMQ sockets on loopback; each negative check has a
keyed control socket doing the same thing at the same time, so "nothing arrived" is measured
against something that did, and each intruder's own monitor shows its handshake being refused.
"""
from __future__ import annotations

import itertools
import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from zchannels.bus import curve, wire
from tests.conftest import ROOT, E2E_APP, LOG_LEVEL, Proc, wait_until
from tests.rawws import RawWS

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_monitor_ids = itertools.count()


def uid() -> str:
    return uuid.uuid4().hex[:10]


def zchannels(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchannels", *map(str, args)], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def broker_flags(keys: Path) -> list[str]:
    return ["--curve-secret", str(keys / "broker.key_secret"), "--curve-clients", str(keys)]


def client_flags(keys: Path) -> list[str]:
    return ["--curve-server-key", str(keys / "broker.key"), "--curve-secret", str(keys / "client.key_secret")]


def client_keys(keys: Path) -> curve.ClientKeys:
    return curve.load_client_keys(str(keys / "broker.key"), str(keys / "client.key_secret"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("curve") / "keys"
    done = zchannels("keys", directory)
    assert done.returncode == 0, done.stderr
    return directory


@pytest.fixture(scope="module")
def secured(keys, module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1, broker_args=broker_flags(keys),
                                  edge_args=client_flags(keys), worker_args=client_flags(keys))


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


class Peer:
    """A test socket on the bus, with a monitor telling whether its handshake succeeded."""

    def __init__(self, ctx: zmq.Context, kind: int, endpoint: str,
                 keys: curve.ClientKeys | None = None, routing_id: bytes | None = None):
        self.sock = ctx.socket(kind)
        self.sock.linger = 0
        if routing_id is not None:
            self.sock.routing_id = routing_id
        if keys is not None:
            curve.secure_client(self.sock, keys)
        self.monitor = self.sock.get_monitor_socket(
            HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED, addr=f"inproc://test-monitor-{next(_monitor_ids)}")
        self.sock.connect(endpoint)
        self.events: list[int] = []
        self.received: list[bytes] = []

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def drain(self) -> list[bytes]:
        while self.sock.poll(0):
            self.received.append(self.sock.recv())
        return self.received

    def _events(self) -> list[int]:
        while self.monitor.poll(0):
            self.events.append(recv_monitor_message(self.monitor)["event"])
        return self.events

    def handshake_failed(self) -> bool:
        return any(e & HANDSHAKE_FAILED for e in self._events())

    def handshake_succeeded(self) -> bool:
        return zmq.EVENT_HANDSHAKE_SUCCEEDED in self._events()


def drain_ws(ws: RawWS) -> list:
    out = []
    while True:
        try:
            msg = ws.recv(0.01)
        except TimeoutError:
            return out
        if msg is None:
            return out
        out.append(json.loads(msg) if isinstance(msg, str) else msg)


class Client:
    """A raw V2 WebSocket client joined to its own echo topic."""

    def __init__(self, cluster, topic: str | None = None):
        self.topic = topic or f"echo:{uid()}"
        self.ws = RawWS.connect(cluster.raw_url(0))
        self.refs = (str(n) for n in itertools.count(100))
        self.ws.send_json(["1", "1", self.topic, "phx_join", {}])
        assert self.ws.recv_json(5) == ["1", "1", self.topic, "phx_reply",
                                        {"status": "ok", "response": {"joined": self.topic}}]

    def push(self, event: str, payload: dict) -> str:
        ref = next(self.refs)
        self.ws.send_json(["1", ref, self.topic, event, payload])
        return ref

    def call(self, event: str, payload: dict, timeout: float = 5.0) -> dict:
        ref = self.push(event, payload)
        reply = self.ws.recv_until(lambda m: isinstance(m, list) and m[1] == ref and m[3] == "phx_reply", timeout)
        return reply[4]


# ---- clients through a CURVE bus ----------------------------------------------------------------

def test_raw_websocket_clients_join_ping_and_broadcast_through_a_curve_bus(secured):
    a = Client(secured)
    b = Client(secured, a.topic)
    assert a.call("ping", {"q": 1}) == {"status": "ok", "response": {"q": 1}}
    assert a.call("bcast", {"m": 1}) == {"status": "ok", "response": {}}
    assert b.ws.recv_until(lambda m: m[3] == "bcast", 5) == [None, None, a.topic, "bcast", {"m": 1}]
    assert "bus secured with CURVE: 2 client key(s) admitted" in secured.broker.stderr_text()


def test_phoenix_js_joins_pushes_and_gets_broadcasts_through_a_curve_bus(secured, js_client):
    topic = f"echo:{uid()}"
    a, b = js_client("a"), js_client("b")
    for c in (a, b):
        assert c.connect(secured.ws_urls[0], {"user": "ada"})["status"] == "open"
        assert c.join("x", topic, on=["bcast"])["status"] == "ok"
    assert a.push("x", "ping", {"q": 2})["response"] == {"q": 2}
    assert a.push("x", "bcast", {"m": 2}) == {"status": "ok", "response": {}}
    b.wait_event({"type": "message", "event": "bcast", "payload": {"m": 2}})


# ---- peers without a valid key ------------------------------------------------------------------

def test_unkeyed_publisher_cannot_inject_a_broadcast(secured, keys, zctx):
    client = Client(secured)
    publish_in = wire.bus_endpoints(secured.bus)[1]
    intruder = Peer(zctx, zmq.PUB, publish_in)
    control = Peer(zctx, zmq.PUB, publish_in, keys=client_keys(keys))
    seen: list = []

    def control_delivered_five_times() -> bool:
        intruder.send(wire.pack_broadcast(wire.broadcast_frames(client.topic, "injected", b'{"x":1}')))
        control.send(wire.pack_broadcast(wire.broadcast_frames(client.topic, "control", b'{"x":1}')))
        seen.extend(drain_ws(client.ws))
        return sum(1 for m in seen if m[3] == "control") >= 5

    wait_until(control_delivered_five_times, 10, interval=0.02)
    assert [m for m in seen if m[3] == "injected"] == []
    wait_until(intruder.handshake_failed, 5, message="the broker never refused the unkeyed PUB")
    assert not intruder.handshake_succeeded()
    wait_until(lambda: "refused a bus connection on publish-in: " in secured.broker.stderr_text(), 5)


def test_unkeyed_subscriber_receives_nothing_while_broadcasts_flow(secured, keys, zctx):
    client = Client(secured)
    subscribe_out = wire.bus_endpoints(secured.bus)[2]
    intruder = Peer(zctx, zmq.SUB, subscribe_out)
    intruder.sock.subscribe(b"")                        # everything
    control = Peer(zctx, zmq.SUB, subscribe_out, keys=client_keys(keys))
    control.sock.subscribe(wire.topic_key(client.topic))

    def control_got_five_broadcasts() -> bool:
        client.push("bcast", {"secret": "only for subscribers"})
        drain_ws(client.ws)
        intruder.drain()
        return len(control.drain()) >= 5

    wait_until(control_got_five_broadcasts, 10, interval=0.05)
    assert intruder.drain() == []
    wait_until(intruder.handshake_failed, 5, message="the broker never refused the unkeyed SUB")
    assert not intruder.handshake_succeeded()
    wait_until(lambda: "refused a bus connection on subscribe-out: " in secured.broker.stderr_text(), 5)


@pytest.mark.parametrize("who", ["no keys", "unknown client key", "wrong broker key"])
def test_dealer_without_a_valid_key_cannot_register_as_a_worker(secured, keys, zctx, who):
    good = client_keys(keys)
    stranger_public, stranger_secret = zmq.curve_keypair()
    forged = {"no keys": None,
              "unknown client key": curve.ClientKeys(good.server, stranger_public, stranger_secret),
              "wrong broker key": curve.ClientKeys(zmq.curve_keypair()[0], good.public, good.secret)}[who]
    # A failed handshake is logged once per endpoint and reason (then every 10th, 100th, ...);
    # a refused key names the key.
    expected_log = {
        "no keys": "refused a bus connection on routing: ",
        "unknown client key": f"refused a bus peer at 127.0.0.1: its CURVE key {stranger_public.decode()} "
                              f"is not in --curve-clients",
        "wrong broker key": "refused a bus connection on routing: ",
    }[who]
    router_ep = wire.bus_endpoints(secured.bus)[0]
    intruder_id = wire.new_peer_id(wire.ROLE_WORKER, "intruder")
    control_id = wire.new_peer_id(wire.ROLE_WORKER, "control")
    intruder = Peer(zctx, zmq.DEALER, router_ep, keys=forged, routing_id=intruder_id)
    control = Peer(zctx, zmq.DEALER, router_ep, keys=good, routing_id=control_id)
    ready = wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"0"))
    # The control registers with a huge load, so the broker places no client's join on it.
    control_ready = wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"1000000"))

    def control_registered() -> bool:
        intruder.send(ready)
        control.send(control_ready)
        return bool(control.drain())

    try:
        wait_until(control_registered, 10, interval=0.05)
        wait_until(lambda: (intruder.send(ready), intruder.handshake_failed())[1], 10,
                   message="the broker never refused the intruder's handshake")
        wait_until(lambda: expected_log in secured.broker.stderr_text(), 5,
                   message=lambda: secured.broker.stderr_text()[-3000:])
        assert intruder.drain() == [] and not intruder.handshake_succeeded()
        log = secured.broker.stderr_text()
        assert f"worker up: {control_id.decode()}" in log
        assert f"worker up: {intruder_id.decode()}" not in log
        # Joins still land on the real worker only (an intruder with load 0 would take them).
        worker_pid = secured.worker_pids[0]
        for _ in range(4):
            assert Client(secured).call("pid", {})["response"] == {"pid": worker_pid}
    finally:
        control.send(wire.pack(wire.bye(wire.ROLE_WORKER)))


# ---- a keyed peer is trusted with the bus, but garbage still breaks nothing ---------------------

def replaced(frames: list[bytes], index: int, value: bytes) -> list[bytes]:
    """A copy of a well-formed message with one frame spoiled."""
    frames = list(frames)
    frames[index] = value
    return frames


def test_keyed_peer_sending_garbage_to_router_and_publish_in_crashes_nothing(secured, keys, zctx):
    good = client_keys(keys)
    client = Client(secured)
    watcher = Client(secured, f"intercept:{uid()}")   # an intercepting channel: the worker's SUB sees it
    endpoints = wire.bus_endpoints(secured.bus)
    dealer = Peer(zctx, zmq.DEALER, endpoints[0], keys=good, routing_id=wire.new_peer_id(b"X", "garbage"))
    pub = Peer(zctx, zmq.PUB, endpoints[1], keys=good)
    wait_until(lambda: dealer.handshake_succeeded() and pub.handshake_succeeded(), 5)
    worker_id = secured.worker_ready[0]["id"].encode()
    edge_id = secured.edge_ids[0].encode()
    junk = os.urandom(64)
    ping = wire.inbound(worker_id, b"c1", b"echo:g", b"1", b"2", b"ev", b"{}", wire.JSON)
    routed = [
        b"", b"\xff", junk, bytes(300),
        wire.pack(wire.heartbeat(b"?", b"x")),                                 # bad heartbeat
        wire.pack(wire.inbound(b"", *ping[2:])),                                # only CONNECT/JOIN may omit it
        wire.JOIN + b"\x00" + b"\x09" + b"\xff" * 8,                           # claims 9 fields, has none
        wire.pack(ping[:4]),                                                    # too few fields
        wire.pack(wire.join(worker_id, b"c1", b"echo:g", b"1", b"1", b"{not json", b"{")),
        wire.pack(wire.join(b"", b"c2", b"\xff\xfe", b"1", b"1", b"[]", b"[]")),   # placed, bad UTF-8
        wire.pack(wire.connect(b"", b"c3", b"\x00garbage")),
        wire.pack(replaced(ping, -1, b"?")),                                     # unknown payload format
        wire.pack(wire.push(edge_id, b"nobody", b"x", b"1", b"ev", b"{}", wire.JSON)[:3]),
        wire.pack(wire.join_reply(edge_id, *[b"\xff"] * 7)),
        wire.pack(wire.reply(edge_id, b"\xff", client.topic.encode(), b"1", b"1", b"ok", b"{", b"j")),
        wire.pack(wire.lp_request(edge_id, b"r", b"lp1.x.y.z", b"GET", b"nan", b"", b"")),
        wire.pack(wire.channel_error(edge_id, b"nobody", b"x", b"1")),
        *(bytes([kind]) + b"\x01" + b"?" + junk[:9] for kind in range(256)),
    ]
    bcast = wire.broadcast_frames(client.topic, "x", b"{}")
    published = [
        b"", junk, b"no terminator",
        wire.topic_key(client.topic) + b"\x09",                                 # claims 9 fields
        wire.pack_broadcast(bcast[:3]),                                         # too few
        wire.pack_broadcast(wire.broadcast_frames(client.topic, "x", b"{}", fmt=b"?")),
        wire.pack_broadcast(replaced(bcast, 1, b"?")),                          # not BROADCAST
        wire.pack_broadcast(replaced(bcast, 2, b"\xff\xfe")),                   # event not UTF-8
        wire.pack_broadcast(wire.broadcast_frames(watcher.topic, "filtered", b"{not json")),
        wire.pack_broadcast(replaced(wire.broadcast_frames(watcher.topic, "x", b"{}"), 2, b"\xff")),
    ]
    for data in routed:
        dealer.send(data)
    for data in [*routed[:4], b"\x00" * 7]:
        dealer.sock.send_multipart([data, b"second frame", b"third"])             # not one frame
    # A PUB drops what it sends before the broker's subscriptions reach it: repeat until the
    # last (valid) broadcast arrives, so all the garbage before it has been through too.
    marker = wire.pack_broadcast(wire.broadcast_frames(client.topic, "marker", b"{}"))
    seen: list = []

    def garbage_went_through() -> bool:
        for data in published:
            pub.send(data)
        pub.send(marker)
        seen.extend(drain_ws(client.ws))
        return any(m[3] == "marker" for m in seen)

    wait_until(garbage_went_through, 10, interval=0.05)
    assert all(m[3] in ("marker", "phx_reply") for m in seen), seen

    wait_until(lambda: "malformed" in secured.broker.stderr_text(), 5)
    wait_until(lambda: "dropped a bad" in secured.supervisor.stderr_text(), 5)
    assert all(p.alive() for p in secured.procs), [p for p in secured.procs if not p.alive()]
    # Everyone keeps serving: the old clients, a new one, broadcasts and the intercepting worker.
    assert client.call("ping", {"after": "garbage"}) == {"status": "ok", "response": {"after": "garbage"}}
    assert watcher.call("filtered", {"f": 1}) == {"status": "ok", "response": {}}
    assert watcher.ws.recv_until(lambda m: m[3] == "filtered", 5)[4]["f"] == 1
    fresh = Client(secured, client.topic)
    assert fresh.call("bcast", {"m": "still fans out"})["status"] == "ok"
    assert client.ws.recv_until(lambda m: m[3] == "bcast", 5)[4] == {"m": "still fans out"}
    assert "Traceback" not in secured.broker.stderr_text()


# ---- the keys command and start-up errors ------------------------------------------------------

def test_keys_makes_private_secret_files_and_refuses_to_overwrite(tmp_path):
    directory = tmp_path / "keys"
    first = zchannels("keys", directory)
    assert first.returncode == 0, first.stderr
    files = {p.name: p for p in directory.iterdir()}
    assert sorted(files) == ["broker.key", "broker.key_secret", "client.key", "client.key_secret"]
    for name, path in files.items():
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if name.endswith("_secret") else 0o644), name
    for flag in ("--curve-secret", "--curve-clients", "--curve-server-key", "--curve-keys"):
        assert flag in first.stdout
    before = {name: path.read_bytes() for name, path in files.items()}

    again = zchannels("keys", directory)
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr and "client.key_secret" in again.stderr
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before

    more = zchannels("keys", directory, "--name", "edge-eu", "--name", "worker-2")
    assert more.returncode == 0, more.stderr
    assert "kept the existing broker keypair" in more.stdout
    for name in ("edge-eu", "worker-2"):
        assert stat.S_IMODE((directory / f"{name}.key_secret").stat().st_mode) == 0o600
    assert {n: (directory / n).read_bytes() for n in before} == before
    assert zchannels("keys", directory, "--name", "edge-eu").returncode == 2
    assert zchannels("keys", directory, "--name", "../escape").returncode == 2


def _bad_starts(keys: Path, bad: Path) -> list[tuple[list[str], str]]:
    k = str(keys)
    return [
        (["broker", "--curve-secret", f"{k}/nope.key_secret", "--curve-clients", k], "no such file"),
        (["broker", "--curve-secret", f"{k}/broker.key", "--curve-clients", k], "holds no secret key"),
        (["broker", "--curve-secret", f"{k}/broker.key_secret"], "--curve-clients is missing"),
        (["broker", "--curve-secret", f"{k}/broker.key_secret", "--curve-clients", str(bad / "empty")],
         "no public keys"),
        (["broker", "--curve-secret", f"{k}/broker.key_secret", "--curve-clients", str(bad / "junk")],
         "not a ZeroMQ certificate"),
        (["edge", "--curve-server-key", f"{k}/broker.key_secret", "--curve-secret", f"{k}/client.key_secret"],
         "holds the broker's secret key"),
        (["edge", "--processes", "2", "--curve-server-key", f"{k}/broker.key"], "--curve-secret is missing"),
        (["workers", "--curve-server-key", f"{k}/broker.key", "--curve-secret", str(bad / "junk" / "x.key"),
          E2E_APP], "not a ZeroMQ certificate"),
        (["workers", "--curve-server-key", f"{k}/broker.key", "--curve-secret", f"{k}/client.key", E2E_APP],
         "holds no secret key"),
        (["dev", "--curve-keys", str(bad / "empty"), E2E_APP], "--curve-keys"),
    ]


def test_wrong_or_missing_key_files_stop_every_process_with_exit_code_2(keys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.key").write_text("hello\n")
    for argv, expected in _bad_starts(keys, tmp_path):
        # Port 0 (any free port) is for the broker; the others connect, and refuse port 0.
        done = zchannels(*argv, "--bus", "tcp://127.0.0.1:" + ("0" if argv[0] == "broker" else "5570"))
        assert done.returncode == 2, (argv, done.stderr)
        assert expected in done.stderr, (argv, done.stderr)
        assert "Traceback" not in done.stderr, (argv, done.stderr)
    runner = subprocess.run([sys.executable, "-m", "zchannels.workers.runner", E2E_APP, "--curve-secret",
                             str(keys / "client.key_secret")], cwd=str(ROOT), capture_output=True,
                            text=True, timeout=30)
    assert runner.returncode == 2 and "--curve-server-key is missing" in runner.stderr, runner.stderr


def test_edge_processes_pass_their_keys_to_each_child(keys):
    from zchannels.edge.multiproc import child_argv
    from zchannels.cli import build_parser, edge_process_options
    args = build_parser().parse_args(["edge", "--processes", "2", *client_flags(keys)])
    args.process_options = edge_process_options(args)
    argv = child_argv(args, 4321)
    assert "--processes" not in argv and argv[-3:] == ["--port", "4321", "--reuse-port"]
    for flag, value in zip(client_flags(keys)[::2], client_flags(keys)[1::2]):
        assert argv[argv.index(flag) + 1] == value


def test_dev_passes_the_keys_to_broker_edge_and_workers(keys):
    proc = Proc("zchannels", "dev", "--curve-keys", str(keys), "--bus", "tcp://127.0.0.1:0", "--port", "0",
                "-n", "1", "--log-level", LOG_LEVEL, E2E_APP, name="dev")
    try:
        line = proc.wait_for(lambda: next((l for l in proc.lines if l.startswith("[edge] READY")), None),
                             20, "the edge's READY line")
        http = dict(kv.split("=", 1) for kv in line.split()[2:])["http"]
        proc.wait_for(lambda: any(l.startswith("[workers] READY") for l in proc.lines), 20, "a worker")
        ws = RawWS.connect(http.replace("http://", "ws://") + "/socket/websocket?vsn=2.0.0")
        ws.send_json(["1", "1", "echo:dev", "phx_join", {}])
        assert ws.recv_json(5)[4]["status"] == "ok"
        ws.close()
        assert "bus secured with CURVE" in proc.stderr_text()
    finally:
        assert proc.stop(15) == 0
        proc.cleanup()
