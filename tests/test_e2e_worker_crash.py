"""kill -9 a worker under real phoenix.js clients (DESIGN principles 7 and 8).

Every channel the dead worker held gets phx_error at once (the broker tells the edges, not a
client timeout), phoenix.js rejoins by itself, the supervisor starts a fresh worker, and the
channels on the surviving worker never notice.
"""
from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from tests.conftest import wait_until

ERROR_WITHIN = 5.0     # broker liveness is 3 s; a vanished peer is usually seen in < 0.5 s
REJOIN_WITHIN = 10.0   # phoenix.js rejoins 1 s after phx_error, then 2 s, 5 s if that fails


def uid() -> str:
    return uuid.uuid4().hex[:10]


def pid_of(client, chan: str) -> int:
    answer = client.push(chan, "pid", {})
    assert answer["status"] == "ok", answer
    return answer["response"]["pid"]


@pytest.mark.timeout(90)
def test_kill_9_worker_errors_its_channels_rejoins_and_supervisor_replaces_it(cluster_factory, js_client):
    cluster = cluster_factory(edges=2, workers=2)
    original = set(cluster.worker_pids)
    assert len(original) == 2

    a = js_client("a")
    b = js_client("b")
    assert a.connect(cluster.ws_urls[0], {"user": "a"})["status"] == "open"
    assert b.connect(cluster.ws_urls[1], {"user": "b"})["status"] == "open"

    # Join until each client holds a channel on one worker (the victim); channels elsewhere
    # stay as the control group.
    placement: dict[tuple[str, str], int] = {}
    for client in (a, b):
        for i in range(8):
            chan = f"{client.name}{i}"
            assert client.join(chan, f"echo:{chan}-{uid()}")["status"] == "ok"
            placement[(client.name, chan)] = pid_of(client, chan)
            if len({p for (n, _), p in placement.items() if n == client.name}) == 2:
                break
    assert set(placement.values()) <= original
    shared = [pid for pid in sorted(original)
              if all(any(p == pid for (n, _), p in placement.items() if n == name) for name in "ab")]
    assert shared, f"8 joins per client never put both clients on one worker: {placement}"
    victim = shared[0]
    on_victim = [key for key, pid in placement.items() if pid == victim]
    survivors = [key for key, pid in placement.items() if pid != victim]
    clients = {"a": a, "b": b}
    marks = {name: c.mark() for name, c in clients.items()}

    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    # 1. phx_error for every channel of the dead worker, quickly.
    for name, chan in on_victim:
        err = clients[name].wait_event({"type": "chan_error", "chan": chan}, ERROR_WITHIN, since=marks[name])
        assert err["reason"] == {"reason": "channel_crash"}, err
    error_latency = time.monotonic() - killed_at

    # 2. phoenix.js rejoins them by itself.
    for name, chan in on_victim:
        clients[name].wait_event({"type": "joined", "chan": chan}, REJOIN_WITHIN, since=marks[name])

    # 3. The supervisor started a new worker, with a new pid.
    fresh = cluster.wait_new_worker(original, timeout=15)
    assert int(fresh["pid"]) != victim
    wait_until(lambda: victim not in cluster.worker_pids, 5)

    # 4. Everything answers again, nothing lives on the dead pid, the control group never errored.
    for (name, chan) in on_victim + survivors:
        c = clients[name]
        assert c.push(chan, "ping", {"after": chan}) == {"status": "ok", "response": {"after": chan}}
        assert pid_of(c, chan) != victim
    for name, chan in survivors:
        assert clients[name].find({"type": "chan_error", "chan": chan}, since=marks[name]) == []
        assert len(clients[name].find({"type": "joined", "chan": chan})) == 1
    for c in (a, b):
        assert c.find({"type": "socket_close"}) == [], "a worker crash must not drop client sockets"
        assert c.driver_errors() == []
    assert error_latency < ERROR_WITHIN
    # One readable line about the death, naming the pid and the signal.
    assert any(str(victim) in line and "SIGKILL" in line
               for line in cluster.supervisor.stderr_text().splitlines()), "no log line for the killed worker"
    assert cluster.stop() == {name: 0 for name in cluster.stopped_codes}


@pytest.mark.timeout(90)
def test_kill_9_only_worker_clients_rejoin_once_the_replacement_is_up(cluster_factory, js_client):
    """With a single worker there is nowhere to go until the supervisor's replacement registers:
    joins fail or time out meanwhile, and phoenix.js keeps retrying until one succeeds."""
    cluster = cluster_factory(edges=1, workers=1)
    (victim,) = cluster.worker_pids
    c = js_client("solo")
    assert c.connect(cluster.ws_urls[0], {"user": "solo"}, rejoinAfterMs=[200, 500, 1000])["status"] == "open"
    topics = [f"echo:solo{i}-{uid()}" for i in range(3)]
    for i, topic in enumerate(topics):
        assert c.join(f"c{i}", topic)["status"] == "ok"
    mark = c.mark()
    os.kill(victim, signal.SIGKILL)
    for i in range(len(topics)):
        c.wait_event({"type": "chan_error", "chan": f"c{i}"}, ERROR_WITHIN, since=mark)
    fresh = cluster.wait_new_worker({victim}, timeout=15)
    for i in range(len(topics)):
        c.wait_event({"type": "joined", "chan": f"c{i}"}, 15, since=mark)
        assert pid_of(c, f"c{i}") == int(fresh["pid"])
    assert c.find({"type": "socket_close"}) == []


@pytest.mark.timeout(90)
def test_broadcast_works_after_a_worker_restart(cluster_factory, js_client):
    """A worker's PUB socket is new after a restart: broadcasts from rejoined channels still
    reach subscribers on every edge."""
    cluster = cluster_factory(edges=2, workers=1)
    (victim,) = cluster.worker_pids
    topic = f"echo:{uid()}"
    a = js_client("a")
    b = js_client("b")
    a.connect(cluster.ws_urls[0], {"user": "a"}, rejoinAfterMs=[200, 500, 1000])
    b.connect(cluster.ws_urls[1], {"user": "b"}, rejoinAfterMs=[200, 500, 1000])
    for c in (a, b):
        assert c.join("x", topic, on=["bcast"])["status"] == "ok"
    marks = {c.name: c.mark() for c in (a, b)}
    os.kill(victim, signal.SIGKILL)
    cluster.wait_new_worker({victim}, timeout=15)
    for c in (a, b):
        c.wait_event({"type": "joined", "chan": "x"}, 15, since=marks[c.name])
    assert a.push("x", "bcast", {"after": "restart"})["status"] == "ok"
    for c in (a, b):
        c.wait_event({"type": "message", "event": "bcast", "payload": {"after": "restart"}}, 5)
