"""check_origin end to end (docs/protocol.md §2.5, §10.4), both transports, raw requests with the
Origin header a browser would send.

One bus, three edges: the default (only pages from the host the request was made to),
`--allowed-origins` (a list replaces that default) and `--check-origin false`.  A refused
WebSocket upgrade is HTTP 403; a refused LongPoll request is HTTP 200 with {"status":403}.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pytest

from tests.conftest import LOG_LEVEL, Proc
from tests.rawws import HandshakeRefused, RawWS

ALLOWED = "https://app.example.com,//*.trusted.test"


@pytest.fixture(scope="module")
def edges(module_cluster_factory):
    """{"default" | "list" | "off": http://127.0.0.1:PORT}, all on one cluster's bus."""
    cluster = module_cluster_factory(edges=1, workers=1)
    procs = []
    urls = {"default": cluster.http_urls[0]}
    for name, args in (("list", ["--allowed-origins", ALLOWED]), ("off", ["--check-origin", "false"])):
        proc = Proc("zchannels.edge", "--bus", cluster.bus, "--port", "0", "--host", "127.0.0.1", *args,
                    "--log-level", LOG_LEVEL, name=f"edge-{name}")
        procs.append(proc)
        urls[name] = proc.wait_ready(1, 10.0)[0]["http"]
    yield urls
    for proc in procs:
        proc.stop()
        proc.cleanup()


# (edge, Origin header or None, allowed?)
CASES = [
    ("default", None, True),
    ("default", "http://127.0.0.1:5173", True),        # the request's own host, any port
    ("default", "http://evil.example", False),         # cross-site WebSocket hijacking
    ("default", "null", False),
    ("list", None, True),
    ("list", "https://app.example.com", True),
    ("list", "https://x.y.trusted.test:8443", True),
    ("list", "http://app.example.com", False),         # https was required
    ("list", "http://127.0.0.1", False),               # the list replaces the default
    ("off", "http://evil.example", True),
]
IDS = [f"{edge}-{origin or 'no-origin'}" for edge, origin, _ in CASES]


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/socket/websocket?vsn=2.0.0&user=o"


@pytest.mark.parametrize("edge,origin,allowed", CASES, ids=IDS)
def test_websocket_upgrade_origin(edges, edge, origin, allowed):
    # What a page on a foreign site gets when it opens a socket with the visitor's cookies.
    headers = {"Cookie": "_app_key=visitor-session"}
    if origin is not None:
        headers["Origin"] = origin
    if not allowed:
        with pytest.raises(HandshakeRefused) as refused:
            RawWS.connect(ws_url(edges[edge]), headers=headers)
        assert refused.value.code == 403
        return
    with RawWS.connect(ws_url(edges[edge]), headers=headers) as ws:
        topic = f"echo:{uuid.uuid4().hex[:8]}"
        ws.send_json(["1", "1", topic, "phx_join", {}])
        assert ws.recv_json(5)[4] == {"status": "ok", "response": {"joined": topic}}


@pytest.mark.parametrize("edge,origin,allowed", CASES, ids=IDS)
def test_longpoll_origin(edges, edge, origin, allowed):
    headers = {} if origin is None else {"Origin": origin}
    request = urllib.request.Request(f"{edges[edge]}/socket/longpoll?vsn=2.0.0&user=o", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as resp:
        status, body = resp.status, json.loads(resp.read())
    assert status == 200
    if allowed:
        assert body["status"] == 410 and body["token"].startswith("lp1.")
    else:
        assert body == {"status": 403}


def test_longpoll_preflight_from_a_foreign_origin_is_refused(edges):
    request = urllib.request.Request(f"{edges['default']}/socket/longpoll?vsn=2.0.0", method="OPTIONS",
                                     headers={"Origin": "http://evil.example",
                                              "Access-Control-Request-Method": "POST"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert (resp.status, json.loads(resp.read())) == (200, {"status": 403})


def test_bad_allowed_origins_stop_the_edge_before_it_starts():
    proc = Proc("zchannels.edge", "--bus", "tcp://127.0.0.1:1", "--port", "0", "--allowed-origins", "example.com",
                name="edge-badorigins")
    try:
        assert proc.popen.wait(10) == 2
        assert "has no host" in proc.stderr_text()
    finally:
        proc.stop()
        proc.cleanup()
