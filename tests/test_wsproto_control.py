"""WebSocket control frames and the memory of closed connections, in-process on a real event
loop and socket pair (asyncio's loop and uvloop, which the edge runs on).

Pings cost a turn of the read loop like messages; every ping within the rate is answered, in
order, before what the frames after it cause; a closed connection leaves no reference cycle, so with the garbage collector off
its protocol, Connection and channels are freed the moment the socket closes.
"""
from __future__ import annotations

import asyncio
import gc
import socket
import struct
import weakref

import pytest
import uvloop

from zchannels.bus import wire
from zchannels.bus.history import RuleTable
from zchannels.edge import wsproto
from zchannels.edge.connection import Connection
from zchannels.edge.hub import EdgeHub, Limits
from zchannels.edge.serializer import V2
from zchannels.edge.wsframe import build_frame
from zchannels.edge.wsproto import WebSocketProtocol
from tests.blockingws import client_frame as masked

pytestmark = pytest.mark.timeout(30)


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames -> [(opcode, payload)]."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        n, head = data[pos + 1] & 0x7F, 2
        if n == 126:
            n, head = struct.unpack("!H", data[pos + 2:pos + 4])[0], 4
        elif n == 127:
            n, head = struct.unpack("!Q", data[pos + 2:pos + 10])[0], 10
        frames.append((data[pos] & 0x0F, bytes(data[pos + head:pos + head + n])))
        pos += head + n
    return frames


class FakeBus:
    """Records what the hub sends; holds no connection objects (only the frames' bytes)."""

    def __init__(self):
        self.sent: list[list[bytes]] = []
        self.history = RuleTable(())    # the broker announced: no topic keeps history

    def send(self, frames):
        self.sent.append(frames)

    def subscribe(self, key):
        pass

    def unsubscribe(self, key):
        pass


def make_hub(**limits) -> EdgeHub:
    hub = EdgeHub("tcp://127.0.0.1:1", Limits(**limits), edge_id=b"Etest")
    hub.bus = FakeBus()
    hub.bus_send = hub.bus.send
    return hub


async def open_pair(hub: EdgeHub):
    """A WebSocketProtocol with a real Connection (as edge/websocket.py builds them) on one end of
    a socket pair; the other end, non-blocking, for the test."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    theirs.setblocking(False)
    made = {}

    def make_connection(transport):
        conn = made["conn"] = Connection(hub, V2, transport, b'{"assigns":{},"id":null}', "test")
        hub.add_connection(conn)
        return conn

    loop = asyncio.get_running_loop()
    _transport, proto = await loop.connect_accepted_socket(
        lambda: WebSocketProtocol(hub, make_connection, b""), sock=ours)
    return proto, made["conn"], theirs


async def read_all(sock: socket.socket, until, timeout: float = 5.0) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    deadline = loop.time() + timeout
    while not until(data):
        assert loop.time() < deadline, f"nothing matching came; got {server_frames(bytes(data))[:5]}"
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            await asyncio.sleep(0.005)
            continue
        if not chunk:
            break
        data += chunk
    return bytes(data)


def run(loop_kind: str, coro):
    if loop_kind == "uvloop":
        return uvloop.run(coro)
    return asyncio.run(coro)


loops = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


@loops
def test_a_reading_client_gets_a_pong_per_ping_before_what_follows_it(loop_kind):
    """Every ping is answered, in order, and before the frames after it are handled: a ping
    between two fragments of a heartbeat is answered before the heartbeat's reply (the order
    Autobahn 2.10 and 5.6 check)."""
    async def main():
        hub = make_hub(max_rate=0)
        proto, _conn, client = await open_pair(hub)
        heartbeat = b'[null,"7","phoenix","heartbeat",{}]'
        client.sendall(b"".join(masked(0x9, b"p%02d" % i) for i in range(12))
                       + masked(0x1, heartbeat[:9], fin=False) + masked(0x9, b"between")
                       + masked(0x0, heartbeat[9:]))
        data = await read_all(client, lambda d: b"phx_reply" in d)
        frames = server_frames(data)
        assert [p for op, p in frames if op == 0xA] == [b"p%02d" % i for i in range(12)] + [b"between"]
        assert [op for op, _ in frames] == [0xA] * 13 + [0x1]
        assert b'"7"' in frames[-1][1]
        client.close()
    run(loop_kind, main())


@loops
def test_pings_get_one_pong_for_the_latest_while_our_frames_wait_unsent(loop_kind):
    """While what the edge sent has not left (the client is not reading), a run of pings is
    answered once, for the latest of them (RFC 6455 §5.5.3): unread pongs cannot pile up."""
    async def main():
        hub = make_hub(max_rate=0, max_outbound=16 * 1_048_576)
        proto, _conn, client = await open_pair(hub)
        backlog = build_frame(b"x" * 4_000_000)
        proto.send_prebuilt(backlog)
        assert proto.transport.get_write_buffer_size() > 0
        heartbeat = b'[null,"7","phoenix","heartbeat",{}]'
        client.sendall(b"".join(masked(0x9, b"p%02d" % i) for i in range(12)) + masked(0x1, heartbeat))
        while proto.buf or not hub.frames_in:     # wait for the edge to have read them
            await asyncio.sleep(0.005)
        data = await read_all(client, lambda d: b"phx_reply" in d, timeout=15)
        frames = server_frames(data)
        assert frames[0] == (0x1, b"x" * 4_000_000)
        assert frames[1:] == [(0xA, b"p11"), frames[-1]] and b'"7"' in frames[-1][1]
        client.close()
    run(loop_kind, main())


@loops
def test_pings_count_toward_the_read_yield(loop_kind):
    """A batch of pings is cut after YIELD_EVERY frames, like a batch of messages."""
    async def main():
        hub = make_hub(max_rate=0)
        proto, _conn, client = await open_pair(hub)
        pings = b"".join(masked(0x9, b"x") for _ in range(10 * wsproto.YIELD_EVERY))
        proto.data_received(pings)     # as the transport would hand it over
        assert proto.paused
        assert len(proto.buf) == len(pings) - wsproto.YIELD_EVERY * len(masked(0x9, b"x"))
        client.close()
    run(loop_kind, main())


@loops
def test_pings_over_the_rate_go_unanswered_and_close_1008(loop_kind):
    async def main():
        hub = make_hub(max_rate=10, max_burst=5)
        proto, conn, client = await open_pair(hub)
        client.sendall(b"".join(masked(0x9, b"%d" % i) for i in range(300)))
        data = await read_all(client, lambda d: any(op == 0x8 for op, _ in server_frames(bytes(d))))
        frames = server_frames(data)
        pongs = [p for op, p in frames if op == 0xA]
        close = [p for op, p in frames if op == 0x8][0]
        assert int.from_bytes(close[:2], "big") == 1008 and close[2:] == b"rate limit exceeded"
        assert pongs and all(int(p) < 5 for p in pongs), pongs    # only pings within the burst
        assert hub.stats["rate_limit_closes"] == 1
        client.close()
    run(loop_kind, main())


@loops
def test_a_closed_connection_is_freed_at_once_with_the_gc_off(loop_kind):
    """A connection with a joined channel, a joining one and a half-received 512 KB frame:
    once its socket closes, nothing is left holding the protocol, the Connection or the
    channels, though no garbage collection runs (a reference cycle would keep them, and their
    buffers, alive)."""
    async def main():
        hub = make_hub()
        proto, conn, client = await open_pair(hub)
        client.sendall(masked(0x1, b'["1","1","room:a","phx_join",{}]')
                       + masked(0x1, b'["2","2","room:b","phx_join",{}]')    # b stays joining
                       + masked(0x1, b'[null,"3","phoenix","heartbeat",{}]'))   # waits for b
        while not conn.channels:
            await asyncio.sleep(0.005)
        ch = conn.channels["room:a"]
        conn.joined(ch, b"Wtest", "1", "ok", b"{}", b"[]")   # b's join goes out, as in Phoenix
        assert len(conn.channels) == 2 and conn.held is not None
        await asyncio.get_running_loop().sock_sendall(client, masked(0x2, b"\x00" * 512_000, length=900_000))
        deadline = asyncio.get_running_loop().time() + 5
        while len(proto.buf) < 512_000:
            assert asyncio.get_running_loop().time() < deadline, "the edge read too little"
            await asyncio.sleep(0.005)
        # (the channel points to its Connection: the Connection freed means the channel is too)
        refs = [weakref.ref(proto), weakref.ref(conn)]
        del proto, conn, ch
        gc.disable()
        try:
            client.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while hub.connections:
                assert loop.time() < deadline, "the edge never saw the connection close"
                await asyncio.sleep(0.005)
            for _ in range(3):
                await asyncio.sleep(0)     # the transport's own clean-up callbacks
            alive = [r() for r in refs if r() is not None]
            assert not alive, [type(o).__name__ for o in alive]
        finally:
            gc.enable()
        assert any(f[0] == wire.TERMINATE for f in hub.bus.sent)    # the channel's worker was told
    run(loop_kind, main())


@loops
def test_a_client_that_keeps_sending_after_our_close_frame_is_cut_off(loop_kind):
    """Past MAX_IGNORED_AFTER_CLOSE frames after the 1008 the edge stops reading and hangs up,
    instead of parsing the flood until the close handshake times out."""
    async def main():
        hub = make_hub(max_rate=10, max_burst=5)
        proto, _conn, client = await open_pair(hub)
        n = 5 + 101 + wsproto.MAX_IGNORED_AFTER_CLOSE + 50     # burst, refusals, then ignored
        await asyncio.get_running_loop().sock_sendall(client, b"".join(masked(0x9, b"x") for _ in range(n)))
        data = await read_all(client, lambda d: any(op == 0x8 for op, _ in server_frames(bytes(d))))
        assert [p[:2] for op, p in server_frames(data) if op == 0x8] == [(1008).to_bytes(2, "big")]
        deadline = asyncio.get_running_loop().time() + 5
        while not proto.lost:
            assert asyncio.get_running_loop().time() < deadline, "the connection was never cut"
            await asyncio.sleep(0.005)
        assert proto.failed and proto.ignored > wsproto.MAX_IGNORED_AFTER_CLOSE
        client.close()
    run(loop_kind, main())


def test_a_wave_of_big_frees_makes_one_trim(monkeypatch):
    from zchannels.edge import memtrim
    if memtrim._malloc_trim is None:
        pytest.skip("no malloc_trim in this C library")
    monkeypatch.setattr(memtrim, "DELAY", 0.01)

    async def main():
        before = memtrim.trims
        memtrim.freed(memtrim.MIN_BYTES - 1)      # small: left to malloc
        await asyncio.sleep(0.05)
        assert memtrim.trims == before
        for _ in range(300):
            memtrim.freed(1 << 20)
        await asyncio.sleep(0.05)
        assert memtrim.trims == before + 1
    asyncio.run(main())


# ---- the edge's budget for unfinished inbound messages (--max-inbound-buffered) ----------------

FREE = wsproto.FREE_INBOUND


async def wait_for(predicate, timeout: float = 5.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what or predicate}"
        await asyncio.sleep(0.005)


async def send_until_cut(sock: socket.socket, data: bytes) -> None:
    """Send `data`; the edge may hang up before it has all of it."""
    try:
        await asyncio.get_running_loop().sock_sendall(sock, data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def close_code(data: bytes) -> int | None:
    closes = [p for op, p in server_frames(data) if op == 0x8]
    return int.from_bytes(closes[0][:2], "big") if closes else None


@loops
def test_an_unfinished_big_frame_draws_from_the_budget_and_gives_it_back_when_complete(loop_kind):
    async def main():
        hub = make_hub(max_inbound_buffered=4 << 20)
        proto, conn, client = await open_pair(hub)
        budget = hub.inbound_budget
        loop = asyncio.get_running_loop()
        body = b'[null,"7","phoenix","heartbeat",{"x":"' + b"y" * 600_000 + b'"}]'
        whole = masked(0x1, body)
        await loop.sock_sendall(client, whole[:400_000])
        await wait_for(lambda: len(proto.buf) >= 400_000, what="the first 400 kB")
        assert proto.drawn == len(proto.buf) - FREE and budget.held == proto.drawn
        await loop.sock_sendall(client, whole[400_000:])
        data = await read_all(client, lambda d: b'"7"' in d)    # the heartbeat's reply
        assert b'"ok"' in data
        assert budget.held == 0 and proto.drawn == 0 and not proto.buf
        assert hub.stats["inbound_budget_closes"] == 0
        client.close()
    run(loop_kind, main())


@loops
def test_fragments_of_an_unfinished_message_draw_from_the_budget_until_it_completes(loop_kind):
    async def main():
        hub = make_hub(max_inbound_buffered=4 << 20)
        proto, conn, client = await open_pair(hub)
        budget = hub.inbound_budget
        loop = asyncio.get_running_loop()
        body = b'[null,"8","phoenix","heartbeat",{"x":"' + b"y" * 300_000 + b'"}]'
        pieces = [body[i:i + 50_000] for i in range(0, len(body), 50_000)]
        await loop.sock_sendall(client, masked(0x1, pieces[0], fin=False)
                                + b"".join(masked(0x0, p, fin=False) for p in pieces[1:-1]))
        await wait_for(lambda: proto.fragment_size == len(body) - len(pieces[-1]), what="fragments")
        assert proto.drawn == proto.fragment_size - FREE and budget.held == proto.drawn
        await loop.sock_sendall(client, masked(0x0, pieces[-1]))
        data = await read_all(client, lambda d: b'"8"' in d)
        assert b'"ok"' in data
        assert budget.held == 0 and proto.drawn == 0 and proto.fragments is None
        client.close()
    run(loop_kind, main())


@loops
def test_small_messages_never_touch_the_budget(loop_kind):
    async def main():
        hub = make_hub(max_rate=0, max_inbound_buffered=1)
        proto, conn, client = await open_pair(hub)
        loop = asyncio.get_running_loop()
        # 40 kB in one message, and 200 heartbeats in one write: all within the free share
        await loop.sock_sendall(client, masked(0x1, b'[null,"a","phoenix","heartbeat",{"x":"'
                                               + b"y" * 40_000 + b'"}]')
                                + b"".join(masked(0x1, b'[null,"%d","phoenix","heartbeat",{}]' % i)
                                           for i in range(200)))
        data = await read_all(client, lambda d: b'"199"' in d)
        assert close_code(data) is None
        assert hub.inbound_budget.held == 0 and hub.stats["inbound_budget_closes"] == 0
        client.close()
    run(loop_kind, main())


@loops
def test_the_budget_is_given_back_when_the_connection_is_lost(loop_kind):
    async def main():
        hub = make_hub(max_inbound_buffered=8 << 20)
        loop = asyncio.get_running_loop()
        pairs = [await open_pair(hub) for _ in range(3)]
        for _proto, _conn, client in pairs:
            await loop.sock_sendall(client, masked(0x2, b"\x00" * 500_000, length=1_000_000))
        await wait_for(lambda: all(len(p.buf) >= 500_000 for p, _c, _s in pairs), what="the frames")
        assert hub.inbound_budget.held == sum(p.drawn for p, _c, _s in pairs) > 3 * 400_000
        for _proto, _conn, client in pairs:
            client.close()
        await wait_for(lambda: not hub.connections, what="the connections to close")
        assert hub.inbound_budget.held == 0
        assert all(p.drawn == 0 for p, _c, _s in pairs)
    run(loop_kind, main())


@loops
def test_the_budget_is_given_back_when_the_message_fails(loop_kind):
    """A fragmented message that draws from the budget, then breaks the protocol (1002) or the
    frame limit (1009): its bytes are dropped and given back at once, before the socket closes."""
    async def main():
        hub = make_hub(max_frame_size=1_000_000, max_inbound_buffered=8 << 20)
        loop = asyncio.get_running_loop()
        for bad, code in ((masked(0x1, b"new message"), 1002),
                          (masked(0x0, b"\x00" * 10, fin=False, length=600_000), 1009)):
            proto, conn, client = await open_pair(hub)
            await loop.sock_sendall(client, masked(0x2, b"\x00" * 500_000, fin=False))
            await wait_for(lambda: proto.drawn > 0, what="the first fragment")
            await loop.sock_sendall(client, bad)
            await wait_for(lambda: proto.failed, what="the failure")
            assert hub.inbound_budget.held == 0 and proto.drawn == 0
            assert proto.fragments is None and not proto.buf
            assert close_code(await read_all(client, lambda d: close_code(bytes(d)))) == code
            client.close()
    run(loop_kind, main())


@loops
def test_a_connection_that_would_go_over_the_budget_is_closed_1013(loop_kind, caplog):
    async def main():
        budget_bytes = 1 << 20
        hub = make_hub(max_inbound_buffered=budget_bytes)
        loop = asyncio.get_running_loop()
        first, _c, first_client = await open_pair(hub)
        await loop.sock_sendall(first_client, masked(0x2, b"\x00" * 800_000, length=1_000_000))
        await wait_for(lambda: len(first.buf) >= 800_000, what="the first frame")
        held = hub.inbound_budget.held
        assert held == first.drawn > 0
        # Two more connections each want more than is left: both are closed 1013, and the
        # first one, within the budget, is untouched.
        for _ in range(2):
            proto, conn, client = await open_pair(hub)
            sending = loop.create_task(send_until_cut(client, masked(0x2, b"\x00" * 600_000,
                                                                      length=1_000_000)))
            data = await read_all(client, lambda d: close_code(bytes(d)))
            await sending
            assert close_code(data) == 1013
            assert proto.failed and proto.drawn == 0 and not proto.buf
            assert hub.inbound_budget.held == held <= budget_bytes
            await wait_for(lambda: proto.lost, what="the edge to hang up")
            client.close()
        assert hub.stats["inbound_budget_closes"] == 2
        assert not first.failed and first.drawn > 0
        first_client.close()
        await wait_for(lambda: not hub.connections, what="the connections to close")
        assert hub.inbound_budget.held == 0

    with caplog.at_level("INFO", logger="edge"):
        run(loop_kind, main())
    lines = [r.getMessage() for r in caplog.records if "--max-inbound-buffered" in r.getMessage()]
    assert len(lines) == 1, lines     # rate-limited: one line a second
    assert "closing with 1013" in lines[0] and "conn test" in lines[0]
