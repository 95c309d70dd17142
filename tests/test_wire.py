"""The bus encoding (bus/wire.py) on its own."""
from __future__ import annotations

import random

import pytest

from zchannels.bus import wire


def test_sync_channel_list_round_trips_any_number_of_channels_and_rejects_garbage():
    channels = {(str(i).encode(), f"room:{i}".encode(), b"" if i % 7 == 0 else str(i * 3).encode())
                for i in range(1000)}
    assert wire.unpack_channel_list(wire.pack_channel_list(sorted(channels))) == channels
    assert wire.unpack_channel_list(wire.pack_channel_list([])) == set()
    for bad in (b"\x01", b"\x09\x00\x00\x00abc", wire.pack_channel_list([(b"1", b"t", b"2")])[:-1],
                wire.pack_channel_list([(b"1", b"t", b"2")]) + b"\x00\x00\x00\x00"):
        with pytest.raises(wire.BusFrameError):
            wire.unpack_channel_list(bad)


@pytest.mark.parametrize("ref", ["12", "", "\x01x", "é", 7, -1, 2.5, True, None, [1], {"a": "b"}])
def test_refs_round_trip_the_bus_with_their_json_type(ref):
    data = wire.encode_ref(ref)
    assert wire.decode_ref(data) == ref and type(wire.decode_ref(data)) is type(ref)


def test_plain_string_refs_travel_as_their_utf8_and_null_as_empty():
    assert wire.encode_ref("12") == b"12"
    assert wire.encode_ref(None) == b""


def test_a_ref_marked_json_that_is_not_json_is_a_bus_frame_error():
    with pytest.raises(wire.BusFrameError):
        wire.decode_ref(b"\x01{nope")


# --- every kind: constructor -> pack -> unpack -> parse ----------------------------------------

EDGE = b"E12345-1a2b3c4d"
WORKER = b"Ww0-5e6f7a8b"
BINARY = bytes(range(256)) * 3          # every byte value, NULs and invalid UTF-8 included
JSON_PAYLOAD = '{"body":"héllo","n":[1,2.5,null]}'.encode()
CHANNELS = [(b"17", b"room:lobby", b"3"), (b"18", "salle:é".encode(), b""),
            (b"19", b"room:" + bytes(200), wire.encode_ref(7))]


class Case:
    """One message: its constructor's arguments and the named tuple it must parse to."""

    def __init__(self, kind: bytes, build, args: tuple, parsed, fields: tuple | None = None):
        self.kind, self.build, self.args, self.parsed = kind, build, args, parsed
        self.fields = fields    # the parsed fields, when the constructor takes other types

    def frames(self) -> list[bytes]:
        return self.build(*self.args)


CASES = {
    "CONNECT": Case(wire.CONNECT, wire.connect, (b"", b"c-41", b'{"params":{"token":"x"},"connect_info":{}}'),
                    wire.Connect),
    "JOIN": Case(wire.JOIN, wire.join, (WORKER, b"17", b"room:lobby", b"3", b"3",
                                         b'{"assigns":{},"id":null}', JSON_PAYLOAD), wire.Join),
    "JOIN placed, JSON refs": Case(wire.JOIN, wire.join, (b"", b"17", b"room:lobby", wire.encode_ref(1),
                                                          wire.encode_ref(1), b'{"assigns":{"u":1},"id":"u:1"}',
                                                          b"{}"), wire.Join),
    "IN": Case(wire.IN, wire.inbound, (WORKER, b"17", b"room:lobby", b"3", b"4", b"new_msg", JSON_PAYLOAD,
                                        wire.JSON), wire.In),
    "IN binary, null join_ref": Case(wire.IN, wire.inbound, (WORKER, b"17", b"room:lobby", b"", b"5",
                                                              b"upload", BINARY, wire.BINARY), wire.In),
    "IN empty payload": Case(wire.IN, wire.inbound, (WORKER, b"17", b"room:lobby", b"3", b"6", b"ev", b"",
                                                      wire.BINARY), wire.In),
    "LEAVE": Case(wire.LEAVE, wire.leave, (WORKER, b"17", b"room:lobby", b"3", b"7"), wire.Leave),
    "TERMINATE": Case(wire.TERMINATE, wire.terminate, (WORKER, b"17", b"room:lobby", b"3", b"duplicate_join"),
                      wire.Terminate),
    "CONNECT_REPLY": Case(wire.CONNECT_REPLY, wire.connect_reply,
                          (EDGE, b"c-41", b"ok", b'{"assigns":{"user":"ann"},"id":null}'), wire.ConnectReply),
    "JOIN_REPLY": Case(wire.JOIN_REPLY, wire.join_reply, (EDGE, b"17", b"room:lobby", b"3", b"3", b"ok",
                                                           b'{"joined":true}', b'["user_joined"]'), wire.JoinReply),
    "JOIN_REPLY error": Case(wire.JOIN_REPLY, wire.join_reply, (EDGE, b"17", b"private:x", b"3", b"3", b"error",
                                                                 b'{"reason":"unauthorized"}', b"[]"), wire.JoinReply),
    "REPLY": Case(wire.REPLY, wire.reply, (EDGE, b"17", b"room:lobby", b"3", b"4", b"ok", JSON_PAYLOAD, wire.JSON),
                  wire.Reply),
    "REPLY binary": Case(wire.REPLY, wire.reply, (EDGE, b"17", b"room:lobby", b"3", b"4", b"ok", BINARY,
                                                   wire.BINARY), wire.Reply),
    "PUSH": Case(wire.PUSH, wire.push, (EDGE, b"17", b"room:lobby", b"3", b"presence_state", JSON_PAYLOAD,
                                         wire.JSON), wire.Push),
    "PUSH binary, empty": Case(wire.PUSH, wire.push, (EDGE, b"17", b"room:lobby", b"", b"blob", b"", wire.BINARY),
                               wire.Push),
    "CHANNEL_CLOSE": Case(wire.CHANNEL_CLOSE, wire.channel_close, (EDGE, b"17", b"room:lobby", b"3"),
                          wire.ChannelEnd),
    "CHANNEL_ERROR": Case(wire.CHANNEL_ERROR, wire.channel_error, (EDGE, b"17", b"room:lobby", b""),
                          wire.ChannelEnd),
    "SYNC": Case(wire.SYNC, wire.sync, (EDGE, CHANNELS), wire.ChannelList),
    "SYNC empty": Case(wire.SYNC, wire.sync, (EDGE, []), wire.ChannelList),
    "EDGE_SYNC": Case(wire.EDGE_SYNC, wire.edge_sync, (WORKER, CHANNELS), wire.ChannelList),
    "LP_REQUEST": Case(wire.LP_REQUEST, wire.lp_request, (EDGE, b"r-9", b"lp1.E12345-1a2b3c4d.sid.mac", b"POST",
                                                           b"25000", b"application/json", JSON_PAYLOAD),
                       wire.LpRequest),
    "LP_RESPONSE": Case(wire.LP_RESPONSE, wire.lp_response, (EDGE, b"r-9", b"200", b'{"status":"ok"}'),
                        wire.LpResponse),
    "HEARTBEAT (broker)": Case(wire.HEARTBEAT, wire.broker_heartbeat, (b"9f8e7d6c", b'[["room:*",1000,300.0]]'),
                               wire.BrokerHeartbeat),
    "HEARTBEAT (broker), no rules": Case(wire.HEARTBEAT, wire.broker_heartbeat, (b"9f8e7d6c",),
                                         wire.BrokerHeartbeat, (b"9f8e7d6c", b"[]")),
    "HISTORY_READ": Case(wire.HISTORY_READ, wire.history_read, (b"h-1", "salle:é".encode(), 41, 1000),
                         wire.HistoryRead, (b"", b"h-1", "salle:é".encode(), b"41", b"1000")),
    "HISTORY_READ last": Case(wire.HISTORY_READ, wire.history_read, (b"h-2", b"room:1", None, 10),
                              wire.HistoryRead, (b"", b"h-2", b"room:1", b"", b"10")),
    "HISTORY": Case(wire.HISTORY, wire.history_answer,
                    (b"h-1", wire.HISTORY_OK, b"k3x9a0qz", 12, 44, True,
                     wire.pack_history_entries([(42, BINARY), (43, b"")])),
                    wire.HistoryAnswer, (b"", b"h-1", wire.HISTORY_OK, b"k3x9a0qz", b"12", b"44", b"1",
                                         wire.pack_history_entries([(42, BINARY), (43, b"")]))),
    "HISTORY none": Case(wire.HISTORY, wire.history_answer, (b"h-3", wire.HISTORY_NONE, b"", 1, 0, False, b""),
                         wire.HistoryAnswer, (b"", b"h-3", wire.HISTORY_NONE, b"", b"1", b"0", b"", b"")),
    "APP_HISTORY": Case(wire.APP_HISTORY, wire.app_history, (b'[["room:*",10,5.0]]',), wire.AppHistory,
                        (b"", b'[["room:*",10,5.0]]')),
    "WORKER_DOWN": Case(wire.WORKER_DOWN, wire.worker_down, (WORKER,), wire.PeerDown),
    "EDGE_DOWN": Case(wire.EDGE_DOWN, wire.edge_down, (EDGE,), wire.PeerDown),
    "EVICTED": Case(wire.EVICTED, wire.evicted, (), wire.Evicted),
    "UNROUTABLE": Case(wire.UNROUTABLE, wire.unroutable,
                       (WORKER, wire.IN, [b"17", b"room:lobby", b"3", b"4", b"ev", BINARY, wire.BINARY]),
                       wire.Unroutable),
    "UNROUTABLE no worker": Case(wire.UNROUTABLE, wire.unroutable,
                                 (b"", wire.CONNECT, [b"c-41", b"{}"]), wire.Unroutable),
}


def expected_fields(case: Case) -> tuple:
    if case.fields is not None:
        return case.fields
    if case.parsed is wire.ChannelList:
        return (case.args[0], set(case.args[1]))
    if case.parsed is wire.Evicted:
        return (b"",)
    return case.args


@pytest.mark.parametrize("name", CASES)
def test_every_kind_round_trips_constructor_pack_unpack_parse(name):
    case = CASES[name]
    frames = case.frames()
    assert frames[0] == case.kind
    assert wire.unpack(wire.pack(frames)) == frames
    parsed = wire.parse(wire.unpack(wire.pack(frames)))
    assert type(parsed) is case.parsed
    assert tuple(parsed) == expected_fields(case)


def test_the_table_covers_every_kind_a_peer_receives():
    assert {case.kind for case in CASES.values()} == set(wire.FRAME_COUNTS) | {wire.UNROUTABLE}


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.kind != wire.UNROUTABLE])
def test_frame_counts_are_the_named_tuples_fields_plus_the_kind(name):
    case = CASES[name]
    assert wire.FRAME_COUNTS[case.kind] == 1 + len(case.parsed._fields) == len(case.frames())


@pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.kind in wire.SENDER_ROLE])
def test_a_routed_message_parses_with_its_sender_as_peer(name):
    """The broker swaps the destination for the sender on the packed bytes (readdress)."""
    case = CASES[name]
    sender = WORKER if wire.SENDER_ROLE[case.kind] == wire.ROLE_WORKER else EDGE
    data = wire.pack(case.frames())
    kind, dest, offset = wire.split_route(data)
    assert (kind, dest) == (case.kind, case.args[0])
    parsed = wire.parse(wire.unpack(wire.readdress(data, sender, offset)))
    assert tuple(parsed) == (sender, *expected_fields(case)[1:])


@pytest.mark.parametrize("name", CASES)
def test_every_wrong_frame_count_is_a_bus_frame_error(name):
    case = CASES[name]
    frames = case.frames()
    right = len(frames)
    padded = frames + [b"extra"] * 3
    for count in range(1, right + 4):
        if count == right or (case.kind == wire.UNROUTABLE and count >= 3):
            continue
        with pytest.raises(wire.BusFrameError, match="frames"):
            wire.parse(padded[:count])
        if case.kind in wire.FRAME_COUNTS:
            with pytest.raises(wire.BusFrameError):
                wire.check_frames(padded[:count])


@pytest.mark.parametrize("kind", [b"?", b"", b"\x00", b"JJ", wire.BROADCAST, wire.BYE])
def test_an_unknown_kind_is_a_bus_frame_error(kind):
    """BYE only ever goes to the broker (and BROADCAST over PUB/SUB): no peer is sent one."""
    with pytest.raises(wire.BusFrameError, match="unknown bus kind"):
        wire.parse([kind, EDGE, b"17"])
    with pytest.raises(wire.BusFrameError, match="unknown bus kind"):
        wire.check_frames([kind, EDGE, b"17"])


def test_an_empty_message_is_a_bus_frame_error():
    with pytest.raises(wire.BusFrameError, match="empty"):
        wire.parse([])
    with pytest.raises(wire.BusFrameError, match="empty"):
        wire.check_frames([])


@pytest.mark.parametrize("build", [wire.sync, wire.edge_sync])
@pytest.mark.parametrize("channels", [
    b"\x01",                                                  # shorter than a length
    b"\x09\x00\x00\x00abc",                                   # a field longer than what follows
    wire.pack_channel_list([(b"1", b"t", b"2")])[:-1],        # the last field cut short
    wire.pack_channel_list([(b"1", b"t", b"2")]) + b"\x00\x00\x00\x00",   # not a whole triple
    wire.pack_channel_list([(b"1", b"t", b"2")])[:-5],        # two fields only
])
def test_a_malformed_channel_list_is_a_bus_frame_error(build, channels):
    frames = build(EDGE, [])
    frames[-1] = channels
    with pytest.raises(wire.BusFrameError, match="SYNC payload"):
        wire.parse(frames)


@pytest.mark.parametrize("name", CASES)
def test_packed_bytes_cut_before_their_last_field_are_a_bus_frame_error(name):
    frames = CASES[name].frames()
    data = wire.pack(frames)
    last_field_starts = len(data) - len(frames[-1])
    for cut in range(last_field_starts if len(frames) > 2 else len(data)):
        with pytest.raises(wire.BusFrameError):
            wire.unpack(data[:cut])


@pytest.mark.parametrize("data, why", [
    (b"", "routing header"),
    (b"J", "routing header"),
    (b"J\x09Ww0", "routing header"),                          # a peer id longer than the message
    (b"J\x03Ww0", "without fields"),                          # no field count
    (b"J\x00" + bytes([40]) + bytes(200), "claims 40 fields"),
    (b"J\x00\x07" + b"\x05\x00\x00", "field lengths"),        # lengths cut short
    (b"J\x00\x03" + b"\xff\x00\x00\x00" + b"\x01\x00\x00\x00" + b"abc", "shorter than its field lengths"),
])
def test_malformed_packed_bytes_are_a_bus_frame_error(data, why):
    with pytest.raises(wire.BusFrameError, match=why):
        wire.unpack(data)


def test_random_and_mangled_bytes_only_ever_raise_bus_frame_error():
    rng = random.Random(11)
    samples = [rng.randbytes(rng.randrange(0, 80)) for _ in range(3000)]
    for case in CASES.values():
        data = bytearray(wire.pack(case.frames()))
        for _ in range(100):
            mangled = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                mangled[rng.randrange(len(mangled))] = rng.randrange(256)
            samples.append(bytes(mangled[:rng.randrange(len(mangled) + 1)]))
    outcomes = {"parsed": 0, "rejected": 0}
    for data in samples:
        try:
            wire.parse(wire.unpack(data))
        except wire.BusFrameError:
            outcomes["rejected"] += 1
        else:
            outcomes["parsed"] += 1
    assert outcomes["parsed"] > 100 and outcomes["rejected"] > 1000, outcomes


# --- what a peer sends the broker: read by the broker from the packed bytes -------------------

@pytest.mark.parametrize("frames, role, fields", [
    (wire.heartbeat(wire.ROLE_WORKER, b"1234"), wire.ROLE_WORKER, [b"1234"]),
    (wire.heartbeat(wire.ROLE_EDGE, b"0"), wire.ROLE_EDGE, [b"0"]),
    (wire.heartbeat(wire.ROLE_EDGE), wire.ROLE_EDGE, []),
    (wire.bye(wire.ROLE_WORKER), wire.ROLE_WORKER, []),
])
def test_a_peers_heartbeat_and_bye_carry_its_role_where_the_broker_reads_a_destination(frames, role, fields):
    kind, peer, offset = wire.split_route(wire.pack(frames))
    assert (kind, peer) == (frames[0], role)
    assert wire.unpack_fields(wire.pack(frames), offset) == fields


# --- broadcasts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("topic, event, payload, fmt, origin, position", [
    ("room:lobby", "new_msg", JSON_PAYLOAD, wire.JSON, b"", b""),
    ("room:lobby", "new_msg", JSON_PAYLOAD, wire.JSON, wire.origin_of(EDGE, b"17"), b""),
    ("room:lobby", "new_msg", JSON_PAYLOAD, wire.JSON, b"", b"k3x9a0qz:42"),
    ("salle:é", "évènement", BINARY, wire.BINARY, b"", b"k3x9a0qz:1"),
    ("room:" + "x" * 250, "e", b"", wire.BINARY, b"", b""),
    ("", "", b"{}", wire.JSON, b"", b""),
])
def test_a_broadcast_round_trips_pack_unpack_parse(topic, event, payload, fmt, origin, position):
    frames = wire.broadcast_frames(topic, event, payload, fmt, origin, position)
    data = wire.pack_broadcast(frames)
    assert data.startswith(wire.topic_key(topic))     # SUB filters on this prefix
    assert wire.unpack_broadcast(data) == frames
    parsed = wire.parse_broadcast(wire.unpack_broadcast(data))
    assert parsed == wire.Broadcast(wire.topic_key(topic), event.encode(), origin, payload, fmt, position)
    assert wire.topic_from_key(parsed.key) == topic


def test_broadcast_frames_counts_the_named_tuples_fields_and_the_marker():
    assert wire.BROADCAST_FRAMES == 1 + len(wire.Broadcast._fields) == len(wire.broadcast_frames("t", "e", b"{}"))


def _spoiled(index: int, value: bytes) -> list[bytes]:
    frames = wire.broadcast_frames("room:lobby", "new_msg", b"{}")
    frames[index] = value
    return frames


@pytest.mark.parametrize("frames, why", [
    *[(wire.broadcast_frames("room:lobby", "ev", b"{}")[:n], "malformed broadcast") for n in range(6)],
    (wire.broadcast_frames("room:lobby", "ev", b"{}") + [b"extra"], "malformed broadcast"),
    (_spoiled(1, wire.PUSH), "malformed broadcast"),
    (_spoiled(0, b"room:lobby"), "without terminator"),
    (_spoiled(5, b"x"), "unknown payload format"),
])
def test_a_malformed_broadcast_is_a_bus_frame_error(frames, why):
    with pytest.raises(wire.BusFrameError, match=why):
        wire.parse_broadcast(frames)
    with pytest.raises(wire.BusFrameError, match=why):
        wire.check_broadcast(frames)


@pytest.mark.parametrize("data, why", [
    (b"", "without a topic key"),
    (b"room:lobby", "without a topic key"),
    (wire.topic_key("room:lobby"), "without fields"),
    (wire.topic_key("room:lobby") + b"\x09", "field lengths"),            # claims 9 fields
    (wire.topic_key("room:lobby") + b"\x03" + b"\xff\x00\x00\x00" * 2, "shorter than its field lengths"),
])
def test_malformed_packed_broadcast_bytes_are_a_bus_frame_error(data, why):
    with pytest.raises(wire.BusFrameError, match=why):
        wire.unpack_broadcast(data)


def test_a_topic_key_without_its_terminator_is_a_bus_frame_error():
    with pytest.raises(wire.BusFrameError, match="without terminator"):
        wire.topic_from_key(b"room:lobby")


# --- history -------------------------------------------------------------------------------------

def test_a_broadcast_for_the_sequencer_is_delivered_to_no_client_topic_and_gets_its_position():
    frames = wire.broadcast_frames("room:1", "new_msg", b'{"a":1}', origin=wire.origin_of(EDGE, b"3"))
    data = wire.pack_broadcast(wire.to_sequencer(frames))
    assert data.startswith(wire.SEQUENCER_PREFIX) and not data.startswith(wire.topic_key("room:1"))
    out = wire.sequenced(data[len(wire.SEQUENCER_PREFIX):], b"k3x9a0qz:7")
    parsed = wire.parse_broadcast(wire.unpack_broadcast(out))
    assert parsed == wire.Broadcast(wire.topic_key("room:1"), b"new_msg", wire.origin_of(EDGE, b"3"),
                                    b'{"a":1}', wire.JSON, b"k3x9a0qz:7")
    with pytest.raises(wire.BusFrameError):
        wire.sequenced(wire.topic_key("room:1") + wire.pack_fields([wire.BROADCAST]), b"x:1")


def test_a_broadcast_without_the_position_field_from_an_older_publisher_is_read_without_position():
    frames = wire.broadcast_frames("room:1", "e", b"{}")[:-1]
    assert wire.parse_broadcast(frames) == wire.Broadcast(wire.topic_key("room:1"), b"e", b"", b"{}", wire.JSON, b"")
    out = wire.sequenced(wire.pack_broadcast(frames), b"k3x9a0qz:1")
    assert wire.parse_broadcast(wire.unpack_broadcast(out)).position == b"k3x9a0qz:1"


def test_history_entries_round_trip_and_truncated_ones_are_bus_frame_errors():
    entries = [(i, bytes(range(i % 256)) * 3) for i in range(1, 300)]
    data = wire.pack_history_entries(entries)
    assert wire.unpack_history_entries(data) == entries
    assert len(data) == sum(wire.history_entry_size(d) for _, d in entries)
    for bad in (data[:5], data[:-1]):
        with pytest.raises(wire.BusFrameError):
            wire.unpack_history_entries(bad)


def test_the_rule_announcement_round_trips_and_no_topic_key_starts_with_a_system_key():
    assert wire.parse_rules_announcement(wire.rules_announcement(b"[]")) == b"[]"
    with pytest.raises(wire.BusFrameError):
        wire.parse_rules_announcement(wire.topic_key("room:1") + wire.pack_fields([b"[]"]))
    for topic in ("room:1", "\uffff", "\x7f", "é"):
        key = wire.topic_key(topic)
        assert not key.startswith(wire.SEQUENCER_PREFIX[:1]) and not key.startswith(wire.RULES_KEY[:1])
