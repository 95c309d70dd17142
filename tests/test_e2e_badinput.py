"""Malformed and hostile client input, over a raw WebSocket.

Whatever the edge does with a bad frame (an error reply, or closing that one connection), it
must never hurt anyone else: a second client, connected and joined before the bad frame, still
gets its ping replied afterwards. The edge runs with --max-frame-size 1024 and --max-channels 4.
"""
from __future__ import annotations

import json
import uuid

import pytest

from tests.rawws import RawWS

MAX_FRAME = 1024
MAX_CHANNELS = 4
HEARTBEAT_REPLY = [None, "hb", "phoenix", "phx_reply", {"status": "ok", "response": {}}]


def uid() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def cluster(module_cluster_factory):
    return module_cluster_factory(edges=1, workers=1, edge_args=[
        "--max-frame-size", str(MAX_FRAME), "--max-channels", str(MAX_CHANNELS)])


class Joined:
    """A raw V2 client joined to its own echo topic."""

    def __init__(self, cluster, name: str):
        self.topic = f"echo:{name}-{uid()}"
        self.ws = RawWS.connect(cluster.raw_url(0))
        self.refs = iter(range(100, 10_000))
        self.ws.send_json(["1", "1", self.topic, "phx_join", {}])
        reply = self.ws.recv_json(5)
        assert reply == ["1", "1", self.topic, "phx_reply", {"status": "ok", "response": {"joined": self.topic}}]

    def ping(self, timeout: float = 5.0) -> None:
        ref = str(next(self.refs))
        self.ws.send_json(["1", ref, self.topic, "ping", {"ref": ref}])
        reply = self.ws.recv_until(lambda m: isinstance(m, list) and m[1] == ref, timeout)
        assert reply == ["1", ref, self.topic, "phx_reply", {"status": "ok", "response": {"ref": ref}}]


@pytest.fixture
def bystander(cluster):
    b = Joined(cluster, "bystander")
    b.ping()
    yield b
    b.ws.close()


def outcome_after(ws: RawWS, timeout: float = 5.0) -> tuple[str, list]:
    """Send a heartbeat after the bad frame: ("closed", msgs) or ("alive", msgs before the reply)."""
    ws.send_json([None, "hb", "phoenix", "heartbeat", {}])
    seen = []
    while True:
        msg = ws.recv(timeout)
        if msg is None:
            return "closed", seen
        value = json.loads(msg) if isinstance(msg, str) else msg
        if value == HEARTBEAT_REPLY:
            return "alive", seen
        seen.append(value)


def bin_push(join_ref: str, ref: str, topic: str, event: str, data: bytes) -> bytes:
    parts = [s.encode() for s in (join_ref, ref, topic, event)]
    return bytes([0, *map(len, parts)]) + b"".join(parts) + data


BAD_FRAMES = {
    "not_json": "this is not json",
    "truncated_json": '["1","2","echo:x","ping",{',
    "json_object_in_v2": '{"topic":"echo:x","event":"ping","payload":{},"ref":"1"}',
    "json_scalar": "42",
    "json_null": "null",
    "empty_text": "",
    "array_too_short": '["1","2","echo:x"]',
    "empty_array": "[]",
    "numeric_topic": '["1","2",5,"phx_join",{}]',
    "numeric_event": '["1","2","echo:x",7,{}]',
    "numeric_refs": '[1,2,"echo:x","ping",{}]',
    "object_refs": '[{},[],"echo:x","ping",{}]',
    "list_join_payload": '["9","9","echo:listjoin","phx_join",[1,2]]',
    "deep_nesting": "[" * 400 + "]" * 400,
    "heartbeat_wrong_topic_shape": '[null,"hb2",null,"heartbeat",{}]',
    "invalid_binary_kind": b"\x05\x00\x00\x00\x00",
    "binary_kind_reply_from_client": b"\x01\x01\x01\x01\x01abcd",
    "binary_kind_broadcast_from_client": b"\x02\x01\x01ab",
    "binary_truncated_header": b"\x00\x05",
    "binary_lengths_past_end": b"\x00\x09\x09\x09\x09abc",
    "binary_empty": b"",
    "binary_invalid_utf8_topic": bytes([0, 1, 1, 2, 1]) + b"12\xff\xfee",
    "binary_to_unjoined_topic": bin_push("1", "7", "echo:notjoined", "ping", b"\x01"),
}


@pytest.mark.parametrize("frame", list(BAD_FRAMES.values()), ids=list(BAD_FRAMES))
def test_bad_frame_affects_only_its_own_connection(cluster, bystander, frame):
    bad = Joined(cluster, "bad")
    try:
        bad.ws.send(frame)
        state, seen = outcome_after(bad.ws)
        if state == "alive":
            # An error reply (if any) is a Phoenix reply, not garbage.
            for msg in seen:
                assert isinstance(msg, list) and len(msg) == 5 and msg[3] in ("phx_reply", "phx_error",
                                                                              "phx_close"), msg
            bad.ping()
        else:
            assert bad.ws.close_code is None or 1000 <= bad.ws.close_code < 5000
        bystander.ping()
    finally:
        bad.ws.close()


def test_push_to_unjoined_topic_replies_unmatched_topic(cluster, bystander):
    """docs/protocol.md §10.23 / §4.3 S14: join_ref null in the reply, whatever the request carried."""
    topic = f"echo:{uid()}"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["1", "2", topic, "ping", {}])
        assert ws.recv_json(3) == [None, "2", topic, "phx_reply",
                                   {"status": "error", "response": {"reason": "unmatched topic"}}]
        ws.send_json([None, "3", topic, "ping", {}])
        assert ws.recv_json(3) == [None, "3", topic, "phx_reply",
                                   {"status": "error", "response": {"reason": "unmatched topic"}}]
    bystander.ping()


@pytest.mark.parametrize("kind", ["text", "binary"])
def test_oversize_frame_closes_with_1009(cluster, bystander, kind):
    bad = Joined(cluster, "big")
    try:
        if kind == "text":
            bad.ws.send_json(["1", "5", bad.topic, "ping", {"pad": "x" * (MAX_FRAME + 10)}])
        else:
            bad.ws.send(bin_push("1", "5", bad.topic, "binary", b"\x00" * (MAX_FRAME + 10)))
        assert bad.ws.wait_closed(5), "oversize frame did not close the connection"
        assert bad.ws.close_code == 1009
        bystander.ping()
    finally:
        bad.ws.close()


def test_frame_just_under_the_limit_is_accepted(cluster, bystander):
    bad = Joined(cluster, "edge")
    try:
        head = json.dumps(["1", "5", bad.topic, "ping", {"pad": ""}], separators=(",", ":"))
        pad = "y" * (MAX_FRAME - len(head))
        bad.ws.send_json(["1", "5", bad.topic, "ping", {"pad": pad}])
        assert bad.ws.recv_json(5) == ["1", "5", bad.topic, "phx_reply", {"status": "ok", "response": {"pad": pad}}]
    finally:
        bad.ws.close()


def test_too_many_channels_is_refused_per_join(cluster, bystander):
    """docs/protocol.md §10.12 / §4.3 S6: the join past --max-channels gets "too many channels joined"; others keep working."""
    with RawWS.connect(cluster.raw_url(0)) as ws:
        base = uid()
        for i in range(MAX_CHANNELS):
            ref = str(i + 1)
            ws.send_json([ref, ref, f"echo:{base}-{i}", "phx_join", {}])
            assert ws.recv_json(3)[4]["status"] == "ok"
        topic = f"echo:{base}-{MAX_CHANNELS}"
        ws.send_json(["99", "99", topic, "phx_join", {}])
        assert ws.recv_json(3) == ["99", "99", topic, "phx_reply",
                                   {"status": "error", "response": {"reason": "too many channels joined"}}]
        ws.send_json(["1", "100", f"echo:{base}-0", "ping", {"still": 1}])
        assert ws.recv_json(3) == ["1", "100", f"echo:{base}-0", "phx_reply",
                                   {"status": "ok", "response": {"still": 1}}]
        # Leaving one frees a slot.
        ws.send_json(["2", "101", f"echo:{base}-1", "phx_leave", {}])
        ws.recv_until(lambda m: m[3] == "phx_close", 3)
        ws.send_json(["102", "102", topic, "phx_join", {}])
        assert ws.recv_until(lambda m: m[1] == "102", 3)[4]["status"] == "ok"
    bystander.ping()


def test_many_bad_frames_in_a_row_do_not_stall_the_edge(cluster, bystander):
    with RawWS.connect(cluster.raw_url(0)) as ws:
        for i in range(200):
            ws.send_json(["1", str(i), f"echo:never-{i}", "ping", {}])
        for i in range(200):
            assert ws.recv_json(5)[1] == str(i)
    bystander.ping()


@pytest.mark.parametrize("frame", ["this is not json", "x" * (MAX_FRAME + 10), b"\x05\x00"],
                         ids=["undecodable_text", "oversize", "undecodable_binary"])
def test_connection_closed_by_the_edge_terminates_its_channels(cluster, bystander, frame):
    """A connection the edge closes for bad input is a closed connection like any other: every
    channel it held runs terminate (Phoenix: the channel sees its transport go down)."""
    topic = f"terminate:{uid()}"
    watcher = Joined(cluster, "watcher")
    watcher.ws.send_json(["2", "2", "terminations:" + topic, "phx_join", {}])
    assert watcher.ws.recv_json(3)[4]["status"] == "ok"
    with RawWS.connect(cluster.raw_url(0)) as ws:
        ws.send_json(["1", "1", topic, "phx_join", {}])
        assert ws.recv_json(3)[4]["status"] == "ok"
        ws.send(frame)
        assert ws.wait_closed(5)
    msg = watcher.ws.recv_until(lambda m: m[3] == "terminated", 5)
    assert msg[2] == "terminations:" + topic
    watcher.ws.close()
    bystander.ping()
