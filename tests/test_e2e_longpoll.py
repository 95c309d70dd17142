"""LongPoll at /socket/longpoll, end to end: the real phoenix.js 1.8.17 `LongPoll` transport, and
raw HTTP where phoenix.js cannot show or steer the wire (exact bodies, held and superseded polls,
malformed POSTs, one session's requests spread over several edges).

The module's cluster (2 edges, 2 workers, tests/apps/e2e_app.py) polls with a 1 s window and ends
sessions after 3 s without a poll, so waits stay short. A few tests start extra edges on the same
bus: one without the WebSocket route (fallback), one with a longer window and a 1 s heartbeat
timeout (superseded polls; LongPoll sessions outlive the WebSocket idle rule). Numbers in the
docstrings refer to docs/protocol.md.
"""
from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import LOG_LEVEL, Proc, wait_until
from tests.jsclient import unb64

WINDOW = 1.0
INACTIVITY = 3.0
LONG_WINDOW = 4.0
NDJSON = {"Content-Type": "application/x-ndjson"}
FAST = {"rejoinAfterMs": 100}


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def cluster(module_cluster_factory):
    return module_cluster_factory(edges=2, workers=2, edge_args=[
        "--longpoll-window", str(WINDOW), "--longpoll-inactivity", str(INACTIVITY)])


class ExtraEdges:
    """Edges started on the module cluster's bus with their own options."""

    def __init__(self, cluster) -> None:
        self.bus = cluster.bus
        self.procs: list[Proc] = []

    def start(self, *args: str) -> tuple[Proc, str]:
        proc = Proc("zchannels.edge", "--bus", self.bus, "--port", "0", "--host", "127.0.0.1", *args,
                    "--log-level", LOG_LEVEL, name=f"edge-extra{len(self.procs)}")
        self.procs.append(proc)
        return proc, proc.wait_ready(1, 10.0)[0]["http"]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()
            proc.cleanup()


@pytest.fixture(scope="module")
def extra_edges(cluster):
    edges = ExtraEdges(cluster)
    yield edges
    edges.stop()


@pytest.fixture(scope="module")
def long_window_edge(extra_edges):
    """An edge holding polls for 4 s, whose WebSocket idle rule (1 s) would kill LongPoll sessions
    if it applied to them."""
    return extra_edges.start("--longpoll-window", str(LONG_WINDOW), "--heartbeat-timeout", "1")[1]


# ---- raw HTTP ----------------------------------------------------------------------------------

def http(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         timeout: float = 15.0) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def lp_url(http_url: str, query: str = "vsn=2.0.0") -> str:
    return f"{http_url}/socket/longpoll?{query}"


def lp_entry(message):
    """One of a poll response's `messages`: a text frame (a JSON string) as its JSON value, a
    binary frame as bytes.  phoenix.js 1.8.17 reads any non-string entry as {"binary": base64}."""
    if isinstance(message, str):
        return json.loads(message)
    assert isinstance(message, dict) and set(message) == {"binary"}, message
    return base64.b64decode(message["binary"], validate=True)


def bin_push(join_ref: str, ref: str, topic: str, event: str, payload: bytes) -> bytes:
    """A client's V2 binary push (kind 0, PROTOCOL.md §2.4)."""
    fields = [join_ref.encode(), ref.encode(), topic.encode(), event.encode()]
    return bytes([0, *map(len, fields)]) + b"".join(fields) + payload


class RawSession:
    """A LongPoll session driven by hand: created on one edge, requests to any edge."""

    def __init__(self, http_url: str, query: str = "vsn=2.0.0&user=raw&"):
        status, _headers, body = http(lp_url(http_url, query))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == 410, answer
        self.token = answer["token"]
        self.home = http_url
        self.refs = iter(range(100, 100_000))

    def url(self, edge: str | None = None) -> str:
        return lp_url(edge or self.home, f"vsn=2.0.0&token={self.token}")

    def post(self, *frames, edge: str | None = None, raw: bytes | None = None,
             headers: dict | None = None) -> tuple[int, dict]:
        body = raw if raw is not None else "\n".join(json.dumps(f) for f in frames).encode()
        status, _headers, answer = http(self.url(edge), "POST", body, headers or NDJSON)
        return status, json.loads(answer)

    def poll(self, edge: str | None = None, timeout: float = 15.0) -> dict:
        status, _headers, body = http(self.url(edge), timeout=timeout)
        assert status == 200
        return json.loads(body)

    def poll_until(self, pred, edge: str | None = None, timeout: float = 10.0) -> list:
        """Poll until a frame satisfying `pred` arrived; return every frame received."""
        frames: list = []
        deadline = time.monotonic() + timeout
        while not any(pred(f) for f in frames):
            assert time.monotonic() < deadline, f"no matching frame within {timeout}s: {frames}"
            answer = self.poll(edge)
            assert answer["status"] in (200, 204), answer
            assert answer["token"] == self.token
            frames += [lp_entry(m) for m in answer["messages"]]
        return frames

    def join(self, topic: str, edge: str | None = None) -> str:
        join_ref = str(next(self.refs))
        assert self.post([join_ref, join_ref, topic, "phx_join", {}], edge=edge) == (200, {"status": 200})
        frames = self.poll_until(lambda f: f[1] == join_ref, edge)
        assert [join_ref, join_ref, topic, "phx_reply",
                {"status": "ok", "response": {"joined": topic}}] in frames
        return join_ref

    def ping(self, topic: str, join_ref: str, edge: str | None = None,
             poll_edge: str | None = None) -> list:
        """Push a ping and poll until its reply; return every frame the polls brought."""
        ref = str(next(self.refs))
        assert self.post([join_ref, ref, topic, "ping", {"n": ref}], edge=edge) == (200, {"status": 200})
        frames = self.poll_until(lambda f: f[1] == ref, poll_edge or edge)
        assert [join_ref, ref, topic, "phx_reply", {"status": "ok", "response": {"n": ref}}] in frames
        return frames


def lp_client(js_client, url: str, name: str = "lp", params: dict | None = None, **opts):
    c = js_client(name)
    opts.setdefault("frames", True)
    answer = c.connect(url, params or {"user": name}, transport="longpoll", **opts)
    assert answer["status"] == "open", answer
    return c


def ws_client(js_client, url: str, name: str = "ws"):
    c = js_client(name)
    answer = c.connect(url, {"user": name})
    assert answer["status"] == "open", answer
    return c


def bcast_payloads(c, chan: str, since: int = 0) -> list:
    return [m["payload"] for m in c.messages(chan, "bcast", since)]


# ---- session establishment ------------------------------------------------------------------------

def test_first_get_creates_a_session_answering_410_with_a_token(cluster):
    """§6.1/§6.2/§10.35: HTTP 200, logical 410, token, no messages; JSON, no-store, CORS *."""
    status, headers, body = http(lp_url(cluster.http_urls[0], "vsn=2.0.0&user=a&"))
    assert status == 200
    assert headers["content-type"] == "application/json; charset=utf-8"
    assert headers["cache-control"] == "no-store"
    assert headers["access-control-allow-origin"] == "*"
    assert "etag" not in headers
    answer = json.loads(body)
    assert answer["status"] == 410 and answer["messages"] == []
    token = answer["token"]
    assert token == urllib.request.quote(token, safe="")   # survives encodeURIComponent
    status, _headers, body = http(lp_url(cluster.http_urls[0], f"vsn=2.0.0&token={token}"))
    assert json.loads(body) == {"status": 204, "token": token, "messages": []}   # same token


def test_refused_connect_and_bad_vsn_answer_403(cluster):
    """§2.6: refusal -> {"status":403} with HTTP 200, and no session."""
    for query in ("vsn=2.0.0&reject=1&", "vsn=3.0.0&"):
        status, _headers, body = http(lp_url(cluster.http_urls[0], query))
        assert (status, json.loads(body)) == (200, {"status": 403})


def test_no_worker_answers_500():
    """No worker to run connect -> {"status":500}, which phoenix.js retries (like a 503 upgrade)."""
    broker = Proc("zchannels.broker", "--bus", "tcp://127.0.0.1:0", "--log-level", LOG_LEVEL, name="broker-alone")
    edge = None
    try:
        bus = broker.wait_ready(1, 10.0)[0]["bus"]
        edge = Proc("zchannels.edge", "--bus", bus, "--port", "0", "--host", "127.0.0.1", "--log-level", LOG_LEVEL,
                    name="edge-alone")
        status, _headers, body = http(lp_url(edge.wait_ready(1, 10.0)[0]["http"], "vsn=2.0.0&"))
        assert (status, json.loads(body)) == (200, {"status": 500})
    finally:
        for proc in (edge, broker):
            if proc is not None:
                proc.stop()
                proc.cleanup()


def test_options_preflight_and_origin_check(cluster):
    """§6.1/§6.9/§10.41: preflight echoes the requested headers; a foreign Origin gets 403 in the body."""
    url = lp_url(cluster.http_urls[0])
    status, headers, body = http(url, "OPTIONS", headers={
        "Origin": "http://127.0.0.1", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-phoenix-authtoken, content-type"})
    assert status == 200 and body == b""
    assert headers["access-control-allow-headers"] == "x-phoenix-authtoken, content-type"
    assert headers["access-control-allow-methods"] == "get, post, options"
    assert headers["access-control-max-age"] == "3600"
    assert headers["access-control-allow-origin"] == "*"
    for method in ("GET", "OPTIONS"):
        status, _headers, body = http(url + "&user=x&", method, headers={"Origin": "http://evil.example"})
        assert (status, json.loads(body)) == (200, {"status": 403})
    status, _headers, body = http(url, "PUT", b"x")
    assert (status, body) == (400, b"")


def test_phoenix_js_connects_over_longpoll_joins_and_pushes(js_client, cluster):
    """§10.35/§10.36: open after the 410, joins ok and error, push -> reply through the polls."""
    c = lp_client(js_client, cluster.ws_urls[0])
    topic = f"echo:{uid()}"
    answer = c.join("a", topic)
    assert (answer["status"], answer["response"]) == ("ok", {"joined": topic})
    assert c.join("p", f"private:{uid()}")["status"] == "error"
    assert c.push("a", "ping", {"q": 1}) == {"status": "ok", "response": {"q": 1}}
    assert c.push("a", "custom", {"q": 2}) == {"status": "custom", "response": {"q": 2}}
    join_ref = answer["join_ref"]
    assert [join_ref, None, topic, "pushed", {"p": 1}] not in c.wire("in")
    c.push("a", "push", {"p": 1}, nowait=True)
    wait_until(lambda: [join_ref, None, topic, "pushed", {"p": 1}] in c.wire("in"), 5)
    assert not c.driver_errors()


def test_pushes_in_one_tick_travel_in_one_post_and_all_get_replies(js_client, cluster):
    """§6.4/§10.36: one ndjson POST, one line per push; replies come back through polls."""
    c = lp_client(js_client, cluster.ws_urls[0])
    topic = f"echo:{uid()}"
    assert c.join("a", topic)["status"] == "ok"
    mark = c.mark()
    results = c.push_many("a", [("ping", {"i": i}) for i in range(5)])
    assert results == [{"status": "ok", "response": {"i": i}} for i in range(5)]
    assert [(p["lines"], p["status"]) for p in c.find({"type": "lp_post"}, mark)] == [(5, 200)]


def test_longpoll_and_websocket_clients_broadcast_to_each_other(js_client, cluster):
    """A LongPoll client and a WebSocket client on different edges share a topic, both ways."""
    topic = f"echo:{uid()}"
    lp = lp_client(js_client, cluster.ws_urls[0], "lp")
    ws = ws_client(js_client, cluster.ws_urls[1], "ws")
    assert lp.join("a", topic, on=["bcast"])["status"] == "ok"
    assert ws.join("a", topic, on=["bcast"])["status"] == "ok"
    assert lp.push("a", "bcast", {"from": "lp"})["status"] == "ok"
    wait_until(lambda: {"from": "lp"} in bcast_payloads(ws, "a"), 5)
    assert ws.push("a", "bcast", {"from": "ws"})["status"] == "ok"
    wait_until(lambda: {"from": "ws"} in bcast_payloads(lp, "a"), 5)
    wait_until(lambda: bcast_payloads(lp, "a") == [{"from": "lp"}, {"from": "ws"}], 5)


# ---- polls ---------------------------------------------------------------------------------------

def test_idle_poll_is_answered_204_after_the_window(cluster):
    """§6.3/§10.37: nothing to deliver -> held for the window, then 204 with the same token."""
    s = RawSession(cluster.http_urls[0])
    started = time.monotonic()
    answer = s.poll()
    elapsed = time.monotonic() - started
    assert answer == {"status": 204, "token": s.token, "messages": []}
    assert WINDOW * 0.8 <= elapsed < WINDOW + 3, elapsed


def test_held_poll_is_answered_as_soon_as_a_message_is_there(long_window_edge):
    """§10.37: a reply for the client releases the waiting poll at once."""
    s = RawSession(long_window_edge)
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        held = pool.submit(s.poll)
        assert s.post([None, "hb", "phoenix", "heartbeat", {}]) == (200, {"status": 200})
        answer = held.result(LONG_WINDOW + 5)
    # (Had the POST overtaken the poll, the reply was buffered and the poll answered at once.)
    assert answer["status"] == 200
    assert [json.loads(m) for m in answer["messages"]] == [
        [None, "hb", "phoenix", "phx_reply", {"status": "ok", "response": {}}]]
    assert time.monotonic() - started < LONG_WINDOW


def test_a_newer_poll_answers_the_older_one(long_window_edge):
    """One poll per session: a flood of polls leaves one waiting, the others get 204 at once."""
    s = RawSession(long_window_edge)
    with ThreadPoolExecutor(6) as pool:
        polls = []
        for _ in range(6):
            polls.append(pool.submit(s.poll))
            time.sleep(0.05)   # spread the requests out; the assertions do not depend on order
        wait_until(lambda: sum(p.done() for p in polls) >= 5, LONG_WINDOW - 1.5,
                   message="older polls not answered before the window")
        pending = [p for p in polls if not p.done()]
        assert len(pending) == 1
        assert [p.result() for p in polls if p.done()] == [
            {"status": 204, "token": s.token, "messages": []}] * 5
        assert s.post([None, "hb", "phoenix", "heartbeat", {}]) == (200, {"status": 200})
        last = pending[0].result(10)
    assert last["status"] == 200 and len(last["messages"]) == 1


def test_inactive_session_ends_and_its_channels_terminate(js_client, cluster):
    """§5.9/§6.7: no poll for the inactivity timeout -> terminate ("shutdown", "inactive");
    the next request learns that the session is gone (410, no new session)."""
    topic = f"terminate:{uid()}"
    watcher = ws_client(js_client, cluster.ws_urls[1], "watcher")
    assert watcher.join("w", f"terminations:{topic}", on=["terminated"])["status"] == "ok"
    s = RawSession(cluster.http_urls[0])
    s.join(topic)
    started = time.monotonic()
    ev = watcher.wait_event({"type": "message", "chan": "w", "event": "terminated"}, INACTIVITY + 10)
    assert ev["payload"] == {"reason": "('shutdown', 'inactive')"}
    assert time.monotonic() - started >= INACTIVITY * 0.8
    assert s.poll() == {"status": 410}
    assert s.post([None, "hb", "phoenix", "heartbeat", {}]) == (200, {"status": 410})


def test_unknown_or_forged_session_tokens(cluster):
    """§6.3: a well-formed token whose session is gone -> 410 and no session, on any edge;
    something that is no session token at all -> a new session (it may be the app's own param)."""
    s = RawSession(cluster.http_urls[0])
    forged = s.token[:-22] + "A" * 22
    unknown_sid = s.token.split(".")
    unknown_sid[2] = "999999"
    for token in (forged, ".".join(unknown_sid)):
        for edge in cluster.http_urls:
            status, _headers, body = http(lp_url(edge, f"vsn=2.0.0&token={token}"))
            assert (status, json.loads(body)) == (200, {"status": 410})
            status, _headers, body = http(lp_url(edge, f"vsn=2.0.0&token={token}"), "POST", b"x", NDJSON)
            assert (status, json.loads(body)) == (200, {"status": 410})
    status, _headers, body = http(lp_url(cluster.http_urls[0], "vsn=2.0.0&token=SFMyNTY.user.token"))
    answer = json.loads(body)
    assert answer["status"] == 410 and answer["token"].startswith("lp1.")
    # The header wins over the query (phoenix.js 1.9 sends it there).
    status, _headers, body = http(lp_url(cluster.http_urls[0], "vsn=2.0.0&token=whatever"),
                                  headers={"X-Phoenix-Longpoll-Token": forged})
    assert json.loads(body) == {"status": 410}


def test_phoenix_js_recovers_from_a_gone_session(js_client, cluster):
    """§6.5/§10.39: 410 with a token held -> close 3410, new session, channels rejoin; also with
    an app param named `token` in the URL (§6.3)."""
    params = {"user": "r", "token": "SFMyNTY.g2gDbQ.c2lnbmF0dXJl"}
    c = lp_client(js_client, cluster.ws_urls[0], params=params, **FAST)
    topic = f"echo:{uid()}"
    assert c.join("a", topic)["status"] == "ok"
    real = c.lp_token()
    assert real.startswith("lp1.")
    mark = c.mark()
    gone = real.split(".")
    gone[2] = "999999"
    c.lp_token(".".join(gone))
    ev = c.wait_event({"type": "socket_close"}, WINDOW + 10, since=mark)
    assert (ev["code"], ev["reason"]) == (3410, "session_gone")
    c.wait_event({"type": "socket_open"}, 10, since=mark)
    c.wait_event({"type": "joined", "chan": "a"}, 10, since=mark)
    assert c.lp_token() not in (real, ".".join(gone))
    assert c.push("a", "ping", {"after": "recovery"}) == {"status": "ok", "response": {"after": "recovery"}}
    assert not c.driver_errors()


def test_malformed_post_gets_400_and_affects_nothing_else(js_client, cluster):
    """A body that cannot be decoded -> HTTP 400 with a JSON error; none of its lines run, the
    session and other clients carry on."""
    bystander = lp_client(js_client, cluster.ws_urls[0], "bystander")
    btopic = f"echo:{uid()}"
    assert bystander.join("a", btopic)["status"] == "ok"
    s = RawSession(cluster.http_urls[0])
    topic = f"echo:{uid()}"
    join_ref = s.join(topic)
    good = json.dumps([join_ref, "9", topic, "ping", {"n": "9"}]).encode()
    for body in (b"[not json", b"!!not base64!!", good + b"\n" + b'["1","2"]', b"AAEC"):
        status, answer = s.post(raw=body)
        assert status == 400 and answer["status"] == 400 and answer["error"], (body, answer)
    # Ref 9 shared a body with a bad line: it never ran (its reply would precede this one's).
    assert not any(f[1] == "9" for f in s.ping(topic, join_ref))
    assert bystander.push("a", "ping", {"still": "here"})["status"] == "ok"


def test_post_lines_in_base64_are_binary_frames(js_client, cluster):
    """§6.4: a line not starting with "[" is standard base64 of a kind-0 binary push."""
    topic = f"echo:{uid()}"
    ws = ws_client(js_client, cluster.ws_urls[1])
    assert ws.join("a", topic, on=["bcast"])["status"] == "ok"
    s = RawSession(cluster.http_urls[0])
    join_ref = s.join(topic)
    fields = [join_ref.encode(), b"77", topic.encode(), b"bcast"]
    frame = bytes([0, *map(len, fields)]) + b"".join(fields) + b"\x01\x02\x03"
    assert s.post(raw=base64.b64encode(frame)) == (200, {"status": 200})
    frames = s.poll_until(lambda f: f[1] == "77")
    assert [join_ref, "77", topic, "phx_reply", {"status": "ok", "response": {}}] in frames
    wait_until(lambda: ws.messages("a", "bcast"), 5)
    assert unb64(ws.messages("a", "bcast")[0]["payload"]) == b"\x01\x02\x03"


# ---- binary frames -------------------------------------------------------------------------------

def test_phoenix_js_binary_push_reply_and_broadcast_over_longpoll(js_client, cluster):
    """§9.24 over LongPoll: an ArrayBuffer push goes out as a base64 line, reaches handle_in as
    bytes, and the binary reply, server push and broadcast come back through the polls as
    ArrayBuffers, next to text frames of the same session; binary broadcasts cross transports."""
    topic = f"echo:{uid()}"
    lp = lp_client(js_client, cluster.ws_urls[0], "lp")
    ws = ws_client(js_client, cluster.ws_urls[1], "ws")
    join_ref = lp.join("a", topic, on=["bcast", "pushed"])["join_ref"]
    assert ws.join("a", topic, on=["bcast"])["status"] == "ok"

    data = bytes(range(256)) * 4
    mark = lp.mark()
    answer = lp.push("a", "binary", binary=data)
    assert answer["status"] == "ok" and unb64(answer["response"]) == data[::-1]
    assert [(p["lines"], p["status"]) for p in lp.find({"type": "lp_post"}, mark)] == [(1, 200)]
    assert any(isinstance(f, bytes) and f[0] == 1 and f.endswith(b"ok" + data[::-1])
               for f in lp.wire("in"))                                  # a kind 1 reply frame
    assert lp.push("a", "ping", {"text": "still"}) == {"status": "ok", "response": {"text": "still"}}

    lp.push("a", "push", binary=b"\x00\x01bin", nowait=True)
    msg = lp.wait_event({"type": "message", "event": "pushed"}, 5)
    assert unb64(msg["payload"]) == b"\x00\x01bin"
    assert (bytes([0, len(join_ref), len(topic), len("pushed")]) + join_ref.encode()
            + topic.encode() + b"pushed\x00\x01bin") in lp.wire("in")

    assert ws.push("a", "bcast", binary=b"\xffcast\x00")["status"] == "ok"
    msg = lp.wait_event({"type": "message", "event": "bcast"}, 5)
    assert unb64(msg["payload"]) == b"\xffcast\x00"
    assert bytes([2, len(topic), len("bcast")]) + topic.encode() + b"bcast\xffcast\x00" in lp.wire("in")
    assert lp.push("a", "bcast", binary=b"\x01from lp")["status"] == "ok"
    wait_until(lambda: [unb64(p) for p in bcast_payloads(ws, "a")] == [b"\xffcast\x00", b"\x01from lp"], 5)
    assert not lp.driver_errors()


def test_binary_frames_reach_polls_as_base64_objects_on_any_edge(cluster):
    """Poll responses carry a binary frame as {"binary": standard base64} (what phoenix.js
    1.8.17 decodes), whether the session is on the polled edge or relayed to (§5.8); a POST may
    mix text and base64 lines, handled in order."""
    e0, e1 = cluster.http_urls
    s = RawSession(e0)
    topic = f"echo:{uid()}"
    join_ref = s.join(topic)
    data = bytes(range(256))

    assert s.post(raw=base64.b64encode(bin_push(join_ref, "201", topic, "binary", data)),
                  edge=e1) == (200, {"status": 200})
    reply = (bytes([1, len(join_ref), 3, len(topic), 2]) + join_ref.encode() + b"201"
             + topic.encode() + b"ok" + data[::-1])
    assert reply in s.poll_until(lambda f: f == reply, edge=e1)

    body = b"\n".join([
        json.dumps([join_ref, "202", topic, "ping", {"n": "202"}]).encode(),
        base64.b64encode(bin_push(join_ref, "203", topic, "bcast", b"\xff\x00cast")),
        base64.b64encode(bin_push(join_ref, "204", topic, "push", b"\x00p"))])
    assert s.post(raw=body) == (200, {"status": 200})
    broadcast = bytes([2, len(topic), len("bcast")]) + topic.encode() + b"bcast\xff\x00cast"
    push = (bytes([0, len(join_ref), len(topic), len("pushed")]) + join_ref.encode()
            + topic.encode() + b"pushed\x00p")
    frames = s.poll_until(lambda f: f == push)
    if broadcast not in frames:   # it comes through the broker's fan-out, maybe after the rest
        frames += s.poll_until(lambda f: f == broadcast)
    ping_reply = [join_ref, "202", topic, "phx_reply", {"status": "ok", "response": {"n": "202"}}]
    bcast_reply = [join_ref, "203", topic, "phx_reply", {"status": "ok", "response": {}}]
    assert [f for f in frames if isinstance(f, list)] == [ping_reply, bcast_reply]
    assert frames.index(push) > frames.index(bcast_reply)


def test_malformed_binary_lines_get_400_and_one_log_line_on_any_edge(cluster):
    """A line that is neither a text frame nor base64 of a well-formed binary push -> HTTP 400
    naming the line, none of the body's lines run, and the holding edge logs one line."""
    e0, e1 = cluster.http_urls
    s = RawSession(e0)
    topic = f"echo:{uid()}"
    join_ref = s.join(topic)
    text = json.dumps([join_ref, "301", topic, "ping", {"n": "301"}]).encode()
    binary = base64.b64encode(bin_push(join_ref, "302", topic, "binary", b"\x01"))
    max_frame = 1_048_576   # the edge's default --max-frame-size
    cases = [
        (text + b"\n!!not base64!!", "line 2 is neither a text frame"),
        (binary + b"\nAAEC", "line 2 (base64 of a binary frame): binary push header needs 5 bytes"),
        (base64.b64encode(bytes([1, 1, 1, 1, 1]) + b"abcd"), "unknown binary frame kind 1"),
        (base64.b64encode(bytes([0, 9, 9, 9, 9]) + b"abc"), "declares 36 bytes of strings"),
        (base64.b64encode(bytes([0, 1, 1, 1, 1]) + b"12\xfft"), "topic is not valid UTF-8"),
        (base64.b64encode(bin_push(join_ref, "303", topic, "binary", bytes(max_frame))),
         f"more than the {max_frame} allowed"),
    ]
    for n, (body, fragment) in enumerate(cases):
        status, answer = s.post(raw=body, edge=(e0, e1)[n % 2])
        assert (status, answer["status"]) == (400, 400) and fragment in answer["error"], answer
    assert s.post([join_ref, "304", topic, "ping", {"n": "304"}]) == (200, {"status": 200})
    frames = s.poll_until(lambda f: f[1] == "304")
    assert not [f for f in frames if isinstance(f, list) and f[1] in ("301", "302", "303")]
    assert not [f for f in frames if isinstance(f, bytes)]
    sid = s.token.split(".")[2]
    logged = [line for line in cluster.edge_procs[0].stderr_text().splitlines()
              if f"#{sid}/lp: malformed LongPoll POST" in line]
    assert len(logged) == len(cases), logged
    assert f"#{sid}/lp" not in cluster.edge_procs[1].stderr_text()


def test_binary_lines_count_toward_the_100_lines_of_a_post(cluster):
    """§5.4: lines after the 100th are ignored, binary ones like text ones."""
    s = RawSession(cluster.http_urls[0])
    topic = f"echo:{uid()}"
    join_ref = s.join(topic)
    lines = [base64.b64encode(bin_push(join_ref, str(1000 + i), topic, "binary", bytes([i])))
             for i in range(101)]
    assert s.post(raw=b"\n".join(lines)) == (200, {"status": 200})
    frames = s.ping(topic, join_ref)   # replies come in order: every one before the ping's is here
    refs = [f[5 + f[1]:5 + f[1] + f[2]].decode() for f in frames if isinstance(f, bytes) and f[0] == 1]
    assert refs == [str(1000 + i) for i in range(100)]


# ---- transports and edges ----------------------------------------------------------------------

def test_longpoll_sessions_are_not_subject_to_the_websocket_idle_rule(js_client, long_window_edge):
    """The edge's heartbeat timeout (1 s here) closes silent WebSockets; LongPoll clients send no
    heartbeats and hold polls for 4 s, and must stay connected."""
    url = long_window_edge.replace("http://", "ws://", 1) + "/socket"
    c = lp_client(js_client, url)
    topic = f"echo:{uid()}"
    assert c.join("a", topic)["status"] == "ok"
    mark = c.mark()
    time.sleep(LONG_WINDOW + 1.5)   # past a full poll window and several idle sweeps
    assert c.push("a", "ping", {"alive": True})["status"] == "ok"
    assert not c.find({"type": "socket_close"}, mark)


def test_falls_back_to_longpoll_when_websockets_are_refused(js_client, cluster, extra_edges):
    """§10.43: longPollFallbackMs with the WebSocket route absent -> LongPoll, chatting with a
    WebSocket client on another edge."""
    _proc, http_url = extra_edges.start("--no-websocket", "--longpoll-window", str(WINDOW))
    assert http(http_url + "/socket/websocket")[0] == 404
    c = js_client("fallback")
    c.connect(http_url.replace("http://", "ws://", 1) + "/socket", {"user": "fb"}, wait=False,
              longPollFallbackMs=500)
    c.wait_event({"type": "socket_open"}, 15)
    assert c.lp_token().startswith("lp1.")
    topic = f"echo:{uid()}"
    ws = ws_client(js_client, cluster.ws_urls[0])
    assert c.join("a", topic, on=["bcast"])["status"] == "ok"
    assert ws.join("a", topic, on=["bcast"])["status"] == "ok"
    assert c.push("a", "bcast", {"from": "fallback"})["status"] == "ok"
    wait_until(lambda: {"from": "fallback"} in bcast_payloads(ws, "a"), 5)
    assert ws.push("a", "bcast", {"from": "ws"})["status"] == "ok"
    wait_until(lambda: {"from": "ws"} in bcast_payloads(c, "a"), 5)


def test_requests_of_one_session_may_reach_any_edge(cluster):
    """Non-sticky load balancing (§6.8): a session created on edge 0 keeps working when its GETs
    and POSTs alternate between edge 0 and edge 1; a poll relayed to the holding edge is held
    there like a local one."""
    e0, e1 = cluster.http_urls
    s = RawSession(e0)
    topic = f"echo:{uid()}"
    join_ref = s.join(topic, edge=e1)
    for post_edge, poll_edge in ((e0, e1), (e1, e0), (e1, e1), (e0, e0)):
        s.ping(topic, join_ref, edge=post_edge, poll_edge=poll_edge)
    started = time.monotonic()
    assert s.poll(e1) == {"status": 204, "token": s.token, "messages": []}
    assert time.monotonic() - started >= WINDOW * 0.8
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(s.poll, e1)
        assert s.post([None, "hb", "phoenix", "heartbeat", {}], edge=e0) == (200, {"status": 200})
        answer = held.result(WINDOW + 5)
    assert [json.loads(m) for m in answer["messages"]] == [
        [None, "hb", "phoenix", "phx_reply", {"status": "ok", "response": {}}]]
    status, answer = s.post(raw=b"[broken", edge=e1)
    assert status == 400 and answer["status"] == 400
    s.ping(topic, join_ref, edge=e1, poll_edge=e1)


def test_relayed_poll_is_held_no_longer_than_the_relaying_edge_waits(cluster, long_window_edge):
    """A holder with a longer window than the relaying edge's must not keep a poll (and the
    frames it might take) after the relaying edge stopped waiting for it."""
    s = RawSession(long_window_edge)
    started = time.monotonic()
    assert s.poll(cluster.http_urls[0]) == {"status": 204, "token": s.token, "messages": []}
    elapsed = time.monotonic() - started
    assert WINDOW * 0.8 <= elapsed < WINDOW + 1.5, elapsed   # not the relay timeout (window + 2 s)
    topic = f"echo:{uid()}"
    s.ping(topic, s.join(topic, edge=cluster.http_urls[0]), edge=cluster.http_urls[1])


def test_session_of_a_stopped_edge_is_gone_for_the_others(cluster, extra_edges):
    """The holding edge is gone (UNROUTABLE on the bus) -> 410, for GET and POST."""
    proc, http_url = extra_edges.start("--longpoll-window", str(WINDOW))
    s = RawSession(http_url)
    s.join(f"echo:{uid()}")
    proc.stop()
    # 410 once the broker has seen the edge's connection go (a relay queued just before that
    # is lost and answered 204 after the window, and phoenix.js would simply poll again).
    wait_until(lambda: s.poll(cluster.http_urls[0]) == {"status": 410}, 3 * (WINDOW + 3))
    heartbeat = [None, "hb", "phoenix", "heartbeat", {}]
    assert s.post(heartbeat, edge=cluster.http_urls[1]) == (200, {"status": 410})
