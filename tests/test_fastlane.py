"""The edge's fast lane on its own: broadcasts that reach a channel while its join is pending."""
from __future__ import annotations

from zchannels.bus import wire
from zchannels.edge import fastlane as fastlane_mod
from zchannels.edge.connection import ChannelRef
from zchannels.edge.fastlane import FastLane
from zchannels.edge.serializer import V2


class Transport:
    frame_kind = "text"

    def __init__(self):
        self.sent: list[bytes] = []

    def prebuild(self, data: bytes, binary: bool) -> bytes:
        return data

    def send_prebuilt(self, frame: bytes) -> None:
        self.sent.append(frame)


class Conn:
    def __init__(self, origin: bytes = b""):
        self.origin = origin
        self.serializer = V2
        self.transport = Transport()
        self.fmt_key = (V2, "text")


def broadcast(event: str, body: str, topic: str = "room:1", origin: bytes = b"") -> list[bytes]:
    return wire.broadcast_frames(topic, event, b'{"b":"%s"}' % body.encode(), origin=origin)


def test_broadcasts_during_a_join_arrive_after_its_reply_in_order():
    lane = FastLane(on_disconnect=lambda key: None)
    joined, joining = Conn(), Conn()
    old = ChannelRef(joined, "room:1", "1")
    lane.hold(old)
    lane.add(old)
    ch = ChannelRef(joining, "room:1", "7")
    lane.hold(ch)
    lane.deliver(broadcast("new_msg", "one"))
    lane.deliver(broadcast("new_msg", "two"))
    assert len(joined.transport.sent) == 2 and joining.transport.sent == []
    joining.transport.sent.append(b"<join reply>")
    lane.add(ch)
    lane.deliver(broadcast("new_msg", "three"))
    assert [f[-12:] for f in joining.transport.sent[1:]] == [f[-12:] for f in joined.transport.sent]
    assert joining.transport.sent[0] == b"<join reply>" and len(joining.transport.sent) == 4
    assert b'"three"' in joining.transport.sent[-1] and b'"one"' in joining.transport.sent[1]
    assert lane.joining == {}


def test_a_refused_join_drops_what_was_held_and_holding_is_bounded(monkeypatch):
    monkeypatch.setattr(fastlane_mod, "MAX_HELD_WHILE_JOINING", 3)
    lane = FastLane(on_disconnect=lambda key: None)
    conn = Conn()
    ch = ChannelRef(conn, "room:1", "1")
    lane.hold(ch)
    for i in range(5):
        lane.deliver(broadcast("new_msg", str(i)))
    assert len(ch.early) == 3 and lane.held_overflow == 2
    lane.remove(ch)   # the join was refused or the client left
    assert ch.early is None and lane.joining == {} and lane.index == {}
    lane.deliver(broadcast("new_msg", "late"))
    assert conn.transport.sent == []


def test_held_broadcasts_skip_the_channels_own_pushes_and_its_intercepts():
    lane = FastLane(on_disconnect=lambda key: None)
    conn = Conn(origin=b"E1:c1")
    ch = ChannelRef(conn, "room:1", "1")
    lane.hold(ch)
    lane.deliver(broadcast("new_msg", "mine", origin=b"E1:c1"))
    lane.deliver(broadcast("user_joined", "x"))
    lane.deliver(broadcast("new_msg", "other"))
    ch.intercept = frozenset({"user_joined"})   # learnt from the join reply
    lane.add(ch)
    assert len(conn.transport.sent) == 1 and b'"other"' in conn.transport.sent[0]
