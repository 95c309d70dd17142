"""The edge's hub routing worker messages to the connection they are for, in-process: a real
EdgeHub and Connection on a recording transport, the bus replaced by a recorder (these paths
need no other process; the e2e tests cover them with real workers too).

A join reply goes hub -> connection, which writes the reply, then the broadcasts held while
joining, then what the client sent meanwhile; the hub's indexes follow the channel; frames
from a worker that does not hold the channel are dropped; messages the broker hands back
(UNROUTABLE) are answered for the worker that is not there.
"""
from __future__ import annotations

import asyncio

import orjson
import pytest

from zchannels.bus import wire
from zchannels.bus.history import RuleTable
from zchannels.edge.connection import Connection
from zchannels.edge.hub import EdgeHub, Limits
from zchannels.edge.serializer import V2, Message

pytestmark = pytest.mark.timeout(30)

WORKER = b"Wworker-1"
OTHER = b"Wworker-2"


class RecordingBus:
    def __init__(self):
        self.sent: list[list[bytes]] = []
        self.subscriptions: dict[bytes, int] = {}
        self.broker_silent = False
        self.history = RuleTable(())    # the broker announced: no topic keeps history

    def send(self, frames):
        self.sent.append(frames)

    def subscribe(self, key):
        self.subscriptions[key] = self.subscriptions.get(key, 0) + 1

    def unsubscribe(self, key):
        self.subscriptions[key] -= 1
        if not self.subscriptions[key]:
            del self.subscriptions[key]

    def kinds(self) -> list[bytes]:
        return [f[0] for f in self.sent]


class RecordingTransport:
    frame_kind = "test"

    def __init__(self):
        self.frames: list[list] = []
        self.closed_with = None

    def prebuild(self, data, binary):
        return data

    def send(self, data, binary):
        self.send_prebuilt(data)

    def send_prebuilt(self, frame):
        self.frames.append(orjson.loads(frame))

    def close(self, code=1000, reason=""):
        self.closed_with = code


def setup():
    hub = EdgeHub("tcp://127.0.0.1:1", Limits(max_rate=0), edge_id=b"Etest")
    hub.bus = RecordingBus()
    hub.bus_send = hub.bus.send
    transport = RecordingTransport()
    conn = Connection(hub, V2, transport, b'{"assigns":{},"id":null}', "test")
    hub.add_connection(conn)
    return hub, conn, transport


def joined(hub, conn, topic="room:1", join_ref="1", worker=WORKER):
    conn.handle(Message(join_ref, join_ref, topic, "phx_join", {}, False))
    hub.on_direct(wire.join_reply(worker, conn.conn_id, topic.encode(), join_ref.encode(),
                                  join_ref.encode(), b"ok", b"{}", b"[]"))


def test_a_join_reply_is_written_before_the_broadcasts_held_meanwhile_and_what_waited_for_it():
    async def main():
        hub, conn, transport = setup()
        conn.handle(Message("1", "1", "room:1", "phx_join", {}, False))
        join = hub.bus.sent[-1]
        assert wire.parse(join) == wire.Join(b"", conn.conn_id, b"room:1", b"1", b"1",
                                             b'{"assigns":{},"id":null}', b"{}")
        assert hub.bus.subscriptions == {wire.topic_key("room:1"): 1}
        hub.fastlane.deliver(wire.broadcast_frames("room:1", "early", b'{"n":1}'))
        conn.handle(Message(None, "2", "phoenix", "heartbeat", {}, False))   # waits for the join
        assert transport.frames == []
        hub.on_direct(wire.join_reply(WORKER, conn.conn_id, b"room:1", b"1", b"1", b"ok",
                                      b'{"hello":1}', b"[]"))
        assert transport.frames == [
            ["1", "1", "room:1", "phx_reply", {"status": "ok", "response": {"hello": 1}}],
            [None, None, "room:1", "early", {"n": 1}],
            [None, "2", "phoenix", "phx_reply", {"status": "ok", "response": {}}]]
        ch = conn.channels["room:1"]
        assert ch.worker == WORKER and hub.worker_channels == {WORKER: {ch}}
        assert hub.fastlane.index[ch.key] == {conn: ch} and hub.fastlane.joining == {}
        assert hub.bus.subscriptions == {wire.topic_key("room:1"): 1}
    asyncio.run(main())


def test_a_refused_join_leaves_no_subscription_and_no_index():
    async def main():
        hub, conn, transport = setup()
        conn.handle(Message("1", "1", "room:1", "phx_join", {}, False))
        hub.on_direct(wire.join_reply(WORKER, conn.conn_id, b"room:1", b"1", b"1", b"error",
                                      b'{"reason":"no"}', b"[]"))
        assert transport.frames == [["1", "1", "room:1", "phx_reply",
                                     {"status": "error", "response": {"reason": "no"}}]]
        assert conn.channels == {} and hub.worker_channels == {} and hub.bus.subscriptions == {}
        assert hub.fastlane.index == {} and hub.fastlane.joining == {}
    asyncio.run(main())


def test_replies_and_pushes_pass_only_from_the_worker_holding_the_channel():
    async def main():
        hub, conn, transport = setup()
        joined(hub, conn)
        del transport.frames[:]
        conn.handle(Message("1", "5", "room:1", "ping", {"a": 1}, False))
        assert wire.parse(hub.bus.sent[-1]).peer == WORKER
        hub.on_direct(wire.reply(OTHER, conn.conn_id, b"room:1", b"1", b"5", b"ok", b'{"evil":1}', wire.JSON))
        hub.on_direct(wire.push(OTHER, conn.conn_id, b"room:1", b"1", b"evil", b"{}", wire.JSON))
        assert transport.frames == [] and hub.stats["foreign_frames"] == 2
        hub.on_direct(wire.reply(WORKER, conn.conn_id, b"room:1", b"1", b"5", b"ok", b'{"a":1}', wire.JSON))
        hub.on_direct(wire.push(WORKER, conn.conn_id, b"room:1", b"1", b"news", b'{"b":2}', wire.JSON))
        assert transport.frames == [["1", "5", "room:1", "phx_reply", {"status": "ok", "response": {"a": 1}}],
                                    ["1", None, "room:1", "news", {"b": 2}]]
        assert not conn.channels["room:1"].pending
    asyncio.run(main())


def test_a_late_join_ok_for_a_connection_gone_is_terminated():
    async def main():
        hub, conn, _transport = setup()
        conn.handle(Message("1", "1", "room:1", "phx_join", {}, False))
        conn.on_transport_closed()
        assert hub.connections == {} and hub.bus.subscriptions == {}
        hub.on_direct(wire.join_reply(WORKER, conn.conn_id, b"room:1", b"1", b"1", b"ok", b"{}", b"[]"))
        assert wire.parse(hub.bus.sent[-1]) == wire.Terminate(WORKER, conn.conn_id, b"room:1", b"1", b"closed")
        assert hub.stats["late_joins_ended"] == 1
    asyncio.run(main())


def test_a_leave_handed_back_is_answered_by_the_edge_and_its_worker_taken_for_gone():
    async def main():
        hub, conn, transport = setup()
        joined(hub, conn)
        joined(hub, conn, topic="room:2", join_ref="2")
        del transport.frames[:]
        conn.handle(Message("1", "3", "room:1", "phx_leave", {}, False))
        leave = hub.bus.sent[-1]
        assert wire.parse(leave) == wire.Leave(WORKER, conn.conn_id, b"room:1", b"1", b"3")
        hub.on_direct(wire.unroutable(WORKER, wire.LEAVE, leave[2:]))
        assert transport.frames == [["1", "3", "room:1", "phx_reply", {"status": "ok", "response": {}}],
                                    ["1", "1", "room:1", "phx_close", {}],
                                    ["2", "2", "room:2", "phx_error", {"reason": "channel_crash"}]]
        assert conn.channels == {} and hub.worker_channels == {} and hub.bus.subscriptions == {}
    asyncio.run(main())


def test_a_push_handed_back_gets_an_error_reply_and_its_channel_phx_error():
    async def main():
        hub, conn, transport = setup()
        joined(hub, conn)
        del transport.frames[:]
        conn.handle(Message("1", "7", "room:1", "ping", {}, False))
        push = hub.bus.sent[-1]
        conn.channels["room:1"].pending.clear()   # its ref had left the pending list
        hub.on_direct(wire.unroutable(WORKER, wire.IN, push[2:]))
        assert transport.frames == [
            ["1", "7", "room:1", "phx_reply", {"status": "error", "response": {"reason": "channel lost"}}],
            ["1", "1", "room:1", "phx_error", {"reason": "channel_crash"}]]
        assert conn.channels == {} and WORKER in hub.worker_downs
    asyncio.run(main())


def test_a_join_with_no_worker_to_place_it_on_gets_no_worker_available():
    async def main():
        hub, conn, transport = setup()
        conn.handle(Message("1", "1", "room:1", "phx_join", {}, False))
        hub.on_direct(wire.unroutable(b"", wire.JOIN, hub.bus.sent[-1][2:]))
        assert transport.frames == [["1", "1", "room:1", "phx_reply",
                                     {"status": "error", "response": {"reason": "no worker available"}}]]
        assert conn.channels == {} and hub.bus.subscriptions == {}
    asyncio.run(main())


def test_malformed_messages_are_counted_not_raised():
    async def main():
        hub, conn, transport = setup()
        hub.on_direct([wire.REPLY, WORKER, conn.conn_id])                 # wrong frame count
        hub.on_direct([wire.UNROUTABLE, WORKER])                          # too short
        hub.on_direct(wire.reply(WORKER, conn.conn_id, b"\xff", b"1", b"1", b"ok", b"{}", wire.JSON))
        assert hub.stats["bad_frames"] == 3 and transport.frames == []
    asyncio.run(main())
