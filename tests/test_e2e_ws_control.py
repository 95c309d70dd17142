"""Hostile WebSocket clients against a real edge: ping floods and abandoned big frames.

A ping flood from a client that never reads is closed and the edge's memory stays bounded; a
ping flood from clients that do read does not starve another client's heartbeats; every ping
within the rate is answered, in order; pings over --max-rate close the connection 1008; the
memory of unfinished big frames comes back when their connections close, and while they are
open they hold no more than --max-inbound-buffered (the rest are closed 1013).  Memory is the
edge process's VmRSS from /proc.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.request

import pytest

from tests.blockingws import BlockingWS, client_frame as frame
from tests.conftest import wait_until

MB = 1 << 20
MAX_OUTBOUND = MB


@pytest.fixture(scope="module")
def open_cluster(module_cluster_factory):
    """No rate limit, so the floods reach the read loop and the outbound bound; a budget for
    unfinished messages big enough to hold every abandoned frame of the memory test."""
    return module_cluster_factory(edges=1, workers=1, edge_args=[
        "--max-rate", "0", "--max-outbound", str(MAX_OUTBOUND), "--max-inbound-buffered", str(512 * MB)])


INBOUND_BUDGET = 16 * MB


@pytest.fixture(scope="module")
def budget_cluster(module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1, edge_args=[
        "--max-inbound-buffered", str(INBOUND_BUDGET)])


@pytest.fixture(scope="module")
def rate_cluster(module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1, edge_args=["--max-rate", "20", "--max-burst", "10"])


def edge_rss(cluster) -> int:
    with open(f"/proc/{cluster.edge_procs[0].pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class RawSock(BlockingWS):
    """A client that decides when (and whether) it reads."""

    def __init__(self, cluster, name: str, rcvbuf: int | None = None):
        super().__init__(cluster.http_urls[0], name, rcvbuf)

    def heartbeat(self, ref: str) -> float:
        """Round trip of a Phoenix heartbeat, in seconds (pongs and other frames skipped)."""
        start = time.monotonic()
        self.sock.sendall(frame(0x1, json.dumps([None, ref, "phoenix", "heartbeat", {}]).encode()))
        while True:
            opcode, payload = self.recv_frame()
            if opcode == 0x1 and json.loads(payload)[1] == ref:
                return time.monotonic() - start

    read_until_cut = BlockingWS.read_until_closed


def flood(sock: socket.socket, chunk: bytes, stop: threading.Event, outcome: dict,
          persist: bool = False) -> None:
    """Send `chunk` over and over until `stop`, or until the edge stops taking it for a second
    (unless `persist`), or cuts the connection."""
    sock.settimeout(1.0)
    sent = 0
    while not stop.is_set():
        try:
            sock.sendall(chunk)
            sent += len(chunk)
        except socket.timeout:
            if not persist:
                outcome["end"] = "edge stopped reading"
                break
        except OSError as exc:
            outcome["end"] = f"cut: {exc.__class__.__name__}"
            break
    outcome.setdefault("end", "stopped")
    outcome["sent"] = sent


def drain(sock: socket.socket, stop: threading.Event) -> None:
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            if not sock.recv(1 << 16):
                return
        except socket.timeout:
            continue
        except OSError:
            return


# ---- pongs -------------------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_reading_client_gets_a_pong_for_every_ping_in_order(open_cluster):
    c = RawSock(open_cluster, "pinger")
    c.sock.sendall(b"".join(frame(0x9, b"ping-%02d" % i) for i in range(50)))     # one write
    pongs = []
    while not pongs or pongs[-1] != b"ping-49":
        opcode, payload = c.recv_frame()
        assert opcode == 0xA, (opcode, payload)
        pongs.append(payload)
    assert pongs == [b"ping-%02d" % i for i in range(50)]
    assert c.heartbeat("after") < 5                      # and the connection carries on
    c.close()


@pytest.mark.timeout(30)
def test_pings_over_the_rate_close_the_connection_1008(rate_cluster):
    c = RawSock(rate_cluster, "pingflood")
    c.sock.sendall(b"".join(frame(0x9, b"%d" % i) for i in range(400)))
    pongs, code = [], None
    while code is None:
        opcode, payload = c.recv_frame()
        if opcode == 0xA:
            pongs.append(int(payload))
        elif opcode == 0x8:
            code, reason = int.from_bytes(payload[:2], "big"), payload[2:].decode()
    assert (code, reason) == (1008, "rate limit exceeded")
    assert pongs and max(pongs) < 20, pongs          # only pings within the burst were answered
    wait_until(lambda: "closing with 1008" in rate_cluster.edge_procs[0].stderr_text(), 5)
    c.close()


# ---- floods ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_ping_flood_that_never_reads_is_cut_and_the_edge_stays_bounded(open_cluster):
    """Pongs pile up unread: past --max-outbound the edge stops reading the client, closes 1013
    and cuts the connection after the grace period; its memory stays bounded meanwhile."""
    baseline = edge_rss(open_cluster)
    c = RawSock(open_cluster, "deaf", rcvbuf=4096)
    stop, outcome = threading.Event(), {}
    chunk = b"".join(frame(0x9, b"x" * 125) for _ in range(2000))
    sender = threading.Thread(target=flood, args=(c.sock, chunk, stop, outcome), daemon=True)
    sender.start()
    peak, deadline = baseline, time.monotonic() + 10
    while sender.is_alive() and time.monotonic() < deadline:
        peak = max(peak, edge_rss(open_cluster))
        time.sleep(0.02)
    stop.set()
    sender.join(5)
    assert outcome["end"] != "stopped", "the edge kept reading an unread ping flood for 10 s"
    c.sock.settimeout(15)
    assert c.read_until_cut() in (None, 1013)
    peak = max(peak, edge_rss(open_cluster))
    assert peak - baseline < 150 * MB, f"edge RSS {baseline / MB:.0f} -> {peak / MB:.0f} MB"
    stderr = open_cluster.edge_procs[0].stderr_text()
    assert "slow consumer" in stderr and "closing with 1013" in stderr
    c.close()


@pytest.mark.timeout(60)
def test_a_ping_flood_from_readers_does_not_starve_a_canary(open_cluster):
    canary = RawSock(open_cluster, "canary")
    flooders = [RawSock(open_cluster, f"flooder{i}") for i in range(4)]
    stop = threading.Event()
    chunk = b"".join(frame(0x9, b"f" * 16) for _ in range(5000))
    threads = []
    for f in flooders:
        threads.append(threading.Thread(target=flood, args=(f.sock, chunk, stop, {}, True), daemon=True))
        threads.append(threading.Thread(target=drain, args=(f.sock, stop), daemon=True))
    for t in threads:
        t.start()
    try:
        rtts = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            rtts.append(canary.heartbeat(str(len(rtts))))
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    rtts.sort()
    assert len(rtts) >= 20
    assert rtts[-1] < 0.5, f"canary round trips p50 {rtts[len(rtts) // 2] * 1e3:.0f} ms, " \
                           f"max {rtts[-1] * 1e3:.0f} ms"
    for f in flooders:
        f.close()
    canary.close()


# ---- memory ------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_memory_of_unfinished_big_frames_comes_back_when_they_close(open_cluster):
    """Three times over, 100 connections each send 1 MB of a frame announced as 1,040,000
    bytes, then hang up: each time the edge's RSS comes back near its baseline (the buffers
    are freed at once, and edge/memtrim.py hands the heap's free pages back)."""
    n, size = 100, 1_000_000
    baseline = edge_rss(open_cluster)
    body = frame(0x2, os.urandom(size), length=1_040_000)
    for round_ in range(3):
        clients = [RawSock(open_cluster, f"big{i}") for i in range(n)]
        for c in clients:
            c.sock.sendall(body)
        wait_until(lambda: edge_rss(open_cluster) - baseline > 0.8 * n * size, 20,
                   message=lambda: f"edge RSS only {edge_rss(open_cluster) / MB:.0f} MB "
                                   f"(baseline {baseline / MB:.0f} MB)")
        peak = edge_rss(open_cluster)
        for c in clients:
            c.close()
        wait_until(lambda: edge_rss(open_cluster) - baseline < 30 * MB, 10,
                   message=lambda: f"round {round_ + 1}: edge RSS {baseline / MB:.0f} -> {peak / MB:.0f} -> "
                                   f"{edge_rss(open_cluster) / MB:.0f} MB after the connections closed")


def edge_metric(cluster, name: str) -> float:
    with urllib.request.urlopen(cluster.http_urls[0] + "/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def request(c: RawSock, ref: str, topic: str, event: str, payload: dict) -> dict:
    """Send a Phoenix message and return its reply's payload (other frames skipped)."""
    c.sock.sendall(frame(0x1, json.dumps(["1", ref, topic, event, payload]).encode()))
    while True:
        opcode, data = c.recv_frame()
        if opcode == 0x1:
            msg = json.loads(data)
            if msg[1] == ref and msg[3] == "phx_reply":
                return msg[4]


@pytest.mark.timeout(90)
def test_unfinished_big_frames_hold_no_more_than_the_inbound_budget(budget_cluster):
    """100 connections each send 1 MB of a frame announced as 1,040,000 bytes, against an edge
    with --max-inbound-buffered 16 MiB: those that would go over it are closed 1013 (counted in
    /metrics, logged), the edge's RSS peak stays under baseline + budget + 60 MB (the 64 KiB each
    holds for free, and the allocator's slack), a canary on 127.0.0.1 keeps its heartbeats and a
    fresh one joins, and once the rest hang up the whole budget is given back."""
    n, size, free = 100, 1_000_000, 64 * 1024
    cluster = budget_cluster
    canary = RawSock(cluster, "canary")
    assert request(canary, "1", "echo:canary", "phx_join", {})["status"] == "ok"
    baseline = edge_rss(cluster)
    peak = [baseline]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], edge_rss(cluster))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    body = frame(0x2, os.urandom(size), length=1_040_000)
    clients = [RawSock(cluster, f"big{i}") for i in range(n)]
    try:
        for c in clients:
            try:
                c.sock.sendall(body)
            except OSError:       # closed 1013 before it had sent all of it
                pass
        most_held = INBOUND_BUDGET // (size - free)
        wait_until(lambda: edge_metric(cluster, "zchannels_edge_inbound_budget_closes_total")
                   >= n - most_held, 20,
                   message=lambda: "only %d connections closed for the budget" % edge_metric(
                       cluster, "zchannels_edge_inbound_budget_closes_total"))
        held = edge_metric(cluster, "zchannels_edge_inbound_buffered_bytes")
        assert 0 < held <= INBOUND_BUDGET
        assert canary.heartbeat("hb1") < 2.0
        fresh = RawSock(cluster, "fresh")
        assert request(fresh, "1", "echo:fresh", "phx_join", {})["status"] == "ok"
        assert request(fresh, "2", "echo:fresh", "ping", {"x": 1}) == {"status": "ok", "response": {"x": 1}}
        fresh.close()
        sampling.set()
        sampler.join(5)
        assert peak[0] - baseline < INBOUND_BUDGET + 60 * MB, (
            f"edge RSS {baseline / MB:.0f} -> peak {peak[0] / MB:.0f} MB")
        codes = []
        for c in clients:
            c.sock.settimeout(0.2)
            try:
                codes.append(c.read_until_cut())
            except (socket.timeout, OSError):
                codes.append("open")
        assert codes.count(1013) >= n - most_held - 5, codes   # (a few may see only the reset)
        assert codes.count("open") <= most_held, codes
    finally:
        sampling.set()
        for c in clients:
            c.close()
    wait_until(lambda: edge_metric(cluster, "zchannels_edge_inbound_buffered_bytes") == 0, 10,
               message="the budget was not given back when the connections closed")
    assert canary.heartbeat("hb2") < 2.0
    canary.close()
    logged = [line for line in cluster.edge_procs[0].stderr_text().splitlines()
              if "--max-inbound-buffered" in line]
    assert logged and "closing with 1013" in logged[0]
    assert len(logged) < n - most_held      # one line a second, not one per connection
