"""Point-to-point messages through the broker's C proxy (bus/inbox.py, bus/peer.py): the inbox
packing, the per-turn batches of Outbox, and two real BusPeers on an in-process broker whose
Python ROUTER loop sees none of their pushes and replies."""
from __future__ import annotations

import asyncio

import pytest

from zchannels.bus import inbox, wire
from zchannels.bus.peer import BusPeer, connect_peer
from tests.test_bus_peer import FAST_BEAT, HWM, Recorder, broker, until, zctx  # noqa: F401

EDGE, WORKER = b"E-inbox-test", b"W-inbox-test"


# --- packing -----------------------------------------------------------------------------

def test_an_inbox_message_arrives_as_the_router_would_deliver_it():
    sent = wire.reply(EDGE, b"c1", b"room:1", b"1", b"7", b"ok", b'{"a":1}', wire.JSON)
    data = wire.pack_inbox(sent, WORKER)
    assert data.startswith(wire.inbox_key(EDGE)) and wire.is_inbox(data)
    assert wire.unpack_inbox(data) == [[wire.REPLY, WORKER, *sent[2:]]]
    assert wire.parse(wire.unpack_inbox(data)[0]).response == b'{"a":1}'


def test_a_batch_keeps_every_message_and_its_order():
    sent = [wire.push(EDGE, b"c%d" % i, b"t", b"1", b"ev", b"x" * i, wire.BINARY) for i in range(40)]
    data = wire.pack_inbox_batch(EDGE, [wire.pack([f[0], WORKER, *f[2:]]) for f in sent])
    assert wire.unpack_inbox(data) == [[wire.PUSH, WORKER, *f[2:]] for f in sent]


def test_no_topic_key_is_a_prefix_of_an_inbox_key():
    key = wire.inbox_key(EDGE)
    for topic in ("", "E", "room:1", "\x7f", "é"):
        assert not key.startswith(wire.topic_key(topic)), topic


@pytest.mark.parametrize("peer_id", [b"", b"a\x00b", b"x" * 256])
def test_an_id_that_cannot_name_an_inbox_is_refused(peer_id):
    with pytest.raises(ValueError):
        wire.inbox_key(peer_id)


@pytest.mark.parametrize("data", [
    wire.INBOX_PREFIX + EDGE,                                # no end to its key
    wire.inbox_key(EDGE) + b"r",                             # no sender length
    wire.inbox_key(EDGE) + b"r\x09abc",                      # sender longer than the message
    wire.inbox_key(EDGE) + wire.INBOX_BATCH + b"\x05\x00",   # part length truncated
    wire.inbox_key(EDGE) + wire.INBOX_BATCH + b"\x09\x00\x00\x00abc",   # part truncated
    b"room:1\x00" + wire.pack_fields([b"B"]),                 # a broadcast is no inbox message
])
def test_a_malformed_inbox_message_is_a_bus_frame_error(data):
    with pytest.raises(wire.BusFrameError):
        wire.unpack_inbox(data)


# --- Outbox --------------------------------------------------------------------------------

class Wire:
    """Stands in for the PUB's send_packed: what left, and whether the queue takes more."""

    def __init__(self):
        self.sent: list[bytes] = []
        self.full = False

    def send_packed(self, data: bytes, frames=None) -> bool:
        if self.full:
            return False
        self.sent.append(data)
        return True


def test_one_turn_leaves_as_one_message_per_destination():
    async def scenario():
        out, undelivered = Wire(), []
        box = inbox.Outbox(WORKER, out.send_packed, asyncio.get_running_loop(), undelivered.append)
        for i in range(5):
            box.send(wire.reply(EDGE, b"c", b"t", b"1", str(i).encode(), b"ok", b"{}", wire.JSON))
        box.send(wire.reply(b"E-other", b"c", b"t", b"1", b"9", b"ok", b"{}", wire.JSON))
        assert out.sent == []             # nothing leaves before the end of the turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(out.sent) == 2 and box.batches == 1 and box.batched == 5
        to_edge = wire.unpack_inbox(next(d for d in out.sent if d.startswith(wire.inbox_key(EDGE))))
        assert [m[5] for m in to_edge] == [b"0", b"1", b"2", b"3", b"4"]
        assert undelivered == []
    asyncio.run(scenario())


def test_under_load_a_flush_waits_for_the_hold_and_an_idle_outbox_does_not():
    async def scenario():
        loop = asyncio.get_running_loop()
        out = Wire()
        box = inbox.Outbox(WORKER, out.send_packed, loop, lambda f: None)
        ping = wire.reply(EDGE, b"c", b"t", b"1", b"1", b"ok", b"{}", wire.JSON)
        box.send(ping)                      # idle: leaves at the end of this turn
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(out.sent) == 1
        flushed_at = loop.time()
        box.send(ping)                      # right after a flush: held for the rest of HOLD
        box.send(ping)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(out.sent) == 1
        while len(out.sent) == 1:
            assert loop.time() - flushed_at < 1.0, "the held batch never left"
            await asyncio.sleep(0.0002)
        assert loop.time() - flushed_at >= inbox.HOLD * 0.9
        assert len(wire.unpack_inbox(out.sent[1])) == 2
        await asyncio.sleep(inbox.HOLD * 2)  # idle again: no delay
        box.send(ping)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(out.sent) == 3
    asyncio.run(scenario())


def test_what_a_full_queue_refuses_is_handed_back_message_by_message():
    async def scenario():
        out, undelivered = Wire(), []
        out.full = True
        box = inbox.Outbox(WORKER, out.send_packed, asyncio.get_running_loop(), undelivered.append)
        msgs = [wire.push(EDGE, b"c", b"t", b"1", b"e", b"%d" % i, wire.BINARY) for i in range(3)]
        for m in msgs:
            box.send(m)
        box.flush()
        assert undelivered == msgs
    asyncio.run(scenario())


def test_a_turn_past_the_batch_size_flushes_at_once():
    async def scenario():
        out = Wire()
        box = inbox.Outbox(WORKER, out.send_packed, asyncio.get_running_loop(), lambda f: None)
        big = b"x" * (inbox.BATCH_BYTES // 2 + 1)
        box.send(wire.push(EDGE, b"c", b"t", b"1", b"e", big, wire.BINARY))
        assert out.sent == []
        box.send(wire.push(EDGE, b"c", b"t", b"1", b"e", big, wire.BINARY))
        assert len(out.sent) == 1 and len(wire.unpack_inbox(out.sent[0])) == 2
    asyncio.run(scenario())


# --- two peers on a real broker ----------------------------------------------------------------

def _peer(ctx, bus: str, peer_id: bytes, role: bytes, got: list, rec: Recorder) -> BusPeer:
    peer = BusPeer(connect_peer(ctx, bus, peer_id, HWM), role, on_direct=got.append,
                   on_broadcast=rec.on_broadcast, load=lambda: 0, on_registered=rec.registered.set,
                   name=peer_id.decode(), heartbeat_interval=FAST_BEAT)
    rec.peer = peer
    return peer


@pytest.mark.timeout(30)
def test_pushes_and_replies_pass_the_proxy_not_the_routers_python_loop(zctx, broker):  # noqa: F811
    async def scenario():
        to_worker, to_edge = [], []
        edge_rec, worker_rec = Recorder(), Recorder()
        edge = _peer(zctx, broker.bus, EDGE, wire.ROLE_EDGE, to_edge, edge_rec)
        worker = _peer(zctx, broker.bus, WORKER, wire.ROLE_WORKER, to_worker, worker_rec)
        try:
            await asyncio.wait_for(asyncio.gather(edge_rec.registered.wait(),
                                                  worker_rec.registered.wait()), 5)
            await until(lambda: WORKER in edge.inboxes and EDGE in worker.inboxes)
            routed = broker.router.routed
            for i in range(50):
                edge.send(wire.inbound(WORKER, b"c1", b"room:1", b"1", str(i).encode(), b"ping",
                                       b'{"i":%d}' % i, wire.JSON))
            await until(lambda: len(to_worker) == 50)
            assert [wire.parse(f).ref for f in to_worker] == [str(i).encode() for i in range(50)]
            assert all(f[0] == wire.IN and f[1] == EDGE for f in to_worker)
            for f in to_worker:
                i = wire.parse(f)
                worker.send(wire.reply(i.peer, i.conn_id, i.topic, i.join_ref, i.ref, b"ok",
                                       i.payload, wire.JSON))
            await until(lambda: len(to_edge) == 50)
            assert [wire.parse(f).response for f in to_edge] == [b'{"i":%d}' % i for i in range(50)]
            assert broker.router.routed == routed, "a push or reply went through the ROUTER loop"
            assert worker.outbox.batches >= 1   # the 50 replies of one turn left together

            # A join still to be placed goes to the broker, which places it on the worker.
            edge.send(wire.join(b"", b"c2", b"room:2", b"1", b"1", b"{}", b"{}"))
            await until(lambda: len(to_worker) == 51)
            assert to_worker[-1][0] == wire.JOIN and broker.router.routed == routed + 1
        finally:
            edge.close()
            worker.close()
    asyncio.run(scenario())
