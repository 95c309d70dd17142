"""Socket ids and the "disconnect" broadcast (docs/protocol.md §5.1, §5.8, §4.3 S20, §10.31), with the real
phoenix.js on two edges.

The e2e app's connect takes the socket id from the `socket_id` param, and its `kick` event
broadcasts an event (default "disconnect") to any topic from a worker, as `Endpoint.broadcast`
would.  Every connection whose id is that topic closes, on every edge: WebSocket with 1001,
LongPoll by ending the session (its next request gets 410); channels terminate with
("shutdown", "disconnected"); other events on the id topic change nothing.
"""
from __future__ import annotations

import json
import urllib.request
import uuid

import pytest

from tests.conftest import wait_until

FAST = {"reconnectAfterMs": 100, "rejoinAfterMs": 100}


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def cluster(module_cluster_factory):
    return module_cluster_factory(edges=2, workers=2)


def connected(js_client, name: str, url: str, socket_id: str):
    c = js_client(name)
    params = {"user": name, "socket_id": socket_id, "stamp": "1"}
    assert c.connect(url, params, **FAST)["status"] == "open"
    assert c.join("e", f"echo:{uid()}")["status"] == "ok"
    return c


def stamp(c) -> str:
    answer = c.push("e", "assigns")
    assert answer["status"] == "ok", answer
    return answer["response"]["assigns"]["stamp"]


def lp(url: str, method: str = "GET", body: bytes | None = None) -> dict:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/x-ndjson"})
    with urllib.request.urlopen(request, timeout=15) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_disconnect_closes_every_socket_with_that_id_on_every_edge(cluster, js_client):
    sid, other = f"users_socket:{uid()}", f"users_socket:{uid()}"
    a = connected(js_client, "a", cluster.ws_urls[0], sid)
    b = connected(js_client, "b", cluster.ws_urls[1], sid)
    o0 = connected(js_client, "o0", cluster.ws_urls[0], other)
    o1 = connected(js_client, "o1", cluster.ws_urls[1], other)
    before = {c.name: stamp(c) for c in (a, b)}

    # A channel of `a` that reports its terminate reason to the admin.
    watched = f"terminate:{uid()}"
    assert a.join("t", watched)["status"] == "ok"
    admin = js_client("admin")
    assert admin.connect(cluster.ws_urls[1], {"user": "admin"})["status"] == "open"
    assert admin.join("w", "terminations:" + watched, on=["terminated"])["status"] == "ok"
    assert admin.join("k", f"echo:{uid()}")["status"] == "ok"

    # Both kicks come from one channel, so one publisher: they reach each edge in this order.
    # When `other`'s sockets have closed, each edge has already seen the first broadcast.
    marks = {c.name: c.mark() for c in (a, b, o0, o1)}
    assert admin.push("k", "kick", {"topic": sid, "event": "not_disconnect"})["status"] == "ok"
    assert admin.push("k", "kick", {"topic": other})["status"] == "ok"
    for c in (o0, o1):
        assert c.wait_event({"type": "socket_close"}, 5, since=marks[c.name])["code"] == 1001
    for c in (a, b):
        assert c.find({"type": "socket_close"}, since=marks[c.name]) == [], \
            "an event other than disconnect on the id topic closed a socket"

    marks = {c.name: c.mark() for c in (a, b, o0, o1)}
    assert admin.push("k", "kick", {"topic": sid})["status"] == "ok"
    for c in (a, b):
        close = c.wait_event({"type": "socket_close"}, 5, since=marks[c.name])
        assert close["code"] == 1001, close
    msg = admin.wait_event({"type": "message", "event": "terminated"}, 5)
    assert msg["payload"] == {"reason": "('shutdown', 'disconnected')"}

    # phoenix.js reconnects, which runs connect again (a new stamp), and rejoins its channels.
    for c in (a, b):
        c.wait_event({"type": "socket_open"}, 10, since=marks[c.name])
        c.wait_event({"type": "joined", "chan": "e"}, 10, since=marks[c.name])
        assert stamp(c) != before[c.name]
    for c in (o0, o1):
        assert c.find({"type": "socket_close"}, since=marks[c.name]) == []
        assert c.ping()["status"] == "ok"


def test_disconnect_ends_a_longpoll_session_with_that_id(cluster, js_client):
    """The session ends on its edge; the next request, on any edge, gets 410 (docs/protocol.md §6.7, §10.39)."""
    sid = f"users_socket:{uid()}"
    answer = lp(f"{cluster.http_urls[1]}/socket/longpoll?vsn=2.0.0&user=lp&socket_id={sid}")
    assert answer["status"] == 410
    session = f"vsn=2.0.0&token={answer['token']}"
    heartbeat = json.dumps([None, "1", "phoenix", "heartbeat", {}]).encode()
    assert lp(f"{cluster.http_urls[1]}/socket/longpoll?{session}", "POST", heartbeat) == {"status": 200}
    ws = connected(js_client, "ws", cluster.ws_urls[0], sid)
    mark = ws.mark()
    admin = js_client("admin")
    assert admin.connect(cluster.ws_urls[0], {"user": "admin"})["status"] == "open"
    assert admin.join("k", f"echo:{uid()}")["status"] == "ok"
    assert admin.push("k", "kick", {"topic": sid})["status"] == "ok"
    assert ws.wait_event({"type": "socket_close"}, 5, since=mark)["code"] == 1001
    for edge in (0, 1):
        # The WebSocket's close shows the broadcast was out; the LongPoll edge may see it a bit later.
        url = f"{cluster.http_urls[edge]}/socket/longpoll?{session}"
        wait_until(lambda: lp(url, "POST", heartbeat) == {"status": 410}, 5)
        assert lp(url)["status"] == 410


def test_a_socket_without_id_is_not_touched_by_disconnects(cluster, js_client):
    plain = js_client("plain")
    assert plain.connect(cluster.ws_urls[0], {"user": "plain"}, **FAST)["status"] == "open"
    assert plain.join("e", f"echo:{uid()}")["status"] == "ok"
    assert plain.push("e", "assigns")["response"]["id"] is None
    mark = plain.mark()
    sid = f"users_socket:{uid()}"
    kicked = connected(js_client, "kicked", cluster.ws_urls[0], sid)
    assert plain.push("e", "kick", {"topic": sid})["status"] == "ok"
    assert kicked.wait_event({"type": "socket_close"}, 5)["code"] == 1001
    assert plain.find({"type": "socket_close"}, since=mark) == []
    assert plain.ping()["status"] == "ok"
