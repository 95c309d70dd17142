"""The edge's WebSocket frame parser, in-process: property tests with hypothesis.

However the bytes are split across reads, valid frames give the same messages; arbitrary
bytes never raise out of the protocol (they end in a close frame, at worst).
"""
from __future__ import annotations

import asyncio
import os
import struct

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zchannels.edge.hub import Limits
from zchannels.edge.serializer import V2
from zchannels.edge.wsproto import InboundBudget, WebSocketProtocol


class FakeTransport:
    def __init__(self):
        self.written = bytearray()
        self.closed = False
        self.paused = False

    def write(self, data):
        self.written += data

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def abort(self):
        self.closed = True

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_write_buffer_size(self):
        return 0

    def set_write_buffer_limits(self, high=None, low=None):
        pass


class FakeConn:
    serializer = V2
    label = "test"

    def __init__(self):
        self.messages = []

    def handle(self, msg):
        self.messages.append(msg)

    def on_transport_closed(self):
        pass

    def control_in(self):
        return True


class FakeHub:
    def __init__(self, max_frame_size=1 << 16):
        self.limits = Limits(max_frame_size=max_frame_size)
        self.stats = {"bad_frames": 0, "slow_consumer_closes": 0}
        self.inbound_budget = InboundBudget(self.limits.max_inbound_buffered, self.stats)


def masked(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    head += bytes([0x80 | n]) if n < 126 else struct.pack("!BH", 0x80 | 126, n)
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def feed(chunks: list[bytes], max_frame_size: int = 1 << 16):
    """Run a protocol over the chunks inside an event loop; return (conn, transport)."""
    async def run():
        conn = FakeConn()
        proto = WebSocketProtocol(FakeHub(max_frame_size), lambda _t: conn, b"")
        transport = FakeTransport()
        proto.connection_made(transport)
        for chunk in chunks:
            proto.data_received(chunk)
            for _ in range(5):      # let paused reads resume
                await asyncio.sleep(0)
        for _ in range(50):
            await asyncio.sleep(0)
        return conn, transport
    return asyncio.run(run())


messages = st.lists(st.tuples(st.text(max_size=20), st.text(max_size=300)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages, st.data())
def test_valid_frames_give_the_same_messages_however_they_are_split(msgs, data):
    stream = b"".join(masked(orjson.dumps(["1", str(i), "room:" + t, "ev", {"b": b}]))
                      for i, (t, b) in enumerate(msgs))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    conn, transport = feed(chunks)
    assert [(m.topic, m.payload["b"]) for m in conn.messages] == [("room:" + t, b) for t, b in msgs]
    assert not transport.closed


def test_fragments_are_reassembled():
    body = orjson.dumps([None, "1", "phoenix", "heartbeat", {"x": "y" * 50}])
    stream = masked(body[:10], fin=False) + masked(body[10:30], opcode=0, fin=False) \
        + masked(b"", opcode=9) + masked(body[30:], opcode=0)
    conn, transport = feed([stream])
    assert len(conn.messages) == 1 and conn.messages[0].payload == {"x": "y" * 50}
    assert transport.written.startswith(b"\x8a\x00")   # the ping in between was answered


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_bytes_never_escape_the_protocol(chunks):
    conn, transport = feed(chunks, max_frame_size=1024)
    if transport.closed:
        assert transport.written[-1:] != b"" and b"\x88" in transport.written   # a close frame went out


def test_oversize_frame_closes_with_1009_before_the_payload_arrives():
    head = bytes([0x81, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + os.urandom(4)
    _conn, transport = feed([head], max_frame_size=1024)
    assert transport.closed and transport.written.startswith(b"\x88") \
        and transport.written[2:4] == (1009).to_bytes(2, "big")
