"""HTTP before the WebSocket upgrade, against hostile clients: header and body deadlines, body
limits per route, request-body bytes in flight, the LongPoll token and the API key checked
before the body, pending-connection caps per peer address and per edge, the descriptor
reserve, and forwarding headers believed only from trusted proxies (docs/security.md).

Attackers connect from 127.0.0.2 and up (every 127/8 address reaches loopback), well-behaved
clients from 127.0.0.1, so the caps keyed by peer address tell them apart.
"""
from __future__ import annotations

import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest

from tests.conftest import Cluster, Proc, wait_until
from tests.rawws import RawWS

APP = "tests/apps/connect_info_app.py"
API_KEY = "limits-test-key"


@dataclass
class Edge:
    proc: Proc
    url: str
    id: str

    @property
    def port(self) -> int:
        return urlsplit(self.url).port

    @property
    def pid(self) -> int:
        return self.proc.pid


@pytest.fixture(scope="module")
def bus():
    """A broker and one worker running the connect_info app; each test starts its own edges."""
    cluster = Cluster(app=APP, edges=0, workers=1)
    yield cluster
    cluster.stop()
    cluster.cleanup()


@pytest.fixture
def start_edge(bus):
    procs: list[Proc] = []

    def start(*args: str, max_open_files: int | None = None) -> Edge:
        proc = Proc("zchannels.edge", "--bus", bus.bus, "--port", "0", "--host", "127.0.0.1", *args,
                    name=f"edge{len(procs)}", max_open_files=max_open_files)
        procs.append(proc)
        ready = proc.wait_ready(1, 10)[0]
        return Edge(proc, ready["http"], ready["edge"])

    yield start
    for proc in procs:
        proc.stop()
        assert "Traceback" not in proc.stderr_text(), proc.stderr_text()[-4000:]
        proc.cleanup()


# --- raw HTTP on sockets ----------------------------------------------------------------------
def dial(edge: Edge, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", edge.port))
    return s


def head(method: str, path: str, headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(s: socket.socket) -> tuple[int, bytes]:
    """Status and body of one Content-Length framed HTTP/1.1 answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError(f"closed before a whole answer: {data!r}")
        data += chunk
    top, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in top.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(top.split(b" ", 2)[1]), body


def get(edge: Edge, path: str, source: str = "127.0.0.1") -> tuple[int, bytes]:
    with dial(edge, source) as s:
        s.sendall(head("GET", path, {"Connection": "close"}))
        return read_answer(s)


def api_head(length: int, key: str | None = API_KEY, **extra) -> bytes:
    headers = {"Content-Type": "application/json", "Content-Length": str(length), **extra}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return head("POST", "/api/broadcast", headers)


def broadcast_body(size: int) -> bytes:
    """A valid /api/broadcast body of exactly ``size`` bytes."""
    doc = {"topic": "info:limits", "event": "pad", "payload": {"pad": ""}}
    doc["payload"]["pad"] = "x" * (size - len(json.dumps(doc, separators=(",", ":"))))
    return json.dumps(doc, separators=(",", ":")).encode()


def counter(edge: Edge, name: str) -> float:
    status, text = get(edge, "/metrics")
    assert status == 200
    for line in text.decode().splitlines():
        if line.startswith(f"zchannels_edge_{name}_total "):
            return float(line.split()[1])
    raise AssertionError(f"no counter {name} in /metrics")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def longpoll_session(edge: Edge) -> str:
    status, body = get(edge, "/socket/longpoll?vsn=2.0.0")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == 410, answer
    return answer["token"]


# --- deadlines ---------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_slowloris_headers_are_cut_at_the_header_deadline(start_edge):
    """A header line every 0.25 s keeps an idle timer happy; the deadline cuts it at 1 s."""
    edge = start_edge("--header-timeout", "1")
    socks = []
    for i in range(20):
        s = dial(edge, f"127.0.0.{10 + i}")
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    t0 = time.monotonic()
    closed_at: dict[int, float] = {}
    answers: dict[int, bytes] = {i: b"" for i in range(len(socks))}
    n = 0
    while len(closed_at) < len(socks) and time.monotonic() - t0 < 10:
        open_ = [i for i in range(len(socks)) if i not in closed_at and not answers[i]]
        for i in open_:
            try:
                socks[i].sendall(f"X-Trickle-{n}: {n}\r\n".encode())
            except OSError:
                pass
        n += 1
        waiting = [socks[i] for i in range(len(socks)) if i not in closed_at]
        readable, _, _ = select.select(waiting, [], [], 0.25)
        for s in readable:
            i = socks.index(s)
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            answers[i] += data
            if not data:
                closed_at[i] = time.monotonic() - t0
    for s in socks:
        s.close()
    assert len(closed_at) == len(socks), f"still open after 10 s: {len(socks) - len(closed_at)}"
    assert 0.8 <= min(closed_at.values()) and max(closed_at.values()) <= 2.5, closed_at
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers.values() if a), answers
    assert counter(edge, "http_header_timeouts") == len(socks)
    assert "header timeouts so far" in edge.proc.stderr_text()


@pytest.mark.timeout(60)
def test_an_idle_keepalive_connection_is_closed_quietly_at_the_header_deadline(start_edge):
    edge = start_edge("--header-timeout", "1")
    with dial(edge, "127.0.0.9") as s:
        s.sendall(head("GET", "/metrics"))
        assert read_answer(s)[0] == 200
        t0 = time.monotonic()
        assert s.recv(100) == b""                  # no 408: nothing was asked
        assert 0.8 <= time.monotonic() - t0 <= 2.5
    assert counter(edge, "http_header_timeouts") == 0


@pytest.mark.timeout(60)
def test_a_slow_body_is_cut_at_the_body_deadline(start_edge):
    edge = start_edge("--body-timeout", "1", "--api-key", API_KEY)
    s = dial(edge, "127.0.0.3")
    s.sendall(api_head(100_000))
    t0 = time.monotonic()
    while not select.select([s], [], [], 0.2)[0]:
        s.sendall(b"x" * 100)
        assert time.monotonic() - t0 < 10, "the slow body was never cut"
    status, body = read_answer(s)
    elapsed = time.monotonic() - t0
    s.close()
    assert status == 408 and b"--body-timeout" in body
    assert 0.8 <= elapsed <= 2.5, elapsed
    assert counter(edge, "http_body_timeouts") == 1


# --- checks from the headers, before the body ----------------------------------------------------
@pytest.mark.timeout(90)
def test_longpoll_posts_without_a_session_are_answered_before_their_bodies(start_edge):
    """100 POSTs of 7.9 MB at once, without a token or with a token for no session: each gets
    {"status":410} from its headers; the body then has nowhere to go, and the edge's memory
    stays where it was."""
    edge = start_edge()
    size = 7_900_000
    forged = f"lp1.{edge.id}.999999.{'A' * 22}"   # well-formed, names this edge, no such session
    baseline = rss_mb(edge.pid)
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.wait(0.05):
            peak.append(rss_mb(edge.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()

    def attack(i: int) -> tuple[int, bytes, str]:
        headers = {"Content-Type": "application/x-ndjson", "Content-Length": str(size)}
        if i % 2:
            headers["X-Phoenix-Longpoll-Token"] = forged
        with dial(edge, f"127.0.1.{i + 1}") as s:
            s.sendall(head("POST", "/socket/longpoll?vsn=2.0.0", headers))
            status, body = read_answer(s)
            try:
                s.sendall(b"x" * size)
                fate = "sent"
            except (BrokenPipeError, ConnectionResetError):
                fate = "reset"
            except socket.timeout:
                fate = "stalled"
            return status, body, fate

    try:
        with ThreadPoolExecutor(100) as pool:
            results = list(pool.map(attack, range(100)))
    finally:
        done.set()
        sampler.join(2)
    assert all(status == 200 and json.loads(body) == {"status": 410} for status, body, _ in results)
    assert {fate for _, _, fate in results} == {"reset"}
    assert max(peak) - baseline < 40, f"RSS {baseline:.0f} MB -> peak {max(peak):.0f} MB"
    assert counter(edge, "longpoll_posts_refused") == 100


@pytest.mark.timeout(60)
def test_the_api_key_is_checked_before_the_body(start_edge):
    edge = start_edge("--api-key", API_KEY)
    for key in (None, "wrong"):
        with dial(edge, "127.0.0.4") as s:
            s.sendall(api_head(3_000_000, key=key))   # under --max-api-body; never sent
            status, body = read_answer(s)
            assert status == 401 and b"API key" in body
    with dial(edge) as s:
        body = broadcast_body(200)
        s.sendall(api_head(len(body)) + body)
        assert read_answer(s) == (202, b'{"accepted":1}')
    assert counter(edge, "api_key_refusals") == 2


# --- body sizes ------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_bodies_over_their_route_limit_get_413(start_edge):
    edge = start_edge("--api-key", API_KEY, "--max-api-body", "10000", "--max-frame-size", "1000")
    # Everything but LongPoll and the API: 64 KiB.
    with dial(edge) as s:
        s.sendall(head("POST", "/metrics", {"Content-Length": "70000"}))
        assert read_answer(s)[0] == 413
    # A client that sends its body without waiting still reads the answer (no reset).
    with dial(edge) as s:
        s.sendall(head("POST", "/metrics", {"Content-Length": "300000"}) + b"x" * 300_000)
        assert read_answer(s)[0] == 413
    # The API: --max-api-body, decided from Content-Length before the body...
    with dial(edge) as s:
        s.sendall(api_head(10_001))
        status, body = read_answer(s)
        assert status == 413 and b"at most 10000" in body
    with dial(edge) as s:
        body = broadcast_body(10_000)
        s.sendall(api_head(len(body)) + body)
        assert read_answer(s)[0] == 202
    # ...or counted while a chunked body streams in.
    with dial(edge) as s:
        s.sendall(head("POST", "/api/broadcast", {"Authorization": f"Bearer {API_KEY}",
                                                  "Transfer-Encoding": "chunked"}))
        s.sendall(b"".join(b"fa0\r\n" + b"x" * 4000 + b"\r\n" for _ in range(3)))
        assert read_answer(s)[0] == 413
    # LongPoll: a batch of 100 frames of --max-frame-size (with line ends) and no more.
    token = longpoll_session(edge)
    with dial(edge) as s:
        s.sendall(head("POST", "/socket/longpoll?vsn=2.0.0", {
            "X-Phoenix-Longpoll-Token": token, "Content-Type": "application/x-ndjson",
            "Content-Length": str(100 * 1002 + 1)}))
        assert read_answer(s)[0] == 413
    with dial(edge) as s:
        frame = b'[null,"1","phoenix","heartbeat",{}]'
        s.sendall(head("POST", "/socket/longpoll?vsn=2.0.0", {
            "X-Phoenix-Longpoll-Token": token, "Content-Type": "application/x-ndjson",
            "Content-Length": str(len(frame))}) + frame)
        assert read_answer(s) == (200, b'{"status":200}')
    assert counter(edge, "http_body_too_large") == 5


@pytest.mark.timeout(60)
def test_bodies_over_the_bytes_in_flight_get_503(start_edge):
    edge = start_edge("--api-key", API_KEY, "--max-api-body", "2000000",
                      "--max-body-inflight", "1000000")
    first = broadcast_body(900_000)
    holder = dial(edge, "127.0.0.5")
    holder.sendall(api_head(len(first)) + first[:1000])   # reserves its 900 KB of the 1 MB
    assert get(edge, "/metrics")[0] == 200                 # the edge has read it by now
    with dial(edge, "127.0.0.6") as s:
        s.sendall(api_head(200_000) + b"x" * 1000)
        status, body = read_answer(s)
        assert status == 503 and b"in flight" in body
    holder.sendall(first[1000:])                          # answered: its bytes leave the count
    assert read_answer(holder) == (202, b'{"accepted":1}')
    holder.close()
    with dial(edge, "127.0.0.6") as s:
        body = broadcast_body(200_000)
        s.sendall(api_head(len(body)) + body)
        assert read_answer(s) == (202, b'{"accepted":1}')
    assert counter(edge, "http_body_inflight_refusals") == 1


# --- connections that wait for their request ---------------------------------------------------------
def unfinished(edge: Edge, source: str) -> socket.socket:
    s = dial(edge, source)
    s.sendall(b"GET /metrics HTTP/1.1\r\n")   # and nothing more
    return s


@pytest.mark.timeout(60)
def test_pending_connections_are_capped_per_peer_and_per_edge(start_edge, js_client):
    edge = start_edge("--max-pending-per-peer", "5", "--max-pending", "12")
    hoard = [unfinished(edge, "127.0.0.2") for _ in range(5)]
    with dial(edge, "127.0.0.2") as extra:
        assert read_answer(extra)[0] == 503
        assert extra.recv(100) == b""
    assert get(edge, "/metrics", "127.0.0.3")[0] == 200        # other addresses are served
    canary = js_client("canary")                               # 127.0.0.1 connects and joins
    assert canary.connect(edge.url.replace("http", "ws") + "/socket")["status"] == "open"
    joined = canary.join("c", "info:canary")
    assert joined["status"] == "ok" and joined["response"]["peer"] == "127.0.0.1", joined

    # The edge as a whole: 12 waiting connections, then nobody with one waiting already; an
    # address with none still gets in (the overflow), so a spread slowloris locks nobody out.
    hoard += [unfinished(edge, f"127.0.0.{10 + i}") for i in range(7)]
    with dial(edge, "127.0.0.10") as extra:
        assert read_answer(extra)[0] == 503
    assert get(edge, "/metrics", "127.0.0.30")[0] == 200
    # Requests that finish free their places.
    for s in hoard:
        s.sendall(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert read_answer(s)[0] == 200
        s.close()
    assert get(edge, "/metrics", "127.0.0.2")[0] == 200
    assert counter(edge, "pending_peer_refusals") == 1
    assert counter(edge, "pending_total_refusals") == 1
    assert "(--max-pending-per-peer)" in edge.proc.stderr_text()


@pytest.mark.timeout(60)
def test_near_the_descriptor_limit_metrics_and_new_clients_still_get_in(start_edge, js_client):
    edge = start_edge("--max-pending-per-peer", "1000", max_open_files=128)
    hoard = [unfinished(edge, "127.0.0.2") for _ in range(120)]   # more than it can hold
    assert get(edge, "/metrics")[0] == 200                          # barrier: all accepted
    refused = [s for s in hoard if select.select([s], [], [], 0)[0]]
    assert refused, "no connection was refused to keep the reserve"
    for s in refused:
        assert read_answer(s)[0] == 503
    assert counter(edge, "descriptor_reserve_refusals") == len(refused)
    canary = js_client("canary")
    assert canary.connect(edge.url.replace("http", "ws") + "/socket")["status"] == "open"
    assert canary.join("c", "info:reserve")["status"] == "ok"
    assert get(edge, "/metrics")[0] == 200
    assert "out of file descriptors" not in edge.proc.stderr_text()
    for s in hoard:
        s.close()


# --- peer addresses ----------------------------------------------------------------------------------
FORGED = {"X-Forwarded-For": "7.7.7.7", "X-Real-Ip": "7.7.7.7", "X-Scheme": "https",
          "X-Forwarded-Proto": "https"}


def seen_by_connect(edge: Edge, headers: dict) -> dict:
    ws = RawWS.connect(f"ws://127.0.0.1:{edge.port}/socket/websocket?vsn=2.0.0", headers=headers)
    try:
        ws.send_json(["1", "1", "info:peer", "phx_join", {}])
        reply = ws.recv_json(5)
    finally:
        ws.close()
    assert reply[3] == "phx_reply" and reply[4]["status"] == "ok", reply
    return reply[4]["response"]


@pytest.mark.timeout(60)
def test_forwarding_headers_count_only_from_trusted_proxies(start_edge):
    direct = start_edge()
    behind = start_edge("--trusted-proxies", "127.0.0.1/32,10.0.0.0/8")
    assert seen_by_connect(direct, FORGED) == {"peer": "127.0.0.1", "scheme": "http",
                                               "transport": "websocket"}
    assert seen_by_connect(behind, FORGED) == {"peer": "7.7.7.7", "scheme": "https",
                                               "transport": "websocket"}
    # Behind two trusted proxies the client is the right-most hop that is not one of them.
    chain = {"X-Forwarded-For": "6.6.6.6, 8.8.8.8, 10.1.2.3"}
    assert seen_by_connect(behind, chain)["peer"] == "8.8.8.8"
    assert seen_by_connect(behind, {})["peer"] == "127.0.0.1"
