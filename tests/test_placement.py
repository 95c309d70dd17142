"""Placement: connects and joins go only to workers heard from in the last PLACE_FRESH seconds,
so a handler that blocks its worker (time.sleep) does not make new clients wait for it."""
from __future__ import annotations

import time

import pytest

from zchannels.broker import router as router_mod
from zchannels.bus import wire
from zchannels.broker.router import Router
from tests.conftest import Cluster
from tests.rawws import RawWS

BLOCK_APP = "tests/apps/block_app.py"


class NullSocket:
    def setsockopt(self, *args) -> None:
        pass

    def send_multipart(self, frames, flags=0) -> None:
        pass


def registered(router: Router, worker_id: bytes, load: int = 0):
    router.handle([worker_id, wire.pack(wire.heartbeat(wire.ROLE_WORKER, str(load).encode()))])
    return router.workers[worker_id]


def test_a_silent_worker_gets_no_placement_while_a_fresh_one_exists():
    router = Router(NullSocket())
    silent = registered(router, b"Ww0-silent", load=0)
    fresh = registered(router, b"Ww1-fresh", load=50)    # busier, but heard from
    silent.last_seen = time.monotonic() - router_mod.PLACE_FRESH - 0.1
    assert {router.place(count_join=True).id for _ in range(20)} == {b"Ww1-fresh"}
    assert router.placed_stale == 0


def test_with_no_fresh_worker_the_one_heard_from_last_is_chosen():
    router = Router(NullSocket())
    old = registered(router, b"Ww0-old")
    newer = registered(router, b"Ww1-newer", load=50)
    now = time.monotonic()
    old.last_seen, newer.last_seen = now - 5.0, now - 2.0
    assert router.place(count_join=True).id == b"Ww1-newer"
    assert router.placed_stale == 1


def test_fresh_workers_share_joins_by_load():
    router = Router(NullSocket())
    registered(router, b"Ww0-a")
    registered(router, b"Ww1-b")
    placed = [router.place(count_join=True).id for _ in range(10)]
    assert placed.count(b"Ww0-a") == placed.count(b"Ww1-b") == 5


def join_pid(cluster: Cluster, topic: str, timeout: float) -> tuple[RawWS, int]:
    """Connect, join `topic` and return the client and the pid of the worker that answered;
    the whole round trip must fit in `timeout`."""
    ws = RawWS.connect(cluster.raw_url(0), timeout=timeout)
    ws.send_json(["1", "1", topic, "phx_join", {}])
    reply = ws.recv_json(timeout)
    assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", reply
    return ws, reply[4]["response"]["pid"]


@pytest.mark.timeout(60)
def test_connects_and_joins_during_a_blocking_handler_all_go_to_the_other_worker():
    cluster = Cluster(app=BLOCK_APP, edges=1, workers=2)
    clients = []
    try:
        pids = {int(r["pid"]) for r in cluster.worker_ready}
        blocker, blocked_pid = join_pid(cluster, "block:blocker", timeout=5)
        clients.append(blocker)
        other_pid = (pids - {blocked_pid}).pop()
        block_s = 7.0
        blocker.send_json(["1", "2", "block:blocker", "block", {"s": block_s}])
        started = time.monotonic()
        # Placement is by time since the worker was last heard from: let PLACE_FRESH pass
        # (plus the heartbeat that may have left just before the handler blocked).
        time.sleep(router_mod.PLACE_FRESH + 0.6)
        answered_by = []
        for i in range(8):
            t0 = time.monotonic()
            ws, pid = join_pid(cluster, f"block:new{i}", timeout=2.0)
            clients.append(ws)
            answered_by.append((pid, round(time.monotonic() - t0, 3)))
        assert time.monotonic() - started < block_s, "the block ended before the joins were done"
        assert all(pid == other_pid for pid, _ in answered_by), (blocked_pid, other_pid, answered_by)
        # The blocked worker comes back and answers its own client.
        done = blocker.recv_until(lambda m: m[1] == "2", timeout=block_s + 5)
        assert done[4] == {"status": "ok", "response": {"pid": blocked_pid}}
    finally:
        for ws in clients:
            ws.close()
        cluster.stop()
        cluster.cleanup()
