"""Two edges behind nginx round-robin, no stickiness: WebSocket and LongPoll clients both work.

A LongPoll session lives on the edge that created it; with round-robin its later requests
land on the other edge too, which forwards them over the bus to the holder.  nginx's access
log (with the upstream address) proves the requests really were spread over both edges.
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

from tests.conftest import wait_until

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed")

CONFIG = """
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
    upstream edges {{
{servers}
    }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://edges;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 60s;
            proxy_buffering off;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, tmp: Path, upstreams: list[str]):
        self.tmp = tmp
        servers = "\n".join(f"        server {u.split('://', 1)[1]};" for u in upstreams)
        for attempt in range(5):
            self.port = free_port()
            conf = tmp / "nginx.conf"
            conf.write_text(CONFIG.format(tmp=tmp, servers=servers, port=self.port))
            self.proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._listening():
                return
            self.proc.kill()
            self.proc.wait()
        raise RuntimeError(f"nginx did not start: {(tmp / 'error.log').read_text()[-2000:]}")

    def _listening(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/socket"

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
