"""The broker's ROUTER loop on real ZeroMQ sockets: warm-up parking after a (re)start."""
from __future__ import annotations

import time

import pytest
import zmq

from zchannels.broker import router as router_mod
from zchannels.bus import wire
from zchannels.broker.router import Router
from tests.routerbus import RouterBus, pump


@pytest.fixture
def bus():
    rb = RouterBus()
    yield rb.sock, rb.peer
    rb.close()


def recv(dealer: zmq.Socket) -> list[bytes]:
    assert dealer.poll(2000), "nothing arrived"
    return wire.unpack(dealer.recv())


TERMINATE_FIELDS = (b"conn1", b"room:1", b"1", b"closed")
TERMINATE = wire.terminate(b"W-late", *TERMINATE_FIELDS)


def test_message_for_a_peer_not_reconnected_yet_waits_for_it_during_warm_up(bus):
    sock, peer = bus
    router = Router(sock)
    edge = peer(b"E-1")
    edge.send(wire.pack(TERMINATE))
    pump(router, sock, 1)
    assert router.parked_count == 1 and router.unroutable == 0
    worker = peer(b"W-late")
    worker.send(wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"0")))
    pump(router, sock, 1)
    assert router.parked_count == 0
    got = [recv(worker), recv(worker)]
    assert wire.terminate(b"E-1", *TERMINATE_FIELDS) in got   # readdressed to the sender


def test_what_is_still_parked_when_warm_up_ends_is_handed_back_unroutable(bus, monkeypatch):
    sock, peer = bus
    router = Router(sock)
    edge = peer(b"E-1")
    edge.send(wire.pack(TERMINATE))
    pump(router, sock, 1)
    router.housekeeping(time.monotonic() + router_mod.PEER_LIVENESS)
    assert router.parked_count == 0 and router.unroutable == 1
    assert wire.parse(recv(edge)) == wire.Unroutable(b"W-late", wire.TERMINATE, list(TERMINATE_FIELDS))


def test_parking_is_bounded(bus, monkeypatch):
    sock, peer = bus
    monkeypatch.setattr(router_mod, "PARK_LIMIT", 3)
    router = Router(sock)
    edge = peer(b"E-1")
    for _ in range(5):
        edge.send(wire.pack(TERMINATE))
    pump(router, sock, 5)
    assert router.parked_count == 3 and router.dropped_while_warming == 2


def test_a_peer_that_said_bye_before_its_connection_closed_counts_as_gone_not_dead(bus):
    sock, peer = bus
    router = Router(sock)
    worker = peer(b"W-1")
    worker.send(wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"0")))
    pump(router, sock, 1)
    assert b"W-1" in router.workers
    worker.send(wire.pack(wire.bye(wire.ROLE_WORKER)))
    worker.close(linger=1000)   # the BYE is still unread when the probe finds the peer gone
    time.sleep(0.2)
    router.housekeeping(time.monotonic())
    assert b"W-1" not in router.workers and router.worker_deaths == 0


JOIN_FIELDS = (b"conn1", b"room:1", b"1", b"1", b"{}", b"{}")
JOIN = wire.join(b"", *JOIN_FIELDS)


def test_a_join_with_no_live_worker_waits_and_goes_to_the_first_worker_that_heartbeats(bus):
    sock, peer = bus
    router = Router(sock)
    edge = peer(b"E-1")
    edge.send(wire.pack(JOIN))
    edge.send(wire.pack(wire.connect(b"", b"rpc1", b"{}")))
    pump(router, sock, 2)
    assert len(router.waiting) == 2 and router.unroutable == 0
    assert not edge.poll(100), "bounced instead of waiting"
    worker = peer(b"W-1")
    worker.send(wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"0")))
    pump(router, sock, 1)
    got = [recv(worker) for _ in range(3)]
    assert got == [wire.broker_heartbeat(router.instance), wire.join(b"E-1", *JOIN_FIELDS),
                   wire.connect(b"E-1", b"rpc1", b"{}")]
    assert not router.waiting and router.waited == 2


def test_a_join_still_waiting_for_a_worker_after_the_bound_is_bounced_no_worker(bus):
    sock, peer = bus
    router = Router(sock)
    edge = peer(b"E-1")
    edge.send(wire.pack(JOIN))
    pump(router, sock, 1)
    router.housekeeping(time.monotonic() + 0.5)          # still within the wait
    assert len(router.waiting) == 1 and not edge.poll(100)
    router.housekeeping(time.monotonic() + max(router_mod.WORKER_WAIT, 3.0) + 0.1)
    assert wire.parse(recv(edge)) == wire.Unroutable(b"", wire.JOIN, list(JOIN_FIELDS))
    assert router.no_worker == 1 and not router.waiting


def test_joins_waiting_for_a_worker_are_bounded(bus, monkeypatch):
    sock, peer = bus
    monkeypatch.setattr(router_mod, "WAIT_LIMIT", 2)
    router = Router(sock)
    edge = peer(b"E-1")
    for _ in range(3):
        edge.send(wire.pack(JOIN))
    pump(router, sock, 3)
    assert len(router.waiting) == 2
    back = recv(edge)                                     # the third is bounced at once
    assert wire.parse(back) == wire.Unroutable(b"", wire.JOIN, list(JOIN_FIELDS)) and router.no_worker == 1


def test_a_join_placed_on_a_worker_that_just_vanished_goes_to_another_worker(bus):
    sock, peer = bus
    router = Router(sock)
    edge = peer(b"E-1")
    gone, alive = peer(b"W-gone"), peer(b"W-alive")
    for worker in (gone, alive):
        worker.send(wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"0")))
    pump(router, sock, 2)
    recv(alive)                                  # the broker's answering heartbeat
    router.workers[b"W-alive"].load = 100        # placement prefers the (vanished) idle one
    gone.close(0)
    time.sleep(0.2)                              # the ROUTER notices the closed pipe
    edge.send(wire.pack(JOIN))
    pump(router, sock, 1)
    got = [recv(alive), recv(alive)]             # WORKER_DOWN for the vanished one, the join
    assert got == [wire.worker_down(b"W-gone"), wire.join(b"E-1", *JOIN_FIELDS)]
    assert b"W-gone" not in router.workers and router.unroutable == 0


def _register(router: Router, sock: zmq.Socket, dealer: zmq.Socket, role: bytes) -> None:
    dealer.send(wire.pack(wire.heartbeat(role, b"0")))
    pump(router, sock, 1)
    recv(dealer)   # the broker's first heartbeat


def _kinds_received(dealer: zmq.Socket) -> list[bytes]:
    kinds = []
    while dealer.poll(100):
        kinds.append(wire.unpack(dealer.recv())[0])
    return kinds


def _housekeep_until(router: Router, done, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "the router never saw the connection end"
        router.housekeeping(time.monotonic())
        time.sleep(0.01)


def test_a_peer_whose_connection_ends_after_a_silence_is_kept_as_reconnecting(bus):
    """A cut link: the peer dropped a connection that carried nothing for 2 s and is
    reconnecting, so it keeps its place (and its channels) until --peer-timeout."""
    sock, peer = bus
    router = Router(sock)
    worker, edge = peer(b"W-1"), peer(b"E-1")
    _register(router, sock, worker, wire.ROLE_WORKER)
    _register(router, sock, edge, wire.ROLE_EDGE)
    router.edges[b"E-1"].last_seen -= router_mod.CUT_SILENCE + 1
    edge.close(0)
    _housekeep_until(router, lambda: b"E-1" in router.reconnecting)
    assert b"E-1" in router.edges and router.edge_losses == 0
    assert wire.EDGE_DOWN not in _kinds_received(worker)
    again = peer(b"E-1")
    again.send(wire.pack(wire.heartbeat(wire.ROLE_EDGE, b"0")))
    pump(router, sock, 1)
    assert b"E-1" not in router.reconnecting and b"E-1" in router.edges
    assert wire.EVICTED not in _kinds_received(again)


def test_a_peer_whose_connection_ends_while_it_talks_is_removed_at_once(bus):
    """A dead process (kill -9): its peers hear of it within a probe, as before."""
    sock, peer = bus
    router = Router(sock)
    worker, edge = peer(b"W-1"), peer(b"E-1")
    _register(router, sock, worker, wire.ROLE_WORKER)
    _register(router, sock, edge, wire.ROLE_EDGE)
    edge.close(0)
    _housekeep_until(router, lambda: b"E-1" not in router.edges)
    assert not router.reconnecting and router.edge_losses == 1
    assert wire.EDGE_DOWN in _kinds_received(worker)
