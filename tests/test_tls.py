"""TLS directly on the edge (--certfile / --keyfile): phoenix.js over wss:// and LongPoll over
https://, with a self-signed certificate the clients verify (its file is their CA), and the
edge's other HTTP endpoints over https://.

Node gets the certificate through NODE_EXTRA_CA_CERTS, so certificate checking stays on in
phoenix.js's WebSocket (the `ws` package) and in its LongPoll (Node's fetch); a client
without it is refused by its own check.  The WebSocket leaves Tornado after the upgrade for
edge/tlstransport.py, so the flood and slow-consumer tests drive that transport's buffered
writes, back-pressure and abort.
"""
from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, Cluster, Proc, wait_until
from tests.tlscert import OPENSSL, make_cert

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")

API_KEY = "tls-test-api-key"
STATUS_TOKEN = "tls-test-status-token"


@pytest.fixture(scope="module")
def cert(tmp_path_factory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_edge(module_cluster_factory, cert):
    certfile, keyfile = cert
    return module_cluster_factory(edges=1, workers=2, edge_args=[
        "--certfile", str(certfile), "--keyfile", str(keyfile), "--api-key", API_KEY,
        "--status-token", STATUS_TOKEN])


def trusting(cert) -> dict[str, str]:
    return {"NODE_EXTRA_CA_CERTS": str(cert[0])}


def verified(cert) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cert[0]))


def get(url: str, cert) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=10, context=verified(cert)) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def metric(url: str, cert, name: str) -> float:
    body = get(url + "/metrics", cert)[2].decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", body, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.mark.timeout(30)
def test_ready_line_and_log_name_https(tls_edge):
    url = tls_edge.http_urls[0]
    assert url.startswith("https://127.0.0.1:")
    assert tls_edge.ws_urls[0].startswith("wss://127.0.0.1:")
    log = tls_edge.edge_procs[0].stderr_text()
    assert f"up on {url}" in log and "TLS on: certificate" in log


@pytest.mark.timeout(60)
def test_phoenix_js_over_wss_and_longpoll_https_push_reply_and_broadcast(tls_edge, cert, js_client):
    topic = f"echo:{uid()}"
    ws = js_client("wss", env=trusting(cert))
    lp = js_client("https-lp", env=trusting(cert))
    assert ws.connect(tls_edge.ws_urls[0], {"user": "ws"})["status"] == "open"
    assert lp.connect(tls_edge.ws_urls[0], {"user": "lp"}, transport="longpoll")["status"] == "open"
    for client in (ws, lp):
        assert client.join("c", topic, on=["bcast", "news"])["status"] == "ok"
        assert client.push("c", "ping", {"over": "tls"}) == {"status": "ok", "response": {"over": "tls"}}
    assert ws.push("c", "binary", binary=b"\x00\x01tls")["status"] == "ok"
    # A broadcast from each transport reaches the other.
    assert ws.push("c", "bcast", {"from": "ws"})["status"] == "ok"
    lp.wait_event({"type": "message", "chan": "c", "event": "bcast", "payload": {"from": "ws"}}, 10)
    assert lp.push("c", "bcast", {"from": "lp"})["status"] == "ok"
    ws.wait_event({"type": "message", "chan": "c", "event": "bcast", "payload": {"from": "lp"}}, 10)
    # ... and so does one posted to /api/broadcast over https.
    req = urllib.request.Request(tls_edge.http_urls[0] + "/api/broadcast", method="POST",
                                 data=json.dumps({"topic": topic, "event": "news",
                                                  "payload": {"via": "https"}}).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=10, context=verified(cert)) as resp:
        assert resp.status == 202
    for client in (ws, lp):
        client.wait_event({"type": "message", "chan": "c", "event": "news",
                           "payload": {"via": "https"}}, 10)
    assert not ws.find({"type": "socket_close"}) and not lp.find({"type": "socket_close"})


@pytest.mark.timeout(60)
def test_two_megabytes_of_broadcasts_arrive_whole_and_in_order_over_wss(tls_edge, cert, js_client):
    """More than the socket buffers hold at once: the TLS transport's own buffer and its
    retries of unfinished writes carry the rest."""
    topic = f"echo:{uid()}"
    client = js_client("flood", env=trusting(cert))
    assert client.connect(tls_edge.ws_urls[0])["status"] == "open"
    assert client.join("c", topic, on=["flood"])["status"] == "ok"
    assert client.push("c", "flood", {"n": 100, "size": 20_000})["status"] == "ok"
    got = client.wait_events({"type": "message", "chan": "c", "event": "flood"}, 100, timeout=20)
    assert [m["payload"]["i"] for m in got] == list(range(100))
    assert all(len(m["payload"]["pad"]) == 20_000 for m in got)
    assert client.push("c", "ping", {"after": "flood"})["response"] == {"after": "flood"}


@pytest.mark.timeout(60)
def test_a_client_that_does_not_trust_the_certificate_is_refused_by_its_own_check(tls_edge, cert,
                                                                                 js_client):
    untrusting = js_client("untrusting")
    answer = untrusting.connect(tls_edge.ws_urls[0], reconnectAfterMs=60_000)
    assert answer["status"] in ("error", "closed"), answer
    error = untrusting.wait_event({"type": "socket_error"})
    assert "certificate" in error["message"], error
    assert not untrusting.find({"type": "socket_open"})
    # The same client with the certificate as its CA gets in: the check is what refused it.
    trusting_client = js_client("trusting", env=trusting(cert))
    assert trusting_client.connect(tls_edge.ws_urls[0])["status"] == "open"


@pytest.mark.timeout(30)
def test_static_status_and_metrics_are_served_over_https(tls_edge, cert):
    url = tls_edge.http_urls[0]
    status, kind, body = get(url + "/js/phoenix.js", cert)
    assert status == 200 and kind.startswith("application/javascript") and b"Socket" in body
    status, kind, body = get(f"{url}/status?status_token={STATUS_TOKEN}", cert)
    assert status == 200 and kind.startswith("text/html") and b"/js/phoenix.js" in body
    status, kind, body = get(url + "/metrics", cert)
    assert status == 200 and b"zchannels_edge_connections" in body


@pytest.mark.timeout(30)
def test_plain_http_on_the_tls_port_fails_cleanly_and_the_edge_serves_on(tls_edge, cert):
    url = tls_edge.http_urls[0]
    port = int(url.rsplit(":", 1)[1])
    before = metric(url, cert, "zchannels_edge_tls_handshake_failures_total")
    for _ in range(3):
        answer = b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            try:
                while chunk := s.recv(4096):
                    answer += chunk
            except ConnectionResetError:   # closed with the rest of the request unread
                pass
        assert not answer.startswith(b"HTTP/")
    wait_until(lambda: metric(url, cert, "zchannels_edge_tls_handshake_failures_total") >= before + 3, 5)
    assert get(url + "/js/phoenix.js", cert)[0] == 200
    edge = tls_edge.edge_procs[0]
    assert edge.alive()
    log = edge.stderr_text()
    assert "TLS handshake with 127.0.0.1:" in log and "Traceback" not in log
    assert "SSL Error on" not in log      # Tornado's line per failure is replaced by the counted one


@pytest.mark.timeout(30)
def test_a_connection_that_never_finishes_its_handshake_is_closed_at_the_header_timeout(
        cluster_factory, cert):
    certfile, keyfile = cert
    edge = cluster_factory(edges=1, workers=1, edge_args=[
        "--certfile", str(certfile), "--keyfile", str(keyfile), "--header-timeout", "1"])
    port = int(edge.http_urls[0].rsplit(":", 1)[1])
    for start in (b"", b"\x16\x03\x01\x00\xf0\x01\x00"):   # silent; half a ClientHello
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(start)
            opened = time.monotonic()
            assert s.recv(100) == b""       # closed, with no answer it could not encrypt
            assert time.monotonic() - opened < 3
    assert "2 header timeouts so far" in edge.edge_procs[0].stderr_text()


@pytest.mark.timeout(30)
def test_sigterm_drains_wss_clients_with_1012_and_the_edge_exits_0(cluster_factory, cert, js_client):
    certfile, keyfile = cert
    edge = cluster_factory(edges=1, workers=1, edge_args=[
        "--certfile", str(certfile), "--keyfile", str(keyfile), "--drain-period", "1"])
    client = js_client("drained", env=trusting(cert))
    assert client.connect(edge.ws_urls[0], reconnectAfterMs=60_000)["status"] == "open"
    assert client.join("c", f"echo:{uid()}")["status"] == "ok"
    assert edge.edge_procs[0].stop(10) == 0
    assert client.wait_event({"type": "socket_close"}, 5)["code"] == 1012


# --- a slow consumer over TLS: back-pressure and the cut-off ----------------------------------

def ws_frame(text: str) -> bytes:
    """A masked client text frame (payloads under 64 KiB)."""
    data = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81, 0x80 | len(data)]) if len(data) < 126 else \
        bytes([0x81, 0x80 | 126]) + len(data).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def open_tls_websocket(port: int, cert, recv_buffer: int = 4096) -> ssl.SSLSocket:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
    raw.settimeout(10)
    raw.connect(("127.0.0.1", port))
    sock = verified(cert).wrap_socket(raw, server_hostname="127.0.0.1")
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"closed during the upgrade: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


@pytest.mark.timeout(60)
def test_a_tls_client_that_stops_reading_is_closed_as_a_slow_consumer_and_cut_off(cluster_factory, cert):
    certfile, keyfile = cert
    edge = cluster_factory(edges=1, workers=1, edge_args=[
        "--certfile", str(certfile), "--keyfile", str(keyfile), "--max-outbound", "65536"])
    url = edge.http_urls[0]
    sock = open_tls_websocket(int(url.rsplit(":", 1)[1]), cert)
    try:
        topic = f"echo:{uid()}"
        sock.sendall(ws_frame(json.dumps(["1", "1", topic, "phx_join", {}])))
        joined = b""
        while b'"phx_reply"' not in joined:     # the join's reply: a few dozen bytes
            chunk = sock.recv(4096)
            assert chunk, f"closed before the join reply: {joined!r}"
            joined += chunk
        assert b'"status":"ok"' in joined, joined
        # 10 MB of broadcasts to a client that reads none of them.
        sock.sendall(ws_frame(json.dumps(["1", "2", topic, "flood", {"n": 200, "size": 50_000}])))
        wait_until(lambda: metric(url, cert, "zchannels_edge_slow_consumer_closes_total") >= 1, 15)
        # Its close frame waits behind the backlog it does not read: cut off after the grace.
        wait_until(lambda: metric(url, cert, "zchannels_edge_close_aborts_total") >= 1, 15)
        wait_until(lambda: 'zchannels_edge_connections{transport="websocket"} 0.0' in
                   get(url + "/metrics", cert)[2].decode(), 5)
    finally:
        sock.close()
    log = edge.edge_procs[0].stderr_text()
    assert "slow consumer" in log and "Traceback" not in log
    assert edge.edge_procs[0].alive()


# --- start-up mistakes ------------------------------------------------------------------------

def start_edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchannels", "edge", "--port", "0",
                           "--bus", "tcp://127.0.0.1:9", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(60)
def test_bad_certfile_or_keyfile_is_one_line_and_exit_code_2(cert, tmp_path):
    certfile, keyfile = map(str, cert)
    _other_cert, other_key = make_cert(tmp_path, "other")
    encrypted = tmp_path / "encrypted.key"
    subprocess.run([OPENSSL, "pkey", "-in", keyfile, "-aes256", "-passout", "pass:secret",
                    "-out", str(encrypted)], check=True, capture_output=True, timeout=30)
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(Path(keyfile).read_bytes())
    unreadable.chmod(0)
    cases = [
        (["--certfile", certfile], "--certfile needs --keyfile"),
        (["--keyfile", keyfile], "--keyfile needs --certfile"),
        (["--certfile", str(tmp_path / "missing.crt"), "--keyfile", keyfile], "cannot read it"),
        (["--certfile", keyfile, "--keyfile", keyfile], "no PEM certificate"),
        (["--certfile", certfile, "--keyfile", certfile], "no PEM private key"),
        (["--certfile", certfile, "--keyfile", str(other_key)], "is not the key of the certificate"),
        (["--certfile", certfile, "--keyfile", str(encrypted)], "encrypted with a passphrase"),
    ]
    if os.geteuid() != 0:    # root reads a mode-0 file anyway
        cases.append((["--certfile", certfile, "--keyfile", str(unreadable)], "Permission denied"))
    for args, text in cases:
        run = start_edge(*args)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 2, (args, run.stderr)
        assert len(lines) == 1 and lines[0].startswith("zchannels edge: error: ") and text in lines[0], \
            (args, run.stderr)
        assert "READY" not in run.stdout


# --- other ways of starting an edge -------------------------------------------------------------

@pytest.mark.timeout(60)
def test_edge_processes_share_the_tls_port_and_compress_over_it(cluster_factory, cert, js_client):
    certfile, keyfile = cert
    edges = cluster_factory(edges=1, workers=1, edge_args=[
        "--certfile", str(certfile), "--keyfile", str(keyfile), "--processes", "2", "--compress"])
    assert edges.http_urls[0].startswith("https://") and edges.edge_ready[0]["processes"] == "2"
    client = js_client("multi", env=trusting(cert))
    assert client.connect(edges.ws_urls[0])["status"] == "open"
    assert "permessage-deflate" in client.wait_event({"type": "socket_open"})["extensions"]
    topic = f"echo:{uid()}"
    assert client.join("c", topic, on=["bcast"])["status"] == "ok"
    assert client.push("c", "ping", {"n": 1})["response"] == {"n": 1}
    assert client.push("c", "bcast", {"text": "compressed " * 100})["status"] == "ok"
    client.wait_event({"type": "message", "chan": "c", "event": "bcast",
                       "payload": {"text": "compressed " * 100}}, 10)


@pytest.mark.timeout(90)
def test_dev_serves_the_chat_example_over_https(cert, js_client):
    certfile, keyfile = cert
    dev = Proc("zchannels", "dev", "--bus", "tcp://127.0.0.1:0", "--port", "0", "-n", "1",
               "--status-token", "off", "--certfile", str(certfile), "--keyfile", str(keyfile),
               "examples/chat/channels.py", name="dev")
    try:
        line = dev.wait_for(lambda: next((l for l in dev.lines if l.startswith("[edge] READY")), None),
                            20, "the edge's READY line")
        http = dict(kv.split("=", 1) for kv in line.split()[2:])["http"]
        assert http.startswith("https://127.0.0.1:")
        dev.wait_for(lambda: f"open {http}" in dev.stderr_text(), 10, "the dev banner")
        dev.wait_for(lambda: any(l.startswith("[workers] READY") for l in dev.lines), 20, "a worker")
        status, _kind, page = get(http + "/", cert)
        assert status == 200 and b"/js/phoenix.js" in page
        client = js_client("dev", env=trusting(cert))
        assert client.connect("wss://" + http[len("https://"):] + "/socket",
                              {"user": "ann"})["status"] == "open"
        assert client.join("c", "room:lobby")["status"] == "ok"
    finally:
        assert dev.stop(15) == 0
        dev.cleanup()


@pytest.mark.timeout(120)
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")
def test_chat_page_over_https_in_chromium_websocket_tab_and_longpoll_tab(cert, tmp_path):
    certfile, keyfile = cert
    cluster = Cluster(app="examples/chat/channels.py", edges=1, workers=1, edge_args=[
        "--static", "examples/chat/static", "--certfile", str(certfile), "--keyfile", str(keyfile)])
    try:
        run = subprocess.run(["node", "tests/js/browser_chat.js", cluster.http_urls[0], str(tmp_path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert run.returncode == 0, f"browser run failed:\n{run.stderr[-3000:]}\n{cluster.stderr()}"
        shown = json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        cluster.stop()
        cluster.cleanup()
    for tab in ("websocket_tab", "longpoll_tab"):
        assert "hello from the websocket tab" in shown[tab]
        assert "hello from the longpoll tab" in shown[tab]
    assert shown["longpoll_requests"] > 0
