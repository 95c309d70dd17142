"""Losing the broker or an edge (DESIGN principles 2 and 9), with real phoenix.js clients.

A broker restart keeps every client connected and every channel joined; once it is back,
pushes and broadcasts flow again without rejoining.  An edge that dies has its channels
terminated in the workers (terminate/2 runs), which other clients can observe.
"""
from __future__ import annotations

import os
import signal
import uuid

import pytest

from tests.conftest import wait_until


def uid() -> str:
    return uuid.uuid4().hex[:10]


def terminations_watcher_and_victim(js_client, watcher_url: str, victim_url: str):
    """A victim joined to a ``terminate:*`` topic (its channel broadcasts "terminated" when it
    ends) and a watcher listening for that on ``terminations:<topic>``."""
    topic = f"terminate:{uid()}"
    watcher = js_client("watcher")
    assert watcher.connect(watcher_url, {"user": "w"})["status"] == "open"
    assert watcher.join("t", "terminations:" + topic)["status"] == "ok"
    watcher.on("t", "terminated")
    victim = js_client("victim")
    assert victim.connect(victim_url, {"user": "v"})["status"] == "open"
    assert victim.join("c", topic)["status"] == "ok"
    return watcher, victim


@pytest.mark.timeout(90)
def test_broker_restart_keeps_clients_and_channels(cluster_factory, js_client):
    cluster = cluster_factory(edges=2, workers=2)
    topic = f"echo:{uid()}"
    a, b = js_client("a"), js_client("b")
    assert a.connect(cluster.ws_urls[0], {"user": "a"})["status"] == "open"
    assert b.connect(cluster.ws_urls[1], {"user": "b"})["status"] == "open"
    assert a.join("c", topic)["status"] == "ok"
    assert b.join("c", topic)["status"] == "ok"
    b.on("c", "bcast")

    cluster.restart_broker()

    # Peers re-register with their next heartbeats; messages in the gap may be lost.
    def ping_ok() -> bool:
        return a.push("c", "ping", {"n": 1}, timeout_ms=1000)["status"] == "ok"
    wait_until(ping_ok, timeout=20, interval=0.2)

    def broadcast_arrives() -> bool:
        mark = b.mark()
        a.push("c", "bcast", {"after": "restart"}, timeout_ms=1000)
        try:
            b.wait_event({"type": "message", "chan": "c", "event": "bcast"}, timeout=0.5, since=mark)
            return True
        except AssertionError:
            return False
    wait_until(broadcast_arrives, timeout=20, interval=0.1)
    for client in (a, b):
        assert not client.find({"type": "socket_close"}), "a client lost its connection"
        assert not client.find({"type": "chan_error"}), "a channel crashed during the restart"


@pytest.mark.timeout(60)
def test_dead_edge_channels_are_terminated_in_workers(cluster_factory, js_client):
    cluster = cluster_factory(edges=2, workers=2)
    watcher, _victim = terminations_watcher_and_victim(js_client, cluster.ws_urls[1], cluster.ws_urls[0])

    cluster.edge_procs[0].popen.send_signal(signal.SIGKILL)
    event = watcher.wait_event({"type": "message", "chan": "t", "event": "terminated"}, timeout=10)
    assert "closed" in event["payload"]["reason"]
    assert "edge down" in cluster.broker.stderr_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("frozen", ["edge", "worker"])
def test_peer_declared_dead_while_frozen_resets_and_clients_recover(cluster_factory, js_client, frozen):
    """A peer silent past --peer-timeout is declared dead; when it wakes up the broker tells it
    (EVICTED), it drops what its peers dropped, and phoenix.js rejoins: nothing stays silently
    broken."""
    cluster = cluster_factory(edges=1, workers=1, broker_args=["--peer-timeout", "1"])
    client = js_client("c")
    assert client.connect(cluster.ws_urls[0], {"user": "c"})["status"] == "open"
    topic = f"echo:{uid()}"
    assert client.join("c", topic)["status"] == "ok"
    joins_before = len(client.find({"type": "joined", "chan": "c"}))
    pid = cluster.edge_procs[0].pid if frozen == "edge" else cluster.worker_pids[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: f"{frozen} down" in cluster.broker.stderr_text(), timeout=10)
    finally:
        os.kill(pid, signal.SIGCONT)
    client.wait_event({"type": "chan_error", "chan": "c"}, timeout=10)
    wait_until(lambda: len(client.find({"type": "joined", "chan": "c"})) > joins_before, timeout=15)
    wait_until(lambda: client.push("c", "ping", {"n": 2}, timeout_ms=1000)["status"] == "ok",
               timeout=15, interval=0.2)
    assert "declared dead" in cluster.stderr()


@pytest.mark.timeout(60)
def test_a_channel_end_lost_in_a_broker_restart_still_reaches_the_worker(cluster_factory, js_client):
    cluster = cluster_factory(edges=1, workers=1)
    watcher, victim = terminations_watcher_and_victim(js_client, cluster.ws_urls[0], cluster.ws_urls[0])
    # The TERMINATE of the victim's channel lands in the frozen broker and dies with it.
    cluster.restart_broker(frozen=True, while_down=victim.disconnect, down_s=0.5)
    # Settled after the restart: the edge lists its channels to the worker, which ends this one
    # (or the worker lists its channels to the edge, which ends it), whichever comes first.
    event = watcher.wait_event({"type": "message", "chan": "t", "event": "terminated"}, timeout=15)
    assert "closed" in event["payload"]["reason"]
    stderr = cluster.stderr()
    assert "ending 1 channel(s) it no longer has" in stderr or "ending 1 channel(s) it still held" in stderr


@pytest.mark.timeout(60)
def test_a_channel_close_lost_in_a_broker_restart_reaches_the_client_as_phx_error(cluster_factory, js_client):
    cluster = cluster_factory(edges=1, workers=1)
    client = js_client("c")
    assert client.connect(cluster.ws_urls[0], {"user": "c"})["status"] == "open"
    assert client.join("c", f"echo:{uid()}")["status"] == "ok"
    joins_before = len(client.find({"type": "joined", "chan": "c"}))
    assert client.push("c", "stop_after", {"ms": 300})["status"] == "ok"
    # The channel stops while the broker is frozen: its phx_close is lost with the broker.
    cluster.restart_broker(frozen=True, down_s=1.5)
    client.wait_event({"type": "chan_error", "chan": "c"}, timeout=15)
    wait_until(lambda: len(client.find({"type": "joined", "chan": "c"})) > joins_before, timeout=15)
    assert not client.find({"type": "chan_close", "chan": "c"})
