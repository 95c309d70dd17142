"""The replies to a client's messages keep Phoenix's order (docs/protocol.md §5.10, item 5), on LongPoll
and WebSocket alike.

Phoenix's socket process runs a join to its reply before it reads the next message, so a
join's reply precedes the replies to everything sent after it, and the replies the socket
writes itself (heartbeat, unmatched topic, leave of a topic not joined) keep the order of
their messages.  A push's reply comes when its channel answers, in Phoenix too.  The edge
answers heartbeats and errors at once and sends joins to workers, so it holds the messages
that come after a pending join (edge/holding.py), within bounds.

One broker, one edge, two workers running tests/apps/protocol_app.py; ``slowjoin:*`` joins
take as long as their payload says.
"""
from __future__ import annotations

import json
import time
import uuid

import pytest

from zchannels.edge.holding import MAX_HELD, MAX_HOLD_SECONDS
from tests.rawws import RawWS
from tests.test_e2e_longpoll import NDJSON, http, lp_url

pytestmark = pytest.mark.timeout(60)

APP = "tests/apps/protocol_app.py"
HEARTBEAT = "phoenix"


@pytest.fixture(scope="module")
def cluster(module_cluster_factory):
    return module_cluster_factory(app=APP, edges=1, workers=2)


def uid() -> str:
    return uuid.uuid4().hex[:10]


def mixed_batch(echo: str, echo_join_ref: str) -> tuple[list, list[str]]:
    """A batch of messages whose replies the edge and the workers produce, interleaved with
    joins; returns (frames, refs of the replies whose order is Phoenix's)."""
    slow, fast = f"slowjoin:{uid()}", f"echo:{uid()}"
    frames = [
        ["1", "1", slow, "phx_join", {"s": 0.3}],        # worker, slow
        [None, "2", HEARTBEAT, "heartbeat", {}],           # edge
        ["1", "3", f"echo:{uid()}", "ping", {}],          # edge: unmatched topic
        [echo_join_ref, "4", echo, "ping", {"n": 4}],     # worker (a joined channel)
        ["5", "5", fast, "phx_join", {}],                 # worker, fast
        [None, "6", HEARTBEAT, "heartbeat", {}],           # edge
        ["1", "7", slow, "ping", {"n": 7}],                # worker (joined by now)
        ["8", "8", f"echo:{uid()}", "phx_leave", {}],     # edge: leave of a topic not joined
    ]
    return frames, ["1", "2", "3", "5", "6", "8"]


def assert_phoenix_order(replies: list, ordered: list[str]) -> None:
    refs = [r[1] for r in replies]
    assert sorted(refs, key=int) == [str(i) for i in range(1, 9)], replies
    at = {ref: i for i, ref in enumerate(refs)}
    assert sorted(ordered, key=at.get) == ordered, refs       # joins and the edge's own replies
    assert at["4"] > at["1"] and at["7"] > at["6"], refs      # pushes: after the joins before them
    by_ref = {r[1]: r for r in replies}
    assert by_ref["1"][4] == {"status": "ok", "response": {"joined": replies[at["1"]][2]}}
    assert by_ref["3"][4] == {"status": "error", "response": {"reason": "unmatched topic"}}
    assert by_ref["7"][4] == {"status": "ok", "response": {"n": 7}}


# ---- LongPoll ------------------------------------------------------------------------------------

class Session:
    def __init__(self, http_url: str):
        status, _headers, body = http(lp_url(http_url, "vsn=2.0.0&user=order&"))
        self.token = json.loads(body)["token"]
        self.url = lp_url(http_url, f"vsn=2.0.0&token={self.token}")

    def post(self, frames: list) -> None:
        body = "\n".join(json.dumps(f) for f in frames).encode()
        status, _headers, answer = http(self.url, "POST", body, NDJSON)
        assert (status, json.loads(answer)) == (200, {"status": 200})

    def replies(self, count: int, timeout: float = 15.0) -> list:
        """Poll until `count` phx_reply frames came; return them in the order received."""
        got: list = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            assert time.monotonic() < deadline, got
            status, _headers, body = http(self.url, timeout=timeout)
            answer = json.loads(body)
            assert answer["status"] in (200, 204), answer
            got += [f for f in map(json.loads, answer["messages"]) if f[3] == "phx_reply"]
        return got


def test_longpoll_replies_come_back_in_the_order_of_the_posts_lines(cluster):
    s = Session(cluster.http_urls[0])
    echo = f"echo:{uid()}"
    s.post([["e", "e", echo, "phx_join", {}]])
    assert s.replies(1)[0][1] == "e"
    frames, ordered = mixed_batch(echo, "e")
    s.post(frames)
    assert_phoenix_order(s.replies(8), ordered)


def test_longpoll_join_then_heartbeat_in_one_post(cluster):
    """The case phoenix.js's fallback ping can meet: the join's reply first."""
    s = Session(cluster.http_urls[0])
    topic = f"slowjoin:{uid()}"
    s.post([["1", "1", topic, "phx_join", {"s": 0.2}], [None, "2", HEARTBEAT, "heartbeat", {}]])
    assert s.replies(2) == [
        ["1", "1", topic, "phx_reply", {"status": "ok", "response": {"joined": topic}}],
        [None, "2", HEARTBEAT, "phx_reply", {"status": "ok", "response": {}}]]


# ---- WebSocket ------------------------------------------------------------------------------------

def ws_replies(ws: RawWS, count: int, timeout: float = 15.0) -> list:
    got = []
    while len(got) < count:
        frame = ws.recv_json(timeout)
        if frame[3] == "phx_reply":
            got.append(frame)
    return got


def test_websocket_replies_come_back_in_the_order_of_the_frames(cluster):
    echo = f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["e", "e", echo, "phx_join", {}])
        assert ws_replies(ws, 1)[0][1] == "e"
        frames, ordered = mixed_batch(echo, "e")
        for frame in frames:
            ws.send_json(frame)
        assert_phoenix_order(ws_replies(ws, 8), ordered)


def test_joins_of_one_connection_are_answered_in_order(cluster):
    """A slow join, then a fast one: Phoenix answers the slow one first."""
    slow, fast = f"slowjoin:{uid()}", f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["1", "1", slow, "phx_join", {"s": 0.4}])
        ws.send_json(["2", "2", fast, "phx_join", {}])
        ws.send_json(["3", "3", f"private:{uid()}", "phx_join", {}])
        assert [r[1] for r in ws_replies(ws, 3)] == ["1", "2", "3"]


def test_a_join_unanswered_for_too_long_holds_later_messages_no_longer(cluster):
    """The bound: after MAX_HOLD_SECONDS the heartbeat is answered without waiting any more,
    and the join's reply still comes when its handler returns."""
    topic = f"slowjoin:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        started = time.monotonic()
        ws.send_json(["1", "1", topic, "phx_join", {"s": MAX_HOLD_SECONDS + 1.5}])
        ws.send_json([None, "2", HEARTBEAT, "heartbeat", {}])
        assert ws.recv_json(MAX_HOLD_SECONDS + 5)[1] == "2"
        assert time.monotonic() - started >= MAX_HOLD_SECONDS * 0.9
        ws.send_json([None, "3", HEARTBEAT, "heartbeat", {}])   # no longer held
        assert ws.recv_json(1)[1] == "3"
        assert ws.recv_json(5) == ["1", "1", topic, "phx_reply",
                                   {"status": "ok", "response": {"joined": topic}}]
    assert "messages no longer wait for the join" in cluster.edge_procs[0].stderr_text()


def test_past_max_held_messages_are_answered_without_waiting(cluster):
    """The other bound: a client pipelining more than MAX_HELD messages behind one join gets
    the rest handled at once (out of order), not buffered without limit."""
    topic = f"slowjoin:{uid()}"
    extra = 20
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["j", "j", topic, "phx_join", {"s": 1.0}])
        for i in range(MAX_HELD + extra):
            ws.send_json([None, str(i), HEARTBEAT, "heartbeat", {}])
        refs = [r[1] for r in ws_replies(ws, MAX_HELD + extra + 1)]
    assert refs[:extra] == [str(i) for i in range(MAX_HELD, MAX_HELD + extra)]
    assert refs[extra:] == ["j"] + [str(i) for i in range(MAX_HELD)]

