"""Phoenix 1.8.x protocol behaviours, each checked against phoenixframework/phoenix v1.8.12
(docs/protocol.md has the table: behaviour, Phoenix version and source, where it lives here,
its test).  Behaviours already tested elsewhere are listed there, not repeated here.

One broker, one edge, two workers running tests/apps/protocol_app.py, whose connect puts
``connect_info["auth_token"]`` into the assigns (event ``assigns`` answers them).
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

from zchannels.edge.lpsession import MAX_LINES
from tests.rawws import HandshakeRefused, RawWS
from tests.test_e2e_longpoll import NDJSON, http, lp_url

pytestmark = pytest.mark.timeout(60)

APP = "tests/apps/protocol_app.py"
TOKEN_HEADER = "X-Phoenix-Longpoll-Token"
AUTH_HEADER = "X-Phoenix-AuthToken"
V1_KEYS = {"topic", "event", "payload", "ref"}


@pytest.fixture(scope="module")
def cluster(module_cluster_factory):
    return module_cluster_factory(app=APP, edges=1, workers=2, edge_args=["--longpoll-window", "1"])


def uid() -> str:
    return uuid.uuid4().hex[:10]


class Session:
    """A LongPoll session driven by raw HTTP; the token goes in the query or in the header."""

    def __init__(self, http_url: str, headers: dict | None = None, in_header: bool = False):
        self.base = lp_url(http_url, "vsn=2.0.0&user=p18&")
        status, _headers, body = http(self.base, headers=headers or {})
        answer = json.loads(body)
        assert status == 200 and answer["status"] == 410, answer
        self.token = answer["token"]
        self.in_header = in_header

    def request(self, method: str = "GET", body: bytes | None = None, headers: dict | None = None) -> dict:
        headers = dict(headers or {})
        if self.in_header:
            url = self.base                       # no token param at all
            headers[TOKEN_HEADER] = self.token
        else:
            url = f"{self.base}token={self.token}"
        status, _headers, answer = http(url, method, body, headers)
        assert status == 200, (status, answer)
        return json.loads(answer)

    def post_lines(self, lines: list[bytes], sep: bytes = b"\n") -> dict:
        return self.request("POST", sep.join(lines), NDJSON)

    def post(self, *frames) -> dict:
        return self.post_lines([json.dumps(f).encode() for f in frames])

    def frames_until(self, pred, timeout: float = 10.0, headers: dict | None = None) -> list:
        frames: list = []
        deadline = time.monotonic() + timeout
        while not any(pred(f) for f in frames):
            assert time.monotonic() < deadline, frames
            answer = self.request(headers=headers)
            assert answer["status"] in (200, 204) and answer["token"] == self.token, answer
            frames += [json.loads(m) for m in answer["messages"]]
        return frames


# ---- LongPoll session token in a header (Phoenix 1.8.10) ------------------------------------------

def test_longpoll_session_token_in_the_header_alone_drives_a_session(cluster):
    """long_poll.ex fetch_token/1: the x-phoenix-longpoll-token header, else the token param;
    every answer repeats the token in its body."""
    s = Session(cluster.http_urls[0], in_header=True)
    assert s.request() == {"status": 204, "token": s.token, "messages": []}
    topic = f"echo:{uid()}"
    assert s.post(["1", "1", topic, "phx_join", {}]) == {"status": 200}
    assert ["1", "1", topic, "phx_reply", {"status": "ok", "response": {"joined": topic}}] in \
        s.frames_until(lambda f: f[1] == "1")
    assert s.post(["1", "2", topic, "ping", {"via": "header"}]) == {"status": 200}
    assert ["1", "2", topic, "phx_reply", {"status": "ok", "response": {"via": "header"}}] in \
        s.frames_until(lambda f: f[1] == "2")


def test_longpoll_token_header_wins_over_the_token_param(cluster):
    """The header is read first: a live session's token there beats an app's own `token` param."""
    s = Session(cluster.http_urls[0])
    url = lp_url(cluster.http_urls[0], "vsn=2.0.0&token=SFMyNTY.app.token")
    status, _headers, body = http(url, headers={TOKEN_HEADER: s.token})
    assert (status, json.loads(body)) == (200, {"status": 204, "token": s.token, "messages": []})


# ---- authToken on LongPoll: X-Phoenix-AuthToken (Phoenix 1.8.0) -----------------------------------

def test_longpoll_auth_token_header_reaches_connect_info(cluster):
    """long_poll.ex maybe_auth_token_from_header/2, read when the session is created only."""
    s = Session(cluster.http_urls[0], headers={AUTH_HEADER: "tok-123"})
    topic = f"echo:{uid()}"
    s.post(["1", "1", topic, "phx_join", {}], ["1", "2", topic, "assigns", {}])
    later = {AUTH_HEADER: "another-token"}   # phoenix.js repeats it on every GET: ignored there
    frames = s.frames_until(lambda f: f[1] == "2", headers=later)
    reply = next(f for f in frames if f[1] == "2")
    assert reply[4] == {"status": "ok", "response": {"user": "p18", "auth_token": "tok-123"}}


def test_phoenix_js_long_poll_sends_its_auth_token(js_client, cluster):
    c = js_client("lpauth")
    answer = c.connect(cluster.ws_urls[0], {"user": "js"}, transport="longpoll", authToken="tok-js")
    assert answer["status"] == "open", answer
    assert c.join("a", f"echo:{uid()}")["status"] == "ok"
    assert c.push("a", "assigns") == {"status": "ok", "response": {"user": "js", "auth_token": "tok-js"}}
    assert not c.driver_errors()


# ---- at most 100 messages per LongPoll POST (Phoenix 1.8.9, CVE-2026-32689 hardening) ---------------

@pytest.mark.parametrize("sep", [b"\n", b"\r\n"])
def test_longpoll_post_lines_after_the_100th_are_ignored(cluster, sep):
    """long_poll.ex publish/4: String.splitter(["\\n", "\\r\\n"]) |> Stream.take(100)."""
    assert MAX_LINES == 100
    s = Session(cluster.http_urls[0])
    lines = [json.dumps([None, str(i), "phoenix", "heartbeat", {}]).encode() for i in range(150)]
    assert s.post_lines(lines, sep) == {"status": 200}
    assert s.post([None, "after", "phoenix", "heartbeat", {}]) == {"status": 200}
    refs = [f[1] for f in s.frames_until(lambda f: f[1] == "after")]
    assert refs == [str(i) for i in range(100)] + ["after"]


# ---- stale join_ref dropped (1.8.3), null join_ref accepted (1.8.12) -----------------------------

def test_longpoll_stale_join_refs_are_dropped_and_null_join_refs_accepted(cluster):
    """socket.ex handle_in/4: `is_nil(join_ref) or join_ref === existing_join_ref`, else ignored,
    for pushes (docs/protocol.md §4.3 S13) and leaves (S10) alike."""
    s = Session(cluster.http_urls[0])
    topic = f"echo:{uid()}"
    s.post(["1", "1", topic, "phx_join", {}])
    s.frames_until(lambda f: f[1] == "1")
    s.post(["0", "2", topic, "ping", {"stale": True}],
           [None, "3", topic, "ping", {"null": True}],
           ["0", "4", topic, "phx_leave", {}],
           [1, "5", topic, "ping", {"number": True}])        # 1 is not "1"
    s.post([None, "6", topic, "ping", {"null": "again"}])
    frames = s.frames_until(lambda f: f[1] == "6")
    assert [f[1] for f in frames] == ["3", "6"], frames
    assert frames[0] == ["1", "3", topic, "phx_reply", {"status": "ok", "response": {"null": True}}]
    s.post([None, "7", topic, "phx_leave", {}])
    frames = s.frames_until(lambda f: f[3] == "phx_close")
    assert frames == [["1", "7", topic, "phx_reply", {"status": "ok", "response": {}}],
                      ["1", "1", topic, "phx_close", {}]]


# ---- V1: no join_ref ever, "ref": null on pushes and broadcasts -----------------------------------

def test_v1_frames_never_carry_join_ref_and_pushes_and_broadcasts_carry_null_ref(cluster):
    """v1_json_serializer.ex: encode_v1_fields_only/1 takes topic, event, payload, ref; a
    fastlane broadcast and a push have ref nil.  JavaPhoenixChannels and PhoenixSharp rely on
    both.  Every kind of frame: join ok and error, unmatched topic, push reply, heartbeat,
    push, broadcast, phx_close, phx_error."""
    topic = f"echo:{uid()}"
    seen = []

    def recv(ws, event=None):
        frame = ws.recv_json(5)
        assert isinstance(frame, dict) and set(frame) == V1_KEYS, frame
        assert event is None or frame["event"] == event, frame
        seen.append(frame["event"])
        return frame

    with RawWS.connect(cluster.raw_url(0, vsn="1.0.0")) as ws:
        ws.send_json({"topic": topic, "event": "phx_join", "payload": {}, "ref": "1", "join_ref": "1"})
        assert recv(ws)["payload"] == {"status": "ok", "response": {"joined": topic}}
        ws.send_json({"topic": f"private:{uid()}", "event": "phx_join", "payload": {}, "ref": "2",
                      "join_ref": "2"})
        assert recv(ws)["payload"] == {"status": "error", "response": {"reason": "unauthorized"}}
        ws.send_json({"topic": f"nosuch:{uid()}", "event": "phx_join", "payload": {}, "ref": "3"})
        assert recv(ws)["payload"]["response"] == {"reason": "unmatched topic"}
        ws.send_json({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": "4"})
        assert recv(ws)["ref"] == "4"
        ws.send_json({"topic": topic, "event": "push", "payload": {"p": 1}, "ref": "5"})
        assert recv(ws, "pushed") == {"topic": topic, "event": "pushed", "payload": {"p": 1}, "ref": None}
        ws.send_json({"topic": topic, "event": "bcast", "payload": {"b": 2}, "ref": "6"})
        got = [recv(ws), recv(ws)]
        assert {"topic": topic, "event": "bcast", "payload": {"b": 2}, "ref": None} in got
        assert {"topic": topic, "event": "phx_reply", "ref": "6",
                "payload": {"status": "ok", "response": {}}} in got
        ws.send_json({"topic": topic, "event": "raise", "payload": {}, "ref": "7"})
        # (pushes still unanswered, "push" and "raise" here, get an error reply first)
        while (frame := recv(ws))["event"] != "phx_error":
            assert frame["payload"] == {"status": "error", "response": {"reason": "channel lost"}}
        assert frame == {"topic": topic, "event": "phx_error", "payload": {"reason": "channel_crash"},
                         "ref": "1"}
        ws.send_json({"topic": topic, "event": "phx_join", "payload": {}, "ref": "8"})
        assert recv(ws)["payload"]["status"] == "ok"
        ws.send_json({"topic": topic, "event": "phx_leave", "payload": {}, "ref": "9"})
        got = [recv(ws), recv(ws)]
        assert {f["event"] for f in got} == {"phx_reply", "phx_close"}
    assert {"phx_reply", "pushed", "bcast", "phx_error", "phx_close"} <= set(seen)


# ---- a vsn that is not a string (Phoenix 1.8.6, #6662) ----------------------------------------------

@pytest.mark.parametrize("query", ["vsn%5B%5D=2.0.0", "vsn%5Ba%5D=1"])
def test_a_vsn_that_is_not_a_string_is_refused_not_crashed_on(cluster, query):
    """socket.ex connect/2 negotiates only `when is_binary(vsn)`; anything else is refused
    (WebSocket 403, LongPoll {"status":403}), and the edge carries on."""
    with pytest.raises(HandshakeRefused) as refused:
        RawWS.connect(f"{cluster.ws_urls[0]}/websocket?{query}")
    assert refused.value.code == 403
    status, _headers, body = http(lp_url(cluster.http_urls[0], f"{query}&"))
    assert (status, json.loads(body)) == (200, {"status": 403})
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json([None, "1", "phoenix", "heartbeat", {}])
        assert ws.recv_json(5)[1] == "1"
