"""Refs echoed verbatim whatever their JSON type, and V1 JSON in binary frames (docs/protocol.md §1.3,
§3.3): what phxsocket (integer refs) and phx-events (V1 JSON in binary frames) rely on."""
from __future__ import annotations

import json
import uuid

import pytest

from tests.rawws import RawWS

pytestmark = pytest.mark.timeout(30)


def topic() -> str:
    return f"echo:refs-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def cluster(module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1)


def test_integer_refs_are_echoed_as_integers_through_join_push_reply_and_leave(cluster):
    t = topic()
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json([7, 8, t, "phx_join", {}])
        assert ws.recv_json(5) == [7, 8, t, "phx_reply", {"status": "ok", "response": {"joined": t}}]
        ws.send_json([7, 9, t, "ping", {"n": 1}])
        assert ws.recv_json(5) == [7, 9, t, "phx_reply", {"status": "ok", "response": {"n": 1}}]
        ws.send_json([7, 10, t, "push", {"p": 2}])
        assert ws.recv_json(5) == [7, None, t, "pushed", {"p": 2}]
        ws.send_json([None, 11, "phoenix", "heartbeat", {}])
        assert ws.recv_json(5) == [None, 11, "phoenix", "phx_reply", {"status": "ok", "response": {}}]
        ws.send_json([7, 12, t, "phx_leave", {}])
        got = [ws.recv_json(5), ws.recv_json(5)]
        assert [7, 12, t, "phx_reply", {"status": "ok", "response": {}}] in got
        assert [7, 7, t, "phx_close", {}] in got


def test_a_stale_integer_join_ref_is_dropped_and_a_string_of_the_same_digits_is_another_ref(cluster):
    t = topic()
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json([3, 1, t, "phx_join", {}])
        assert ws.recv_json(5)[:4] == [3, 1, t, "phx_reply"]
        ws.send_json(["3", 2, t, "ping", {}])        # "3" is not 3: dropped, as Phoenix does
        ws.send_json([3, 4.5, t, "ping", {"ok": True}])
        assert ws.recv_json(5) == [3, 4.5, t, "phx_reply", {"status": "ok", "response": {"ok": True}}]


def test_v1_json_in_a_binary_frame_is_answered_like_a_text_frame(cluster):
    t = topic()
    with RawWS.connect(cluster.raw_url(0, vsn="1.0.0")) as ws:
        ws.send_binary(json.dumps({"topic": t, "event": "phx_join", "payload": {}, "ref": 1}).encode())
        reply = ws.recv_json(5)
        assert reply == {"topic": t, "event": "phx_reply", "ref": 1,
                         "payload": {"status": "ok", "response": {"joined": t}}}
        ws.send_binary(json.dumps({"topic": t, "event": "ping", "payload": {"a": 1}, "ref": "2"}).encode())
        assert ws.recv_json(5) == {"topic": t, "event": "phx_reply", "ref": "2",
                                   "payload": {"status": "ok", "response": {"a": 1}}}


def test_v1_binary_frame_that_is_not_json_closes_only_that_connection(cluster):
    with RawWS.connect(cluster.raw_url(0, vsn="1.0.0")) as bad, \
            RawWS.connect(cluster.raw_url(0, vsn="1.0.0")) as good:
        bad.send_binary(b"\x00\x01 not json")
        assert bad.wait_closed(5) and bad.close_code == 1007
        good.send_json({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": 5})
        assert good.recv_json(5)["ref"] == 5
