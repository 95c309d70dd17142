"""permessage-deflate (RFC 7692) on the edge's WebSockets (``--compress``).

In-process: what the edge answers to each offer, compressed frames in (inflated, bounded by
--max-frame-size, RSV1 only where RFC 7692 §6.1 allows it) and out (every message inflates on its own).
End to end: with ``--compress`` a broadcast reaches compressed and plain raw clients, the
compressed ones all get the same frame bytes, and phoenix.js over Node's `ws` (which offers
the extension by default) agrees it and gets its broadcasts; without ``--compress`` nothing
is agreed.
"""
from __future__ import annotations

import asyncio
import json
import os
import struct
import zlib

import pytest

from zchannels.bus import wire
from zchannels.edge import wsdeflate
from zchannels.edge.connection import ChannelRef
from zchannels.edge.fastlane import FastLane
from zchannels.edge.serializer import V2
from zchannels.edge.wsdeflate import DeflateWebSocketProtocol, negotiate
from zchannels.edge.wsproto import WebSocketProtocol
from tests.blockingws import BlockingWS
from tests.test_wsproto import FakeConn, FakeHub, FakeTransport, masked
from tests.test_wsstrict import close_code

pytestmark = pytest.mark.timeout(60)

AGREED = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"


# --- negotiation -------------------------------------------------------------------------------
@pytest.mark.parametrize("offer, answer", [
    ("permessage-deflate", AGREED),
    ("permessage-deflate; client_max_window_bits", AGREED),            # Chromium's and ws's offer
    ("permessage-deflate; client_max_window_bits=10", AGREED),
    ("permessage-deflate; client_no_context_takeover", AGREED),
    ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", AGREED),
    ('permessage-deflate; server_max_window_bits="15"', AGREED + "; server_max_window_bits=15"),
    ("x-webkit-deflate-frame, permessage-deflate", AGREED),
    # declined: a window narrower than the shared compressor's, then a fallback offer
    ("permessage-deflate; server_max_window_bits=10, permessage-deflate", AGREED),
    ("permessage-deflate; server_max_window_bits=10", None),
    ("permessage-deflate; server_max_window_bits", None),               # needs a value
    ("permessage-deflate; client_max_window_bits=16", None),
    ("permessage-deflate; server_no_context_takeover=1", None),
    ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", None),
    ("permessage-deflate; mystery", None),
    ("x-webkit-deflate-frame", None),
    ("", None),
])
def test_each_offer_is_answered_as_rfc7692_says(offer, answer):
    assert negotiate(offer) == answer


# --- in-process ------------------------------------------------------------------------------
def feed_deflate(chunks: list[bytes], max_frame_size: int = 1 << 16):
    async def run():
        conn = FakeConn()
        proto = DeflateWebSocketProtocol(FakeHub(max_frame_size), lambda _t: conn, b"")
        transport = FakeTransport()
        proto.connection_made(transport)
        for chunk in chunks:
            proto.data_received(chunk)
            for _ in range(5):
                await asyncio.sleep(0)
        return conn, transport, proto
    return asyncio.run(run())


def client_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(wsdeflate.TAIL)
    return out[:-4]


def with_rsv1(frame: bytes) -> bytes:
    return bytes((frame[0] | 0x40,)) + frame[1:]


def message(i: int, body: str = "x" * 200) -> bytes:
    return json.dumps([None, str(i), "phoenix", "heartbeat", {"body": body}]).encode()


def test_compressed_messages_are_inflated_one_by_one():
    frames = [with_rsv1(masked(client_deflate(message(i)))) for i in range(3)]
    frames.insert(1, masked(message(9)))                       # uncompressed messages still pass
    conn, transport, _ = feed_deflate([b"".join(frames)])
    assert [m.ref for m in conn.messages] == ["0", "9", "1", "2"]
    assert not transport.closed


def test_a_fragmented_compressed_message_is_inflated_as_it_arrives():
    data = client_deflate(message(5, "é" * 300))
    stream = with_rsv1(masked(data[:7], fin=False)) + masked(data[7:20], opcode=0, fin=False) \
        + masked(b"", opcode=0x9) + masked(data[20:], opcode=0)
    conn, transport, proto = feed_deflate([stream])
    assert [m.payload for m in conn.messages] == [{"body": "é" * 300}]
    assert proto.inflater is None and not transport.closed


def test_a_decompression_bomb_closes_1009_without_inflating_past_the_limit():
    bomb = client_deflate(b" " * 50_000_000)                  # about 50 KB on the wire
    assert len(bomb) < 64 * 1024
    inflated = []
    real = zlib.decompressobj

    class Watched:
        def __init__(self, *args):
            self.d = real(*args)

        def decompress(self, data, max_length=0):
            out = self.d.decompress(data, max_length)
            inflated.append(len(out))
            return out

    wsdeflate.zlib.decompressobj, saved = Watched, wsdeflate.zlib.decompressobj
    try:
        conn, transport, _ = feed_deflate([with_rsv1(masked(bomb))], max_frame_size=64 * 1024)
    finally:
        wsdeflate.zlib.decompressobj = saved
    assert close_code(transport.written) == 1009 and transport.closed
    assert conn.messages == [] and sum(inflated) <= 64 * 1024 + 1


def test_a_fragmented_bomb_is_bounded_by_the_whole_message():
    data = client_deflate(b"a" * 200_000)
    pieces = [data[i:i + 100] for i in range(0, len(data), 100)]
    stream = with_rsv1(masked(pieces[0], fin=False)) + b"".join(
        masked(p, opcode=0, fin=p is pieces[-1]) for p in pieces[1:])
    _conn, transport, _ = feed_deflate([stream], max_frame_size=100_000)
    assert close_code(transport.written) == 1009


def test_bad_compressed_data_closes_1007():
    _conn, transport, _ = feed_deflate([with_rsv1(masked(b"\xff\xff\xff\xff not deflate"))])
    assert close_code(transport.written) == 1007


@pytest.mark.parametrize("frame, why", [
    (with_rsv1(masked(b"", opcode=0x9)), "rsv1 on a ping"),
    (masked(b"x", fin=False) + with_rsv1(masked(b"y", opcode=0)), "rsv1 on a continuation"),
    (bytes((0xA1,)) + masked(b"x")[1:], "rsv2"),
    (bytes((0x91,)) + masked(b"x")[1:], "rsv3"),
])
def test_reserved_bits_rfc7692_does_not_give_meaning_still_fail_1002(frame, why):
    _conn, transport, _ = feed_deflate([frame])
    assert close_code(transport.written) == 1002, why


def test_outbound_messages_each_inflate_on_their_own():
    """One compressor for the process, reset after every message (server_no_context_takeover):
    any message inflates with a fresh decompressor, whatever was compressed before it."""
    payloads = [os.urandom(50).hex().encode() * 3, b'{"a":' + b"1" * 500 + b"}", b"z" * 70]
    for data in payloads * 2:
        frame = wsdeflate.build_deflated_frame(data, binary=False)
        assert frame[0] == 0xC1                              # FIN, RSV1, text
        n, head = frame[1], 2
        if n == 126:
            n, head = struct.unpack("!H", frame[2:4])[0], 4
        assert zlib.decompressobj(-15).decompress(frame[head:] + wsdeflate.TAIL) == data
    assert wsdeflate.build_deflated_frame(b"[1]", binary=True) == b"\x82\x03[1]"   # short: plain


class Transport:
    def __init__(self, cls):
        self.cls, self.sent, self.prebuilt = cls, [], 0
        self.frame_kind = cls.frame_kind

    def prebuild(self, data: bytes, binary: bool) -> bytes:
        self.prebuilt += 1
        return self.cls.prebuild(None, data, binary)

    def send_prebuilt(self, frame: bytes) -> None:
        self.sent.append(frame)


class Conn:
    origin = b""
    serializer = V2

    def __init__(self, cls):
        self.transport = Transport(cls)
        self.fmt_key = (V2, cls.frame_kind)


def test_the_fast_lane_compresses_a_broadcast_once_and_writes_it_to_every_compressed_subscriber():
    lane = FastLane(on_disconnect=lambda key: None)
    conns = [Conn(DeflateWebSocketProtocol if i % 2 else WebSocketProtocol) for i in range(10)]
    for conn in conns:
        ch = ChannelRef(conn, "room:z", "1")
        lane.hold(ch)
        lane.add(ch)
    payload = json.dumps({"body": "compress me " * 40}).encode()
    lane.deliver(wire.broadcast_frames("room:z", "new_msg", payload))
    compressed = [c.transport.sent[0] for c in conns[1::2]]
    plain = [c.transport.sent[0] for c in conns[::2]]
    assert sum(c.transport.prebuilt for c in conns) == 2          # once per kind of frame
    assert all(f is compressed[0] for f in compressed) and all(f is plain[0] for f in plain)
    assert compressed[0][0] == 0xC1 and plain[0][0] == 0x81 and len(compressed[0]) < len(plain[0]) / 3
    head = 4 if compressed[0][1] == 126 else 2
    assert zlib.decompressobj(-15).decompress(compressed[0][head:] + wsdeflate.TAIL) == plain[0][4:]


# --- end to end ------------------------------------------------------------------------------
def inflate_frame(first: int, payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + wsdeflate.TAIL) if first & 0x40 else payload


def join(ws: BlockingWS, topic: str) -> None:
    ws.send_json(["1", "1", topic, "phx_join", {}])
    while True:
        first, payload = ws.recv_whole_frame()
        msg = json.loads(inflate_frame(first, payload))
        if msg[3] == "phx_reply" and msg[1] == "1":
            assert msg[4]["status"] == "ok", msg
            return


def next_broadcast(ws: BlockingWS) -> tuple[int, bytes, list]:
    while True:
        first, payload = ws.recv_whole_frame()
        msg = json.loads(inflate_frame(first, payload))
        if msg[3] == "bcast":
            return first, payload, msg


def test_with_compress_a_broadcast_reaches_compressed_and_plain_clients(cluster_factory):
    cluster = cluster_factory(edges=1, workers=1, edge_args=["--compress"])
    url = cluster.http_urls[0]
    offer = "permessage-deflate; client_max_window_bits"
    zs = [BlockingWS(url, f"z{i}", extensions=offer) for i in range(3)]
    plain = BlockingWS(url, "p")
    try:
        for ws in zs:
            assert f"Sec-WebSocket-Extensions: {AGREED}" in ws.response_head
        assert "Sec-WebSocket-Extensions" not in plain.response_head
        for ws in [*zs, plain]:
            join(ws, "echo:deflate")
        body = {"text": "a fairly repetitive chat line " * 35}      # about 1 KB
        # the push itself goes compressed: the edge inflates it
        zs[0].sock.sendall(with_rsv1(masked(client_deflate(
            json.dumps(["1", "2", "echo:deflate", "bcast", body]).encode()))))
        got = [next_broadcast(ws) for ws in zs]
        assert all(first == 0xC1 for first, _, _ in got)
        assert got[0][1] == got[1][1] == got[2][1]            # the same frame bytes for all three
        assert len(got[0][1]) < 200
        first, payload, msg = next_broadcast(plain)
        assert first == 0x81 and msg == got[0][2] and msg[4] == body
    finally:
        for ws in [*zs, plain]:
            ws.close()


def test_without_compress_no_extension_is_agreed(cluster_factory):
    cluster = cluster_factory(edges=1, workers=1)
    ws = BlockingWS(cluster.http_urls[0], "p", extensions="permessage-deflate")
    try:
        assert "Sec-WebSocket-Extensions" not in ws.response_head
    finally:
        ws.close()


def test_phoenix_js_over_ws_agrees_deflate_and_gets_compressed_broadcasts(cluster_factory, js_client):
    cluster = cluster_factory(edges=1, workers=1, edge_args=["--compress"])
    url = cluster.ws_urls[0]
    a, b = js_client("a"), js_client("b")
    for c in (a, b):
        assert c.connect(url, {"user": c.name})["status"] == "open"
        c.wait_event({"type": "socket_open", "extensions": "permessage-deflate"}, 5)
        assert c.join("r", "echo:js", on=["bcast"])["status"] == "ok"
    body = {"text": "phoenix.js, compressed " * 45}
    assert a.push("r", "bcast", body)["status"] == "ok"
    for c in (a, b):
        c.wait_event({"type": "message", "chan": "r", "event": "bcast", "payload": body}, 5)
