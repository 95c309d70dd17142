"""The bus against a hostile or broken peer: a message over --max-bus-message costs the broker
no memory and only the sender's connection; the broker takes each kind only from the role that
may send it; an edge takes frames about a channel only from the worker that holds it."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.request

import pytest
import zmq

from zchannels.bus import wire
from zchannels.bus.loopsock import LoopSocket
from zchannels.broker.router import Router
from tests.conftest import Cluster, wait_until
from tests.rawws import RawWS
from tests.routerbus import RouterBus, pump
from zchannels.cli import main as cli_main

MB = 1024 * 1024


# --- the broker's role checks, on real sockets ----------------------------------------------

@pytest.fixture
def bus():
    rb = RouterBus()
    yield rb.sock, rb.peer
    rb.close()


def received(dealer: zmq.Socket, timeout_ms: int = 200) -> list[list[bytes]]:
    """Everything that reached `dealer` but the broker's heartbeats, as logical frames."""
    out = []
    while dealer.poll(timeout_ms):
        frames = wire.unpack(dealer.recv())
        if frames[0] != wire.HEARTBEAT:
            out.append(frames)
    return out


def warmed_up(router: Router) -> Router:
    router._warm_until = 0.0   # as if the broker had been up for a while
    return router


REPLY = wire.reply(b"E-edge", b"1", b"room:1", b"1", b"2", b"ok", b"{}", wire.JSON)
JOIN_FIELDS = (b"1", b"room:1", b"1", b"1", b"{}", b"{}")
JOIN = wire.join(b"", *JOIN_FIELDS)


def test_a_worker_kind_from_an_edge_is_refused(bus):
    sock, peer = bus
    router = warmed_up(Router(sock))
    edge, other = peer(b"E-edge", wire.ROLE_EDGE), peer(b"E-other", wire.ROLE_EDGE)
    pump(router, sock, 2)
    other.send(wire.pack(REPLY))   # an edge answering for a worker
    pump(router, sock, 1)
    assert router.refused == 1 and router.routed == 0
    assert received(edge) == []


def test_an_edge_kind_from_a_worker_is_refused(bus):
    sock, peer = bus
    router = warmed_up(Router(sock))
    worker, rogue = peer(b"Ww0-a", wire.ROLE_WORKER), peer(b"Ww1-b", wire.ROLE_WORKER)
    pump(router, sock, 2)
    rogue.send(wire.pack(JOIN))
    pump(router, sock, 1)
    assert router.refused == 1 and received(worker) == [] and received(rogue) == []


def test_an_edge_kind_from_an_edge_is_routed(bus):
    sock, peer = bus
    router = warmed_up(Router(sock))
    worker, edge = peer(b"Ww0-a", wire.ROLE_WORKER), peer(b"E-edge", wire.ROLE_EDGE)
    pump(router, sock, 2)
    edge.send(wire.pack(JOIN))
    pump(router, sock, 1)
    assert router.refused == 0
    assert received(worker) == [wire.join(b"E-edge", *JOIN_FIELDS)]


def test_a_heartbeat_claiming_a_role_its_routing_id_does_not_name_is_refused(bus):
    sock, peer = bus
    router = warmed_up(Router(sock))
    peer(b"E-liar", wire.ROLE_WORKER)
    pump(router, sock, 1)
    assert router.refused == 1 and b"E-liar" not in router.workers and not router.edges


def test_an_unknown_sender_passes_only_during_the_warm_up(bus):
    sock, peer = bus
    router = Router(sock)
    worker = peer(b"Ww0-a", wire.ROLE_WORKER)
    pump(router, sock, 1)
    early = peer(b"E-early")               # reconnected after a broker restart, no heartbeat yet
    early.send(wire.pack(JOIN))
    pump(router, sock, 1)
    assert router.refused == 0 and received(worker) == [wire.join(b"E-early", *JOIN_FIELDS)]
    warmed_up(router)
    early.send(wire.pack(JOIN))
    pump(router, sock, 1)
    assert router.refused == 1 and received(worker) == []


def test_a_peer_does_not_send_a_message_over_the_bus_limit(caplog):
    """The broker would cut the sender's connection (and a worker's channels with it):
    the sending side refuses such a message, counted and logged, and goes on."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.MAXMSGSIZE, 64 * 1024)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect("inproc://nowhere-yet")

    async def sends():
        sock = LoopSocket(dealer, None, name="test dealer")
        big = sock.send(wire.push(b"E-x", b"1", b"t", b"1", b"ev", bytes(64 * 1024), wire.JSON))
        small = sock.send(wire.push(b"E-x", b"1", b"t", b"1", b"ev", b"{}", wire.JSON))
        return big, small, sock.oversized

    try:
        assert asyncio.run(sends()) == (False, True, 1)
        assert "over the bus limit of 65536 bytes" in caplog.text
    finally:
        dealer.close(0)
        ctx.term()


def test_an_edge_whose_frame_limit_does_not_fit_the_bus_limit_does_not_start(capsys):
    code = cli_main(["edge", "--bus", "tcp://127.0.0.1:1", "--max-frame-size", str(8 * MB)])
    assert code == 2
    assert "--max-bus-message" in capsys.readouterr().err


# --- a live cluster ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1, broker_args=["--metrics-port", "0"])


def vm_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def joined_client(cluster: Cluster, topic: str) -> RawWS:
    ws = RawWS.connect(cluster.raw_url(0))
    ws.send_json(["1", "1", topic, "phx_join", {}])
    assert ws.recv_json(5)[4]["status"] == "ok"
    return ws


def ping(ws: RawWS, topic: str, ref: str) -> dict:
    """A push answered by the worker: a round trip through the broker's ROUTER."""
    ws.send_json(["1", ref, topic, "ping", {"ref": ref}])
    return ws.recv_until(lambda m: m[1] == ref, timeout=5)[4]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("endpoint", ["publish-in", "routing"])
def test_an_oversized_bus_message_costs_the_broker_no_memory_and_only_the_senders_connection(guarded, endpoint):
    """300 MB from a raw PUB (publish-in, with a subscriber for its topic) or a raw DEALER
    (routing): libzmq reads the size first and closes the sender's connection."""
    topic = f"echo:oversized-{endpoint}"
    ws = joined_client(guarded, topic)
    ctx = zmq.Context()
    sender = ctx.socket(zmq.PUB if endpoint == "publish-in" else zmq.DEALER)
    sender.setsockopt(zmq.LINGER, 0)
    monitor = sender.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    broker_metrics = guarded.broker.ready[0]["metrics"]
    closed = f'zchannels_broker_bus_disconnects_total{{endpoint="{endpoint}"}}'
    try:
        sender.connect(wire.bus_endpoints(guarded.bus)[0 if endpoint == "routing" else 1])
        assert monitor.poll(5000), "the sender did not connect"
        monitor.recv_multipart()
        closed_before = metric(broker_metrics, closed)
        peak_before = vm_kb(guarded.broker.pid, "VmHWM")
        huge = bytearray(300 * MB)             # zero pages: costs this process little
        key = wire.topic_key(topic)
        huge[:len(key) + 1] = key + b"\x01"
        if endpoint == "publish-in":
            # Until the edge's subscription reaches this PUB, it drops what it sends itself.
            broadcast_until_received(sender, ws, topic, "before")
        sender.send(huge, copy=False)
        assert monitor.poll(20000), "the broker did not close the oversized sender's connection"
        del huge
        grown_mb = (vm_kb(guarded.broker.pid, "VmHWM") - peak_before) / 1024
        assert grown_mb < 48, f"the broker's peak RSS grew by {grown_mb:.0f} MB"
        wait_until(lambda: metric(broker_metrics, closed) >= closed_before + 1, timeout=5)
        assert f"bus connection closed on {endpoint}" in guarded.broker.stderr_text()
        # Everyone else is still served: routed requests, and broadcasts (from the same
        # publisher, which reconnects by itself).
        assert ping(ws, topic, "7") == {"status": "ok", "response": {"ref": "7"}}
        if endpoint == "publish-in":
            assert broadcast_until_received(sender, ws, topic, "after")[4] == {"n": 1}
        events = [m[3] for m in map(json.loads, ws.received) if m[2] == topic]
        assert set(events) <= {"phx_reply", "before", "after"}, events
    finally:
        ws.close()
        monitor.close(0)
        sender.close(0)
        ctx.term()


def broadcast_until_received(pub: zmq.Socket, ws: RawWS, topic: str, event: str) -> list:
    """Publish `event` on `topic` every 0.2 s until the client gets it (slow joiner)."""
    data = wire.pack_broadcast(wire.broadcast_frames(topic, event, b'{"n":1}'))

    def arrived():
        pub.send(data)
        try:
            return ws.recv_until(lambda m: m[3] == event, timeout=0.2)
        except TimeoutError:
            return None
    return wait_until(arrived, timeout=10)


class Rogue:
    """A bus peer with a routing id of `role`, heartbeating with a load that keeps it out of
    placement, sending whatever it is told."""

    def __init__(self, cluster: Cluster, role: bytes):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, wire.new_peer_id(role, "rogue"))
        self.sock.connect(wire.bus_endpoints(cluster.bus)[0])
        self.role = role
        self.beat()

    def beat(self) -> None:
        self.sock.send(wire.pack(wire.heartbeat(self.role, b"1000000")))

    def send(self, frames: list[bytes]) -> None:
        self.beat()
        self.sock.send(wire.pack(frames))

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def forgeries(edge: bytes, topic: bytes) -> list[list[bytes]]:
    """Frames about the channel (conn 1..20, join_ref "1") of someone else's client."""
    out = []
    for conn in range(1, 21):
        c = str(conn).encode()
        out += [wire.push(edge, c, topic, b"1", b"evil", b'{"evil":1}', wire.JSON),
                wire.push(edge, c, topic, b"", b"evil", b'{"evil":2}', wire.JSON),
                wire.reply(edge, c, topic, b"1", b"2", b"ok", b'{"evil":3}', wire.JSON),
                wire.channel_error(edge, c, topic, b"1"),
                wire.channel_close(edge, c, topic, b"")]
    return out


def assert_untouched(ws: RawWS, topic: str) -> None:
    ws.send_json(["1", "9", topic, "ping", {"still": "here"}])
    reply = ws.recv_until(lambda m: m[1] == "9", timeout=5)
    assert reply[4] == {"status": "ok", "response": {"still": "here"}}
    seen = [m for m in ws.received if isinstance(m, str)]
    assert not [m for m in seen if "evil" in m or "phx_error" in m or "phx_close" in m], seen


@pytest.mark.timeout(60)
def test_an_edge_takes_frames_about_a_channel_only_from_the_worker_that_holds_it(guarded):
    ws = joined_client(guarded, "echo:held")
    rogue = Rogue(guarded, wire.ROLE_WORKER)
    edge_metrics = f"{guarded.http_urls[0]}/metrics"
    before = metric(edge_metrics, "zchannels_edge_foreign_frames_total")
    try:
        frames = forgeries(guarded.edge_ids[0].encode(), b"echo:held")
        for f in frames:
            rogue.send(f)
        # Only the frames for our connection's id match a channel; the rest find no connection.
        wait_until(lambda: metric(edge_metrics, "zchannels_edge_foreign_frames_total") >= before + 5,
                   timeout=5)
        assert_untouched(ws, "echo:held")
    finally:
        rogue.close()
        ws.close()


@pytest.mark.timeout(60)
def test_the_broker_drops_worker_frames_sent_by_an_edge(guarded):
    ws = joined_client(guarded, "echo:edgeforged")
    rogue = Rogue(guarded, wire.ROLE_EDGE)
    broker_metrics = guarded.broker.ready[0]["metrics"]
    before = metric(broker_metrics, "zchannels_broker_refused_total")
    try:
        frames = forgeries(guarded.edge_ids[0].encode(), b"echo:edgeforged")
        for f in frames:
            rogue.send(f)
        wait_until(lambda: metric(broker_metrics, "zchannels_broker_refused_total") >= before + len(frames),
                   timeout=5)
        assert_untouched(ws, "echo:edgeforged")
    finally:
        rogue.close()
        ws.close()
