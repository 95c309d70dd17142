"""A connect or join placed on a worker that blocks right after the broker chose it (a handler
in time.sleep) is sent again by the edge after PLACEMENT_RETRY and answered by the other worker;
the blocked worker's late join ok is ended (its terminate runs), and the client has exactly one
channel instance: broadcasts held while joining, pushes buffered while joining and later ones
each reach it once (edge/replace.py, edge/hub.py _on_join_reply)."""
from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from zchannels.bus.timing import PLACEMENT_RETRY
from tests.conftest import Cluster, wait_until
from tests.rawws import RawWS
from zchannels import Publisher

STALL_APP = "tests/apps/stall_app.py"
BLOCK_S = 5.0
ANSWERED_WITHIN = PLACEMENT_RETRY + 1.5   # the copy's trip to the other worker, on a loaded machine


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def two_workers(module_cluster_factory) -> Cluster:
    return module_cluster_factory(app=STALL_APP, edges=1, workers=2)


def stall_pid(path: Path, done: bool = False, timeout: float = BLOCK_S + 10) -> int:
    """The pid of the worker that took the stall (written when it starts blocking)."""
    text = wait_until(lambda: path.exists() and (text := path.read_text().strip())
                      and (" done" in text or not done) and text, timeout)
    return int(text.split()[0])


def edge_counter(cluster: Cluster, name: str) -> float:
    with urllib.request.urlopen(cluster.http_urls[0] + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f"zchannels_edge_{name}_total "):
                return float(line.split()[1])
    raise AssertionError(f"zchannels_edge_{name}_total not in the edge's /metrics")


def join(ws: RawWS, topic: str, ref: str, payload: dict | None = None) -> dict:
    ws.send_json([ref, ref, topic, "phx_join", payload or {}])
    reply = ws.recv_until(is_reply(topic, ref))
    assert reply[4]["status"] == "ok", reply
    return reply[4]["response"]


def count(ws: RawWS, pred) -> int:
    return sum(1 for raw in ws.received if isinstance(raw, str) and pred(json.loads(raw)))


def first(ws: RawWS, pred, timeout: float = 5.0) -> list:
    """The first message matching `pred`, received already (recv_until skips) or still to come."""
    for raw in ws.received:
        if isinstance(raw, str) and pred(msg := json.loads(raw)):
            return msg
    return ws.recv_until(pred, timeout)


def is_event(topic: str, event: str, **payload):
    return lambda m: m[2] == topic and m[3] == event and all(m[4].get(k) == v for k, v in payload.items())


def is_reply(topic: str, ref: str):
    return lambda m: m[2] == topic and m[3] == "phx_reply" and m[1] == ref


@pytest.mark.timeout(60)
def test_a_join_placed_on_a_worker_that_blocks_is_answered_by_the_other_once(two_workers, tmp_path):
    cluster = two_workers
    topic = f"stall:{uid()}"
    watch = "terminations:" + topic
    marker = tmp_path / "join-stall"
    # A watcher on the topic keeps the edge subscribed, so the publisher has its subscription
    # before the stalled join starts; the client watches terminations of its channel.
    watcher = RawWS.connect(cluster.raw_url(0))
    client = RawWS.connect(cluster.raw_url(0))
    pub = Publisher(cluster.bus)
    try:
        join(watcher, topic, "1")
        join(client, watch, "1")
        assert pub.wait_connected(10)
        deadline = time.monotonic() + 10
        while True:   # slow joiner: probe until the watcher hears the publisher
            pub.broadcast(topic, "probe", {})
            try:
                watcher.recv_until(is_event(topic, "probe"), timeout=0.2)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, "the publisher's broadcasts never arrived"

        started = time.monotonic()
        client.send_json(["2", "2", topic, "phx_join", {"stall_once": str(marker), "s": BLOCK_S}])
        client.send_json(["2", "3", topic, "ping", {}])   # buffered by the edge while joining
        blocked = stall_pid(marker, timeout=5)
        pub.broadcast(topic, "early", {})                 # held by the edge while joining
        watcher.recv_until(is_event(topic, "early"), timeout=5)
        assert time.monotonic() - started < PLACEMENT_RETRY, "too slow to test a held broadcast"

        reply = client.recv_until(is_reply(topic, "2"), timeout=ANSWERED_WITHIN)
        answered_in = time.monotonic() - started
        assert reply[4]["status"] == "ok", reply
        assert reply[4]["response"]["pid"] != blocked
        assert answered_in < ANSWERED_WITHIN, answered_in
        answered_by = reply[4]["response"]["pid"]
        assert first(client, is_reply(topic, "3"))[4]["response"] == {"pid": answered_by}

        # The blocked worker wakes, answers ok too late, and the edge ends that instance.
        ended = first(client, is_event(watch, "terminated"), timeout=BLOCK_S + 10)
        assert ended[4] == {"pid": blocked, "reason": "('shutdown', 'closed')"}

        client.send_json(["2", "4", topic, "ping", {}])
        assert client.recv_until(is_reply(topic, "4"))[4]["response"] == {"pid": answered_by}
        pub.broadcast(topic, "late", {"n": 1})
        pub.broadcast(topic, "late", {"n": 2})
        client.recv_until(is_event(topic, "late", n=2))
        client.send_json(["2", "5", topic, "ping", {}])
        client.recv_until(is_reply(topic, "5"))
        assert count(client, is_event(topic, "early")) == 1
        assert count(client, is_event(topic, "late", n=1)) == 1
        assert count(client, is_reply(topic, "2")) == 1
        assert count(client, is_reply(topic, "3")) == 1
        assert count(client, is_reply(topic, "4")) == 1
        assert count(client, lambda m: m[2] == topic and m[3] in ("phx_error", "phx_close")) == 0
        # The early broadcast came after the join reply (phoenix.js drops it before).
        events = [m[3] for m in map(json.loads, client.received) if m[2] == topic]
        assert events.index("early") > events.index("phx_reply"), events
        assert count(client, is_event(watch, "terminated")) == 1
        # The orphan's after-join push was dropped, quietly (it is not an intruder's frame).
        assert count(client, is_event(topic, "hello", pid=answered_by)) == 1
        assert count(client, is_event(topic, "hello", pid=blocked)) == 0
        assert edge_counter(cluster, "foreign_frames") == 0
        assert edge_counter(cluster, "join_retries") >= 1
        assert edge_counter(cluster, "late_joins_ended") >= 1
    finally:
        pub.close()
        watcher.close()
        client.close()
        if marker.exists():
            stall_pid(marker, done=True)   # the next test starts with both workers awake


@pytest.mark.timeout(60)
def test_a_connect_placed_on_a_worker_that_blocks_is_answered_by_the_other(two_workers, tmp_path):
    cluster = two_workers
    marker = tmp_path / "connect-stall"
    started = time.monotonic()
    client = RawWS.connect(cluster.raw_url(0, stall_once=str(marker), s=str(BLOCK_S)),
                           timeout=ANSWERED_WITHIN + 1)
    try:
        connected_in = time.monotonic() - started
        blocked = stall_pid(marker, timeout=1)
        assert connected_in < ANSWERED_WITHIN, connected_in
        topic = f"stall:{uid()}"
        response = join(client, topic, "1")
        assert response["connected_by"] != blocked
        assert edge_counter(cluster, "connect_retries") >= 1
        # The blocked worker's late answer is ignored; the edge serves on.
        stall_pid(marker, done=True)
        client.send_json(["1", "2", topic, "ping", {}])
        assert client.recv_until(is_reply(topic, "2"))[4]["status"] == "ok"
        with RawWS.connect(cluster.raw_url(0)) as other:
            join(other, topic, "1")
    finally:
        client.close()


@pytest.mark.timeout(60)
def test_a_join_sent_twice_to_its_only_worker_keeps_its_channel(cluster_factory, tmp_path):
    """With one worker both copies reach it: the second join replaces the first instance there,
    and the edge must not end the one it holds when that second ok comes."""
    cluster = cluster_factory(app=STALL_APP, edges=1, workers=1)
    topic = f"stall:{uid()}"
    watch = "terminations:" + topic
    marker = tmp_path / "join-stall"
    with RawWS.connect(cluster.raw_url(0)) as client:
        join(client, watch, "1")
        block_s = PLACEMENT_RETRY + 1.3
        client.send_json(["2", "2", topic, "phx_join", {"stall_once": str(marker), "s": block_s}])
        reply = client.recv_until(is_reply(topic, "2"), timeout=block_s + 5)
        assert reply[4]["status"] == "ok", reply
        stall_pid(marker, done=True)
        assert edge_counter(cluster, "join_retries") == 1
        client.send_json(["2", "3", topic, "ping", {}])
        assert client.recv_until(is_reply(topic, "3"))[4]["status"] == "ok"
        client.send_json(["2", "4", topic, "phx_leave", {}])
        client.recv_until(is_reply(topic, "4"))
        ended = first(client, is_event(watch, "terminated"))
        assert ended[4]["reason"] == "('shutdown', 'left')", ended
        assert count(client, is_reply(topic, "2")) == 1
        assert edge_counter(cluster, "late_joins_ended") == 0
