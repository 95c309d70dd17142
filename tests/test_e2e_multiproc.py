"""`zchannels edge --processes 2`: two edge processes share one port (SO_REUSEPORT); clients
spread over both, talk to each other, and a dead child is replaced."""
from __future__ import annotations

import os
import signal
import uuid

import pytest

from tests.conftest import wait_until


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def socket_count(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


@pytest.mark.timeout(90)
def test_edge_processes_share_a_port_and_replace_a_dead_one(cluster_factory, js_client):
    cluster = cluster_factory(edges=1, workers=2, edge_args=["--processes", "2"])
    assert cluster.edge_ready[0]["processes"] == "2"
    parent = cluster.edge_procs[0].pid
    kids = children(parent)
    assert len(kids) == 2
    before = {pid: socket_count(pid) for pid in kids}

    topic = f"echo:{uuid.uuid4().hex[:10]}"
    clients = [js_client(f"c{i}") for i in range(12)]
    for i, client in enumerate(clients):
        assert client.connect(cluster.ws_urls[0], {"user": f"u{i}"})["status"] == "open"
        assert client.join("c", topic, on=["bcast"])["status"] == "ok"
    grew = [pid for pid in kids if socket_count(pid) > before[pid]]
    assert len(grew) == 2, "the kernel should spread 12 connections over both processes"
    assert clients[0].push("c", "bcast", {"to": "all"})["status"] == "ok"
    for client in clients:
        client.wait_event({"type": "message", "chan": "c", "event": "bcast"}, timeout=5)

    os.kill(kids[0], signal.SIGKILL)
    wait_until(lambda: len([p for p in children(parent) if p not in kids]) == 1, timeout=15)
    late = js_client("late")
    for _ in range(6):   # whichever process the kernel picks, connecting works
        assert late.connect(cluster.ws_urls[0], {"user": "late"})["status"] == "open"
        late.disconnect()
