"""A broker restart settled between edges and workers (docs/architecture.md, "Broker restart").

After a broker restart an edge lists its channels to every worker it has them on, and a live
worker answers at once.  A worker that died while the broker was down is unknown to the new
broker, which would report it only at the end of its 3 s warm-up; the edge takes a worker that
has not answered within ``SYNC_ANSWER_TIMEOUT`` for dead: phx_error for its channels (their
pending pushes get an error reply), and phoenix.js rejoins them on a live worker.  A worker
that is alive but was too slow has those instances ended, so nothing is left behind.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest

from tests.conftest import pid_alive, wait_until
from tests.test_e2e_failover import terminations_watcher_and_victim

# phx_error comes SYNC_ANSWER_TIMEOUT (1.5 s) after the edge is back on the new broker (up to
# ~0.6 s after its READY); the clients below rejoin 0.2 s after a phx_error.  Slack for a
# loaded machine on top.
ERROR_WITHIN = 2.5
REJOIN_WITHIN = 3.0


def uid() -> str:
    return uuid.uuid4().hex[:10]


def joined_events(client, chan: str) -> list[dict]:
    return client.find({"type": "joined", "chan": chan})


@pytest.mark.timeout(90)
def test_a_worker_killed_while_the_broker_is_down_is_settled_soon_after_the_restart(
        cluster_factory, js_client):
    cluster = cluster_factory(edges=1, workers=2)
    client = js_client("c")
    assert client.connect(cluster.ws_urls[0], {"user": "c"}, rejoinAfterMs=200)["status"] == "open"
    assert client.join("c", f"echo:{uid()}")["status"] == "ok"
    victim = client.push("c", "pid")["response"]["pid"]
    joins_before = len(joined_events(client, "c"))
    outcome: dict = {}
    pusher = threading.Thread(target=lambda: outcome.update(
        client.push("c", "ping", {"n": 1}, timeout_ms=10_000)), daemon=True)

    def kill_the_channels_worker() -> None:
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: not pid_alive(victim), timeout=5)
        pusher.start()   # a push to the dead worker's channel while the broker is down

    cluster.restart_broker(while_down=kill_the_channels_worker, down_s=1.0)
    restarted = time.time()
    error = client.wait_event({"type": "chan_error", "chan": "c"}, timeout=10)
    wait_until(lambda: len(joined_events(client, "c")) > joins_before, timeout=10)
    rejoined = joined_events(client, "c")[joins_before]
    error_after, rejoin_after = error["t"] / 1000 - restarted, rejoined["t"] / 1000 - restarted
    print(f"after the new broker's READY: phx_error {error_after:.2f}s, joined again {rejoin_after:.2f}s")
    assert error_after <= ERROR_WITHIN
    assert rejoin_after <= REJOIN_WITHIN
    # The push sent during the outage was answered: an error reply, not phoenix.js's timeout.
    pusher.join(15)
    assert outcome.get("status") == "error" and outcome["response"] == {"reason": "channel lost"}, outcome
    assert client.push("c", "pid")["response"]["pid"] != victim
    assert client.push("c", "ping", {"n": 2})["status"] == "ok"
    assert "said nothing for 1.5s after the bus came back" in cluster.edge_procs[0].stderr_text()


@pytest.mark.timeout(90)
def test_a_broker_restart_with_every_worker_alive_errors_no_channel(cluster_factory, js_client):
    cluster = cluster_factory(edges=2, workers=2)
    clients, pids = [], set()
    for i in range(4):
        client = js_client(f"c{i}")
        assert client.connect(cluster.ws_urls[i % 2], {"user": f"c{i}"})["status"] == "open"
        for chan in ("a", "b"):
            assert client.join(chan, f"echo:{uid()}")["status"] == "ok"
            pids.add(client.push(chan, "pid")["response"]["pid"])
        clients.append(client)
    assert len(pids) == 2, "the channels should be spread over both workers"

    cluster.restart_broker(down_s=1.0)

    for client in clients:
        for chan in ("a", "b"):
            wait_until(lambda: client.push(chan, "ping", {}, timeout_ms=1000)["status"] == "ok",
                       timeout=15, interval=0.1)
    for proc in cluster.edge_procs:   # both edges asked the workers, and both answered
        wait_until(lambda: "told 2 worker(s) which channels this edge has" in proc.stderr_text(), timeout=5)
        assert "said nothing" not in proc.stderr_text()
    for client in clients:
        assert not client.find({"type": "chan_error"}), "a channel was lost in the restart"
        assert not client.find({"type": "socket_close"}), "a client lost its connection"


@pytest.mark.timeout(60)
def test_a_push_still_unanswered_after_a_broker_restart_gets_an_error_reply_not_a_timeout(
        cluster_factory, js_client):
    """What a push lost in flight with the broker looks like, made certain with a push its handler
    never answers (noreply): once the bus is back, it is answered with an error after
    OUTAGE_REPLY_AFTER (4 s), well before phoenix.js's 10 s timeout, and the channel lives on."""
    cluster = cluster_factory(edges=1, workers=1)
    client = js_client("c")
    assert client.connect(cluster.ws_urls[0], {"user": "c"}, frames=True)["status"] == "open"
    assert client.join("c", f"echo:{uid()}")["status"] == "ok"
    outcome: dict = {}
    pusher = threading.Thread(target=lambda: outcome.update(
        client.push("c", "noreply", {}, timeout_ms=10_000)), daemon=True)
    pusher.start()
    wait_until(lambda: any(f[3] == "noreply" for f in client.wire("out")), timeout=5)
    sent = time.monotonic()
    # A reply to a later push on the same socket: the edge has the noreply push pending.
    assert client.push("c", "ping", {"before": 1})["status"] == "ok"
    cluster.restart_broker(down_s=1.0)
    pusher.join(12)
    assert outcome == {"status": "error", "response": {"reason": "lost in a bus outage"}}
    assert time.monotonic() - sent < 9
    assert client.push("c", "ping", {"after": 1}) == {"status": "ok", "response": {"after": 1}}
    assert not client.find({"type": "chan_error"})


@pytest.mark.timeout(90)
def test_a_worker_too_slow_to_answer_after_the_restart_has_the_errored_instances_ended(
        cluster_factory, js_client):
    cluster = cluster_factory(edges=1, workers=2)
    watcher, victim = terminations_watcher_and_victim(js_client, cluster.ws_urls[0], cluster.ws_urls[0])
    slow = victim.push("c", "pid")["response"]["pid"]
    joins_before = len(joined_events(victim, "c"))
    os.kill(slow, signal.SIGSTOP)   # alive, but says nothing until SIGCONT
    try:
        cluster.restart_broker(down_s=0.5)
        victim.wait_event({"type": "chan_error", "chan": "c"}, timeout=10)
    finally:
        os.kill(slow, signal.SIGCONT)
    assert "said nothing for 1.5s after the bus came back" in cluster.edge_procs[0].stderr_text()
    # The instance the client gave up on ends in the slow worker (terminate runs) ...
    event = watcher.wait_event({"type": "message", "chan": "t", "event": "terminated"}, timeout=15)
    assert "closed" in event["payload"]["reason"]
    # ... and the client is joined again, once.
    wait_until(lambda: len(joined_events(victim, "c")) > joins_before, timeout=15)
    assert victim.push("c", "ping", {})["status"] == "ok"
    assert len(watcher.messages("t", "terminated")) == 1


class FakeWorker:
    """A worker made of one DEALER on the broker's ROUTER, in a thread: it accepts connects and
    joins, answers pushes and SYNCs, and heartbeats only while ``heartbeating`` is set."""

    def __init__(self, bus: str):
        import zmq

        from zchannels.bus import wire
        self.zmq, self.wire = zmq, wire
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, wire.new_peer_id(wire.ROLE_WORKER, "fake"))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 100)
        self.sock.connect(wire.bus_endpoints(bus)[0])
        self.channels: dict[bytes, list[tuple[bytes, bytes, bytes]]] = {}   # edge -> channels
        self.heartbeating = threading.Event()
        self.heartbeating.set()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-worker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        wire, sock = self.wire, self.sock
        next_beat = 0.0
        while not self._stop.is_set():
            if self.heartbeating.is_set() and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + 0.5
                sock.send(wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"0")))
            if not sock.poll(50):
                continue
            frames = wire.unpack(sock.recv())
            kind = frames[0]
            if kind not in (wire.CONNECT, wire.JOIN, wire.IN, wire.EDGE_SYNC):
                continue
            m = wire.parse(frames)
            if kind == wire.CONNECT:
                sock.send(wire.pack(wire.connect_reply(m.peer, m.request_id, b"ok", b'{"assigns":{},"id":null}')))
            elif kind == wire.JOIN:
                self.channels.setdefault(m.peer, []).append((m.conn_id, m.topic, m.join_ref))
                sock.send(wire.pack(wire.join_reply(m.peer, m.conn_id, m.topic, m.join_ref, m.ref,
                                                    b"ok", b"{}", b"[]")))
            elif kind == wire.IN:
                sock.send(wire.pack(wire.reply(m.peer, m.conn_id, m.topic, m.join_ref, m.ref,
                                               b"ok", m.payload, m.fmt)))
            else:
                sock.send(wire.pack(wire.sync(m.peer, self.channels.get(m.peer, []))))
                self.synced.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("what", ["push", "leave"])
def test_a_message_the_broker_cannot_route_after_its_warm_up_is_answered_to_the_client(what):
    """The new broker never heard of the worker (it answered the edge's SYNC during the warm-up,
    then vanished without a heartbeat): the message comes back UNROUTABLE, and the client is
    told: a push gets an error reply and its channel phx_error; a leave gets its ok and
    phx_close, as the worker would have sent them."""
    import json

    from tests.conftest import Proc
    from tests.rawws import RawWS
    broker = Proc("zchannels.broker", "--bus", "tcp://127.0.0.1:0", name="broker")
    procs, fake, ws = [broker], None, None
    try:
        bus = broker.wait_ready()[0]["bus"]
        edge = Proc("zchannels.edge", "--bus", bus, "--port", "0", "--host", "127.0.0.1", name="edge")
        procs.append(edge)
        http = edge.wait_ready()[0]["http"]
        fake = FakeWorker(bus)
        wait_until(lambda: "worker up" in broker.stderr_text(), timeout=10)
        ws = RawWS.connect(http.replace("http://", "ws://") + "/socket/websocket?vsn=2.0.0")
        topic = f"echo:{uid()}"
        ws.send_json(["1", "1", topic, "phx_join", {}])
        assert ws.recv_until(lambda m: m[1] == "1")[4]["status"] == "ok"

        fake.heartbeating.clear()   # the new broker will know it only from its SYNC answer
        broker.popen.send_signal(signal.SIGKILL)
        broker.popen.wait(5)
        broker = Proc("zchannels.broker", "--bus", bus, name="broker2")
        procs.append(broker)
        broker.wait_ready()
        assert fake.synced.wait(10), ("the edge sent no EDGE_SYNC after the restart\n"
                                      + edge.stderr_text()[-3000:] + broker.stderr_text()[-2000:])
        fake.close()
        fake = None
        time.sleep(3.5)   # past the new broker's warm-up: an unknown worker is unroutable now
        if what == "push":
            ws.send_json(["1", "2", topic, "ping", {"n": 1}])
            reply = ws.recv_until(lambda m: m[1] == "2", timeout=5)
            assert reply[4] == {"status": "error", "response": {"reason": "channel lost"}}
            error = ws.recv_until(lambda m: m[3] == "phx_error", timeout=5)
            assert error[0] == "1" and error[2] == topic
        else:
            ws.send_json(["1", "2", topic, "phx_leave", {}])
            reply = ws.recv_until(lambda m: m[1] == "2", timeout=5)
            assert reply[0] == "1" and reply[4] == {"status": "ok", "response": {}}
            close = ws.recv_until(lambda m: m[3] in ("phx_close", "phx_error"), timeout=5)
            assert close[3] == "phx_close" and close[0] == "1" and close[2] == topic
        assert "said nothing" not in edge.stderr_text(), json.dumps(edge.stderr_text()[-2000:])
    finally:
        if ws is not None:
            ws.close()
        if fake is not None:
            fake.close()
        for proc in reversed(procs):
            proc.stop()
            proc.cleanup()
