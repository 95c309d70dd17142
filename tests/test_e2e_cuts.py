"""Cut links between machines, and an edge that drains on SIGTERM.

Edge A reaches the broker through tests/tcpproxy.py's BusLink, which a test freezes like a cut
cable (TCP connections stay open, nothing passes); edge B reaches it directly.  Clients that
should fail over connect through a round-robin TcpProxy in front of A and B, as behind a load
balancer without health checks.
"""
from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.request
import uuid

import pytest

from tests.conftest import E2E_APP, Proc, wait_until
from tests.jsclient import DriverError
from tests.rawws import HandshakeRefused, RawWS
from tests.tcpproxy import BusLink, TcpProxy


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def links():
    made: list = []
    yield made
    for link in made:
        link.close()


def cut_cluster(cluster_factory, links, edge_args=()) -> tuple:
    """Broker, 2 workers, edge B on the bus directly and edge A behind a BusLink.
    Returns (cluster, link, url_a, url_b) with http://HOST:PORT urls."""
    cluster = cluster_factory(edges=1, workers=2)
    link = BusLink(cluster.bus)
    links.append(link)
    edge_a = cluster._add(Proc("zchannels.edge", "--bus", link.bus, "--port", "0", *edge_args, name="edgeA"))
    url_a = edge_a.wait_ready()[0]["http"]
    return cluster, link, url_a, cluster.http_urls[0]


def ws(url: str) -> str:
    return url.replace("http://", "ws://", 1) + "/socket"


def port_of(url: str) -> int:
    return int(url.rpartition(":")[2])


class Pinger(threading.Thread):
    """Pushes "ping" (1 s timeout) every 100 ms; keeps (sent, answered, status)."""

    def __init__(self, client, chan: str = "c"):
        super().__init__(daemon=True)
        self.client, self.chan = client, chan
        self.results: list[tuple[float, float, str]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            sent = time.monotonic()
            try:
                status = self.client.push(self.chan, "ping", {}, timeout_ms=1000, timeout=5)["status"]
            except DriverError as exc:   # the driver refuses while it has no socket
                status = f"driver: {exc}"[:60]
            self.results.append((sent, time.monotonic(), status))
            self.stopped.wait(0.1)

    def stop(self) -> None:
        self.stopped.set()
        self.join(10)

    def served_after(self, since: float) -> float | None:
        """Seconds from ``since`` until a push sent after it was answered ok."""
        return next((answered - since for sent, answered, status in self.results
                     if sent >= since and status == "ok"), None)

    def failed(self, since: float, until: float) -> list:
        return [r for r in self.results if since <= r[0] <= until and r[2] != "ok"]


def joined_client(js_client, name: str, url: str, topic: str):
    client = js_client(name)
    assert client.connect(url, {"user": name})["status"] == "open"
    assert client.join("c", topic)["status"] == "ok"
    return client


@pytest.mark.timeout(60)
def test_a_cut_shorter_than_the_bus_loss_bound_costs_no_channel(cluster_factory, links, js_client):
    cluster, link, url_a, url_b = cut_cluster(cluster_factory, links)
    topic = f"echo:{uid()}"
    victim = joined_client(js_client, "victim", ws(url_a), topic)
    observer = joined_client(js_client, "observer", ws(url_b), topic)
    pingers = [Pinger(victim), Pinger(observer)]
    for p in pingers:
        p.start()
    try:
        wait_until(lambda: pingers[0].served_after(0), timeout=5)
        cut_at = time.monotonic()
        link.freeze()
        time.sleep(3.0)
        link.unfreeze()
        healed = time.monotonic()
        wait_until(lambda: pingers[0].served_after(healed), timeout=5)
    finally:
        for p in pingers:
            p.stop()
    served = pingers[0].served_after(cut_at)
    assert served is not None and served <= 3.0 + 3.0, served
    assert not pingers[1].failed(cut_at, healed), "the client on the other edge was affected"
    for client in (victim, observer):
        assert not client.find({"type": "socket_close"})
        assert not client.find({"type": "chan_error"}), "a channel was lost in a short cut"
    assert "edge down" not in cluster.broker.stderr_text()


@pytest.mark.timeout(90)
def test_a_10s_cut_of_an_edge_moves_its_clients_to_another_edge_within_the_cut_plus_3s(
        cluster_factory, links, js_client):
    """The real defaults: the edge closes its clients (1012) after 5 s without the broker;
    they reconnect through the balancer, land on the other edge and rejoin."""
    cluster, link, url_a, url_b = cut_cluster(cluster_factory, links)
    topic = f"echo:{uid()}"
    victims = []
    for i in range(2):
        balancer = TcpProxy([("127.0.0.1", port_of(url_a)), ("127.0.0.1", port_of(url_b))])
        links.append(balancer)
        victims.append(joined_client(js_client, f"victim{i}", f"ws://127.0.0.1:{balancer.port}/socket", topic))
        assert balancer.upstream_of == [0], "the victim should be on the edge that is cut"
    observer = joined_client(js_client, "observer", ws(url_b), topic)
    pingers = [Pinger(c) for c in (*victims, observer)]
    for p in pingers:
        p.start()
    cut = 10.0
    try:
        wait_until(lambda: all(p.served_after(0) for p in pingers), timeout=5)
        cut_at = time.monotonic()
        link.freeze()
        for victim in victims:
            close = victim.wait_event({"type": "socket_close"}, timeout=cut)
            assert close["code"] == 1012, close
        for p in pingers[:2]:
            wait_until(lambda p=p: p.served_after(cut_at),
                       timeout=max(0.1, cut + 3 - (time.monotonic() - cut_at)))
        remaining = cut - (time.monotonic() - cut_at)
        if remaining > 0:
            time.sleep(remaining)
        link.unfreeze()
        healed = time.monotonic()
        # Edge A is back on the bus: it accepts connections again.
        wait_until(lambda: _ws_connects(url_a), timeout=5, interval=0.2)
    finally:
        for p in pingers:
            p.stop()
    for p in pingers[:2]:
        assert p.served_after(cut_at) <= cut + 3.0
    assert not pingers[2].failed(cut_at, healed), "the client on the other edge was affected"
    assert not observer.find({"type": "socket_close"}) and not observer.find({"type": "chan_error"})
    assert "closing 2 client connection(s) (1012)" in cluster.procs[-1].stderr_text()


def _ws_connects(url: str) -> bool:
    try:
        RawWS.connect(ws(url) + "/websocket?vsn=2.0.0", timeout=2).close()
        return True
    except HandshakeRefused:
        return False


@pytest.mark.timeout(60)
def test_new_connects_during_a_cut_get_503_at_once(cluster_factory, links):
    cluster, link, url_a, _url_b = cut_cluster(cluster_factory, links)
    edge_a = cluster.procs[-1]
    link.freeze()
    try:
        wait_until(lambda: "the bus is down" in edge_a.stderr_text(), timeout=5)
        started = time.monotonic()
        with pytest.raises(HandshakeRefused) as refused:
            RawWS.connect(ws(url_a) + "/websocket?vsn=2.0.0", timeout=5)
        assert refused.value.code == 503
        assert time.monotonic() - started < 2.0   # not after the 5 s connect timeout
        with urllib.request.urlopen(url_a + "/socket/longpoll?vsn=2.0.0", timeout=5) as answer:
            assert json.loads(answer.read())["status"] == 500   # phoenix.js retries it
    finally:
        link.unfreeze()
    wait_until(lambda: _ws_connects(url_a), timeout=5, interval=0.2)


@pytest.mark.timeout(60)
def test_sigterm_drains_connections_in_batches_with_1012_and_exits_0(cluster_factory):
    cluster = cluster_factory(edges=1, workers=1, edge_args=["--drain-period", "2"])
    url = cluster.raw_url(0)
    clients = [RawWS.connect(url) for _ in range(40)]
    http = cluster.http_urls[0]
    with urllib.request.urlopen(http + "/socket/longpoll?vsn=2.0.0", timeout=5) as answer:
        token = json.loads(answer.read())["token"]
    poll_answer: list = []

    def poll() -> None:   # held by the edge (no messages) until the drain ends the session
        with urllib.request.urlopen(f"{http}/socket/longpoll?vsn=2.0.0&token={token}", timeout=15) as a:
            poll_answer.append(json.loads(a.read()))
    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    time.sleep(0.3)   # the poll is held

    edge = cluster.edge_procs[0]
    started = time.monotonic()
    edge.popen.send_signal(signal.SIGTERM)
    closed_at: dict[int, float] = {}

    def all_closed() -> bool:
        for i, c in enumerate(clients):
            if i not in closed_at and c.closed:
                closed_at[i] = time.monotonic() - started
        return len(closed_at) == len(clients)
    wait_until(lambda: all_closed() or closed_at, timeout=3, interval=0.01)
    # Draining: the port no longer accepts, so a balancer moves on at once.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port_of(http)), timeout=2).close()
    wait_until(all_closed, timeout=6, interval=0.01)
    assert {c.close_code for c in clients} == {1012}
    times = sorted(closed_at.values())
    assert times[-1] - times[0] >= 1.0, f"closed all at once: {times}"
    assert times[-1] <= 2.0 + 1.0, times
    # Batches of 10 (40 connections in 5 batches, but at least 10 a batch) every 0.5 s: never
    # (even with a late client) more than two batches within 0.25 s.
    assert max(sum(1 for t in times if s <= t < s + 0.25) for s in times) <= 20, times
    poller.join(5)
    assert poll_answer == [{"status": 410}]
    assert edge.popen.wait(10) == 0


@pytest.mark.timeout(90)
def test_a_10s_cut_evicts_nobody_when_the_edge_keeps_its_clients(cluster_factory, links, js_client):
    """With --bus-loss-timeout 0 the clients stay on the cut edge: the broker keeps the edge
    (its connection ended after a silence: a cut, not a death) and they are served again
    within the cut + 3 s, with no phx_error."""
    cluster, link, url_a, url_b = cut_cluster(cluster_factory, links, ["--bus-loss-timeout", "0"])
    topic = f"echo:{uid()}"
    victim = joined_client(js_client, "victim", ws(url_a), topic)
    observer = joined_client(js_client, "observer", ws(url_b), topic)
    pingers = [Pinger(victim), Pinger(observer)]
    for p in pingers:
        p.start()
    cut = 10.0
    try:
        wait_until(lambda: all(p.served_after(0) for p in pingers), timeout=5)
        cut_at = time.monotonic()
        link.freeze()
        time.sleep(cut)
        link.unfreeze()
        healed = time.monotonic()
        wait_until(lambda: pingers[0].served_after(healed), timeout=5)
    finally:
        for p in pingers:
            p.stop()
    assert pingers[0].served_after(cut_at) <= cut + 3.0
    assert not pingers[1].failed(cut_at, healed), "the client on the other edge was affected"
    for client in (victim, observer):
        assert not client.find({"type": "socket_close"})
        assert not client.find({"type": "chan_error"})
    assert "edge down" not in cluster.broker.stderr_text()
    # Back on the bus, the edge settled its channels with the workers (SYNC both ways), and
    # that errored nothing.
    assert "back on the bus: told" in cluster.procs[-1].stderr_text()


@pytest.mark.timeout(90)
def test_a_10s_cut_of_the_workers_costs_their_clients_at_most_the_cut_plus_3s(links, js_client):
    broker = Proc("zchannels.broker", "--bus", "tcp://127.0.0.1:0", name="broker")
    procs = [broker]
    try:
        bus = broker.wait_ready()[0]["bus"]
        link = BusLink(bus)
        links.append(link)
        edge = Proc("zchannels.edge", "--bus", bus, "--port", "0", name="edge")
        workers = Proc("zchannels.workers", "--bus", link.bus, "-n", "2", E2E_APP, name="workers")
        procs += [edge, workers]
        url = edge.wait_ready()[0]["http"]
        workers.wait_ready(2, 15)
        client = joined_client(js_client, "c", ws(url), f"echo:{uid()}")
        pinger = Pinger(client)
        pinger.start()
        cut = 10.0
        try:
            wait_until(lambda: pinger.served_after(0), timeout=5)
            cut_at = time.monotonic()
            link.freeze()
            time.sleep(cut)
            link.unfreeze()
            healed = time.monotonic()
            wait_until(lambda: pinger.served_after(healed), timeout=5)
        finally:
            pinger.stop()
        assert pinger.served_after(cut_at) <= cut + 3.0
        assert not client.find({"type": "chan_error"}), "the workers were evicted"
        assert not client.find({"type": "socket_close"})
        assert "worker down" not in broker.stderr_text()
        # A second after it hears the broker again, each worker settles its channels (SYNC).
        wait_until(lambda: "after a broker restart or silence, told" in workers.stderr_text(), timeout=5)
        assert not client.find({"type": "chan_error"})
    finally:
        for proc in reversed(procs):
            proc.stop()
            proc.cleanup()


@pytest.mark.timeout(60)
def test_a_draining_edge_refuses_new_sessions_even_on_a_kept_alive_connection_and_exits(cluster_factory):
    """A LongPoll client reusing one HTTP connection would otherwise open a new session after
    each 1012, which the drain closes, for ever: the edge refuses connects once it drains."""
    import http.client
    cluster = cluster_factory(edges=1, workers=1, edge_args=["--drain-period", "1"])
    edge = next(p for p in cluster.procs if p.name.startswith("edge"))
    host_port = cluster.http_urls[0].split("//", 1)[1]
    conn = http.client.HTTPConnection(host_port, timeout=5)
    try:
        conn.request("GET", "/socket/longpoll?vsn=2.0.0")
        assert json.loads(conn.getresponse().read())["status"] == 410   # a session
        edge.popen.send_signal(signal.SIGTERM)
        wait_until(lambda: "edge stopping" in edge.stderr_text(), timeout=5)
        conn.request("GET", "/socket/longpoll?vsn=2.0.0")             # same TCP connection
        assert json.loads(conn.getresponse().read())["status"] == 500   # refused, retried elsewhere
    finally:
        conn.close()
    assert edge.popen.wait(15) == 0
