"""Connections at the edge's limits: out of file descriptors, and clients that hang up while
their connect runs.  Neither may spin, flood the log, or hurt clients already connected."""
from __future__ import annotations

import base64
import os
import socket
import time
import uuid
from urllib.parse import urlsplit

import pytest

from tests.conftest import Proc, wait_until


def upgrade_request(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(60)
def test_out_of_file_descriptors_pauses_accepting_without_spinning(cluster_factory, js_client):
    cluster = cluster_factory(edges=0, workers=1)
    edge = Proc("zchannels.edge", "--bus", cluster.bus, "--port", "0", name="edge-64", max_open_files=64)
    cluster.procs.append(edge)
    url = edge.wait_ready(1, 10)[0]["http"]
    host, port = urlsplit(url).hostname, urlsplit(url).port
    first = js_client("first")
    assert first.connect(url.replace("http", "ws") + "/socket", {"user": "a"})["status"] == "open"
    assert first.join("c", f"echo:{uuid.uuid4().hex[:8]}")["status"] == "ok"

    flood = []
    for i in range(80):   # more than the 64 descriptors the edge may hold
        # One upgrade at a time, each from its own address: clients hoarding connections near
        # the limit are refused earlier, by the descriptor reserve (test_e2e_http_limits.py).
        s = socket.socket()
        s.settimeout(2)
        s.bind((f"127.0.0.{2 + i}", 0))
        s.connect((host, port))
        s.sendall(upgrade_request(host, port))
        flood.append(s)
        try:
            s.recv(100)       # 101 Switching Protocols
        except socket.timeout:
            break             # left in the backlog: the edge is out of descriptors
    wait_until(lambda: "out of file descriptors" in edge.stderr_text(), timeout=10)
    before, t0 = cpu_seconds(edge.pid), time.monotonic()
    time.sleep(2.0)   # measuring a rate: the edge must stay mostly idle over this window
    busy = (cpu_seconds(edge.pid) - before) / (time.monotonic() - t0)
    assert busy < 0.5, f"edge used {busy:.0%} of a core while out of descriptors"
    assert edge.stderr_text().count("Traceback") == 0
    assert first.push("c", "ping", {"n": 1})["status"] == "ok"   # the connected client is served
    for s in flood:
        s.close()
    late = js_client("late")   # descriptors are free again: new clients get in
    wait_until(lambda: late.connect(url.replace("http", "ws") + "/socket", {"user": "b"}, timeout=3)
               ["status"] == "open", timeout=15, interval=0.2)


@pytest.mark.timeout(60)
def test_clients_hanging_up_during_connect_leave_no_trace(cluster):
    url = cluster.http_urls[0]
    host, port = urlsplit(url).hostname, urlsplit(url).port
    edge = cluster.edge_procs[0]
    for _ in range(100):
        s = socket.create_connection((host, port), 2)
        s.sendall(upgrade_request(host, port))
        s.close()
    wait_until(lambda: "hung up while connect ran" in edge.stderr_text(), timeout=10)
    assert "Traceback" not in edge.stderr_text()
