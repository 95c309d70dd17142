"""Two edges behind nginx round-robin, no stickiness, configured by the shipped deploy/nginx.conf:
WebSocket and LongPoll clients both work, over http:// and over https:// (TLS ending at nginx).

A LongPoll session lives on the edge that created it; with round-robin its later requests
land on the other edge too, which forwards them over the bus to the holder.  nginx's access
log (with the upstream address) proves the requests really were spread over both edges.

The test renders deploy/nginx.conf for its own ports and certificate by replacing the lines
that name them (each must be there exactly once) and includes it in an nginx.conf of its own
(pid, logs and temporary files under the test's directory).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_until
from tests.tlscert import OPENSSL, make_cert

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SHIPPED = ROOT / "deploy" / "nginx.conf"
pytestmark = [pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed"),
              pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")]

# What runs around the shipped file: a foreground nginx whose files are all in the test's folder.
MAIN = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    log_format upstream '$request_method $uri $upstream_addr $status';
    access_log {tmp}/access.log upstream;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/zchannels.conf;
}}
"""


def render_shipped(upstreams: list[str], port: int, tls_port: int, cert: Path, key: Path) -> str:
    """deploy/nginx.conf with the test's edges, ports and certificate in place of its own."""
    text = SHIPPED.read_text()
    servers = "".join(f"    server {u.split('://', 1)[1]};\n" for u in upstreams)
    swaps = {
        "    server 127.0.0.1:4001;\n    server 127.0.0.1:4002;\n": servers,
        "    listen 80;\n": f"    listen 127.0.0.1:{port};\n",
        "    listen 443 ssl;\n": f"    listen 127.0.0.1:{tls_port} ssl;\n",
        "/etc/zchannels/tls/cert.pem": str(cert),
        "/etc/zchannels/tls/key.pem": str(key),
    }
    for old, new in swaps.items():
        assert text.count(old) == 1, f"deploy/nginx.conf should hold {old!r} exactly once"
        text = text.replace(old, new)
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, tmp: Path, upstreams: list[str]):
        self.tmp = tmp
        self.cert, self.key = make_cert(tmp, "nginx")
        conf = tmp / "nginx.conf"
        conf.write_text(MAIN.format(tmp=tmp))
        for attempt in range(5):
            self.port, self.tls_port = free_port(), free_port()
            (tmp / "zchannels.conf").write_text(
                render_shipped(upstreams, self.port, self.tls_port, self.cert, self.key))
            self.proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._listening(self.port) and self._listening(self.tls_port):
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError(f"nginx did not start: {(tmp / 'error.log').read_text()[-2000:]}")

    def _listening(self, port: int, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket"

    @property
    def tls_url(self) -> str:
        return f"wss://127.0.0.1:{self.tls_port}/socket"

    def trusting(self) -> dict[str, str]:
        """The environment of a Node client that trusts nginx's certificate."""
        return {"NODE_EXTRA_CA_CERTS": str(self.cert)}

    def upstreams_for(self, path: str) -> set[str]:
        log = (self.tmp / "access.log")
        if not log.exists():
            return set()
        return {line.split()[2] for line in log.read_text().splitlines()
                if len(line.split()) >= 3 and line.split()[1] == path}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def behind_nginx(module_cluster_factory, tmp_path_factory):
    cluster = module_cluster_factory(edges=2, workers=2)
    nginx = Nginx(tmp_path_factory.mktemp("nginx"), cluster.http_urls)
    yield cluster, nginx
    nginx.stop()


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.mark.timeout(60)
def test_websocket_clients_through_nginx_chat(behind_nginx, js_client):
    _cluster, nginx = behind_nginx
    topic = f"echo:{uid()}"
    clients = [js_client(f"ws{i}") for i in range(4)]
    for i, client in enumerate(clients):
        assert client.connect(nginx.url, {"user": f"u{i}"})["status"] == "open"
        assert client.join("c", topic, on=["bcast"])["status"] == "ok"
    assert clients[0].push("c", "bcast", {"hello": "all"})["status"] == "ok"
    for client in clients:
        client.wait_event({"type": "message", "chan": "c", "event": "bcast"}, timeout=5)
    # nginx logs a WebSocket request when it ends.
    for client in clients:
        client.close()
    wait_until(lambda: len(nginx.upstreams_for("/socket/websocket")) == 2, timeout=10)


@pytest.mark.timeout(90)
def test_longpoll_session_spread_over_both_edges_keeps_working(behind_nginx, js_client):
    _cluster, nginx = behind_nginx
    topic = f"echo:{uid()}"
    lp = js_client("lp")
    ws = js_client("ws")
    assert lp.connect(nginx.url, {"user": "lp"}, transport="longpoll")["status"] == "open"
    assert ws.connect(nginx.url, {"user": "ws"})["status"] == "open"
    assert lp.join("c", topic, on=["bcast"])["status"] == "ok"
    assert ws.join("c", topic, on=["bcast"])["status"] == "ok"
    for n in range(6):
        answer = lp.push("c", "ping", {"n": n})
        assert answer == {"status": "ok", "response": {"n": n}} or (
            answer["status"] == "ok" and answer["response"] == {"n": n}), answer
    # Both directions between the transports, through the balancer.
    assert ws.push("c", "bcast", {"from": "ws"})["status"] == "ok"
    lp.wait_event({"type": "message", "chan": "c", "event": "bcast",
                   "payload": {"from": "ws"}}, timeout=10)
    assert lp.push("c", "bcast", {"from": "lp"})["status"] == "ok"
    ws.wait_event({"type": "message", "chan": "c", "event": "bcast",
                   "payload": {"from": "lp"}}, timeout=10)
    wait_until(lambda: len(nginx.upstreams_for("/socket/longpoll")) == 2, timeout=5)
    assert not lp.find({"type": "socket_close"}), "the LongPoll session broke"


@pytest.mark.timeout(60)
def test_tls_ends_at_nginx_and_the_edges_see_https_from_the_trusted_proxy(cluster_factory, tmp_path,
                                                                          js_client):
    """deploy/nginx.conf's https server: wss:// and LongPoll https:// through nginx to plain
    edges, which (given --trusted-proxies) report the client's scheme as https."""
    cluster = cluster_factory(app="tests/apps/connect_info_app.py", edges=2, workers=1,
                              edge_args=["--trusted-proxies", "127.0.0.1/32"])
    nginx = Nginx(tmp_path, cluster.http_urls)
    try:
        for transport in ("websocket", "longpoll"):
            client = js_client(f"tls-{transport}", env=nginx.trusting())
            assert client.connect(nginx.tls_url, transport=transport)["status"] == "open"
            joined = client.join("c", f"info:{uid()}")
            assert joined["status"] == "ok"
            assert joined["response"] == {"peer": "127.0.0.1", "scheme": "https",
                                          "transport": transport}
        plain = js_client("plain")
        assert plain.connect(nginx.url)["status"] == "open"
        assert plain.join("c", f"info:{uid()}")["response"]["scheme"] == "http"
    finally:
        nginx.stop()
