"""The Phoenix client wire format (edge/serializer.py), tested from tables and properties.

Expected frames come from docs/protocol.md §3.2-3.4 (observed phoenix.js 1.8.16 traffic; 1.8.17 sends the same).
"""
from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from zchannels.edge.serializer import (BINARY, V1, V2, DecodeError, EncodeError, Message, V1JSON, V2JSON,
                             serializer_for_vsn)


# --- a tiny client-side decoder for server binary frames (what phoenix.js does) ------

def client_decode_binary(frame: bytes) -> dict:
    kind = frame[0]
    if kind == 0:
        names, event_key = ("join_ref", "topic", "event"), "event"
    elif kind == 1:
        names, event_key = ("join_ref", "ref", "topic", "status"), "status"
    elif kind == 2:
        names, event_key = ("topic", "event"), "event"
    else:
        raise AssertionError(f"unknown kind {kind}")
    sizes = frame[1:1 + len(names)]
    pos, out = 1 + len(names), {"kind": kind}
    for name, size in zip(names, sizes):
        out[name] = frame[pos:pos + size].decode()
        pos += size
    out["data"] = frame[pos:]
    assert event_key in out
    return out


# --- decoding: valid frames ----------------------------------------------------

DECODE_OK = [
    (V2, '["6","6","room:1","phx_join",{"x":1}]', Message("6", "6", "room:1", "phx_join", {"x": 1}, False)),
    (V2, '["6","7","room:1","ping",{"q":1}]', Message("6", "7", "room:1", "ping", {"q": 1}, False)),
    (V2, '["6","10","room:1","phx_leave",{}]', Message("6", "10", "room:1", "phx_leave", {}, False)),
    (V2, '[null,"9","phoenix","heartbeat",{}]', Message(None, "9", "phoenix", "heartbeat", {}, False)),
    (V2, b'["6","7","room:1","ping",[1,2]]', Message("6", "7", "room:1", "ping", [1, 2], False)),
    (V2, '["6","7","t","e",{},"extra",3]', Message("6", "7", "t", "e", {}, False)),
    (V2, '["6","7","t","e","unicode \u00e9"]', Message("6", "7", "t", "e", "unicode \u00e9", False)),
    (V1, '{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}',
     Message(None, "1", "phoenix", "heartbeat", {}, False)),
    (V1, '{"topic":"room:1","event":"phx_join","payload":{"a":1},"ref":"3","join_ref":"3"}',
     Message("3", "3", "room:1", "phx_join", {"a": 1}, False)),
    (V1, b'{"topic":"t","event":"e","payload":null,"ref":null}', Message(None, None, "t", "e", None, False)),
]


@pytest.mark.parametrize("ser,frame,expected", DECODE_OK)
def test_decode_text_accepts_protocol_examples(ser, frame, expected):
    assert ser.decode_text(frame) == expected


def test_decode_binary_matches_observed_client_push():
    frame = bytes.fromhex("00 01 01 06 01 36 38 72 6f 6f 6d 3a 31 62 01 02 03")
    assert V2.decode_binary(frame) == Message("6", "8", "room:1", "b", b"\x01\x02\x03", True)


def test_decode_binary_reads_zero_length_join_ref_as_null_and_allows_empty_payload():
    frame = bytes([0, 0, 1, 1, 1]) + b"1te"
    assert V2.decode_binary(frame) == Message(None, "1", "t", "e", b"", True)


def test_decode_binary_accepts_memoryview():
    frame = bytes.fromhex("00 01 01 06 01 36 38 72 6f 6f 6d 3a 31 62 01 02 03")
    assert V2.decode_binary(memoryview(frame)).payload == b"\x01\x02\x03"


# --- decoding: malformed frames ------------------------------------------------------

DECODE_TEXT_BAD = [
    (V2, '{"topic":"t"}', "expected a JSON array"),
    (V2, '["1","2","t"]', "expected a JSON array of 5 elements, got 3"),
    (V2, '[]', "got 0"),
    (V2, '["1","2",3,"e",{}]', "topic must be a string"),
    (V2, '["1","2","t",null,{}]', "event must be a string"),
    (V2, '["1","2","t","e",{}', "invalid JSON"),
    (V2, "", "invalid JSON"),
    (V2, b"\xff\xfe", "invalid JSON"),
    (V2, "\ud800", "invalid JSON"),
    (V2, '"string"', "got string"),
    (V1, '["1","2","t","e",{}]', "expected a JSON object"),
    (V1, '{"topic":"t","event":"e","payload":{}}', "missing required key(s): ref"),
    (V1, '{"event":"e","ref":"1"}', "topic, payload"),
    (V1, '{"topic":1,"event":"e","payload":{},"ref":"1"}', "topic must be a string"),
    (V1, "nope", "invalid JSON"),
]


@pytest.mark.parametrize("ser,frame,fragment", DECODE_TEXT_BAD)
def test_decode_text_rejects_malformed_frames_with_a_specific_error(ser, frame, fragment):
    with pytest.raises(DecodeError) as info:
        ser.decode_text(frame)
    assert fragment in str(info.value)


DECODE_BINARY_BAD = [
    (b"", "empty binary frame"),
    (bytes([0, 1, 1]), "header needs 5 bytes"),
    (bytes([0, 1, 1, 6, 1]) + b"68room:", "declares 9 bytes of strings"),
    (bytes([1, 1, 1, 1, 1]) + b"1tes", "unknown binary frame kind 1"),
    (bytes([2, 1, 1]) + b"te", "unknown binary frame kind 2"),
    (b'["1","2","t","e",{}]', "unknown binary frame kind 91"),
    (bytes([0, 0, 1, 1, 1]) + b"1\xffe", "topic is not valid UTF-8"),
    (bytes([0, 1, 0, 1, 1]) + b"\xc3te", "join_ref is not valid UTF-8"),
]


@pytest.mark.parametrize("frame,fragment", DECODE_BINARY_BAD)
def test_decode_binary_rejects_malformed_frames(frame, fragment):
    with pytest.raises(DecodeError) as info:
        V2.decode_binary(frame)
    assert fragment in str(info.value)


def test_v1_parses_json_in_a_binary_frame_like_a_text_frame():
    frame = b'{"topic":"room:1","event":"phx_join","payload":{},"ref":"3"}'
    assert V1.decode_binary(frame) == V1.decode_text(frame)
    assert V1.decode_binary(memoryview(frame)).ref == "3"


def test_v1_binary_frame_that_is_not_json_is_a_decode_error():
    with pytest.raises(DecodeError, match="invalid JSON"):
        V1.decode_binary(bytes.fromhex("00 01 01 06 01 36 38 72 6f 6f 6d 3a 31 62 01 02 03"))


REFS_OF_ANY_TYPE = [7, 0, -3, 2.5, 2**63, "8", "", None, True, [1, "a"], {"k": 1}]


@pytest.mark.parametrize("ref", REFS_OF_ANY_TYPE)
def test_refs_of_any_json_type_decode_verbatim_v1_and_v2(ref):
    v2 = V2.decode_text(orjson.dumps([ref, ref, "t", "e", {}]))
    assert (v2.join_ref, v2.ref) == (ref, ref)
    assert type(v2.ref) is type(ref)
    v1 = V1.decode_text(orjson.dumps({"topic": "t", "event": "e", "payload": {}, "ref": ref,
                                      "join_ref": ref}))
    assert (v1.join_ref, v1.ref) == (ref, ref)


@pytest.mark.parametrize("ref", REFS_OF_ANY_TYPE)
def test_numeric_refs_are_echoed_with_their_type(ref):
    frame, _ = V2.encode_reply(ref, ref, "t", "ok", b"{}")
    assert orjson.loads(frame)[:2] == [ref, ref]
    frame, _ = V1.encode_reply(ref, ref, "t", "ok", b"{}")
    assert orjson.loads(frame)["ref"] == ref
    assert "join_ref" not in orjson.loads(frame)


def test_a_numeric_ref_in_a_binary_reply_is_its_json_text():
    frame, binary = V2.encode_reply(7, 8, "t", "ok", b"\x01", BINARY)
    assert binary and frame == bytes([1, 1, 1, 1, 2]) + b"78tok\x01"


# --- encoding: exact bytes -------------------------------------------------------------

ENCODE_CASES = [
    # V2 JSON, expected frames from docs/protocol.md §3.2 / §4.3
    (V2.encode_reply, ("6", "7", "room:1", "ok", b'{"echo":{"q":1}}'),
     b'["6","7","room:1","phx_reply",{"status":"ok","response":{"echo":{"q":1}}}]', False),
    (V2.encode_reply, (None, "9", "phoenix", "ok", b"{}"),
     b'[null,"9","phoenix","phx_reply",{"status":"ok","response":{}}]', False),
    (V2.encode_push, ("6", "room:1", "pushed", b'{"a":1}'), b'["6",null,"room:1","pushed",{"a":1}]', False),
    (V2.encode_broadcast, ("room:1", "bcast", b'{"b":2}'), b'[null,null,"room:1","bcast",{"b":2}]', False),
    (V2.encode_close, ("6", "room:1"), b'["6","6","room:1","phx_close",{}]', False),
    (V2.encode_error, ("6", "room:1"), b'["6","6","room:1","phx_error",{"reason":"channel_crash"}]', False),
    (V2.encode_close, (None, "room:1"), b'[null,null,"room:1","phx_close",{}]', False),
    (V2.encode_push, ("6", 'q"uote', "\u00e9", b"{}"), b'["6",null,"q\\"uote","\xc3\xa9",{}]', False),
    # V2 binary, docs/protocol.md §3.4 layouts
    (V2.encode_push, ("6", "room:1", "b", b"\x01\x02\x03", b"b"),
     bytes.fromhex("00 01 06 01 36 72 6f 6f 6d 3a 31 62 01 02 03"), True),
    (V2.encode_reply, ("6", "8", "room:1", "ok", b"\x01\x02", b"b"),
     bytes.fromhex("01 01 01 06 02 36 38 72 6f 6f 6d 3a 31 6f 6b 01 02"), True),
    (V2.encode_broadcast, ("room:1", "b", b"\x09", b"b"),
     bytes.fromhex("02 06 01 72 6f 6f 6d 3a 31 62 09"), True),
    (V2.encode_push, (None, "t", "e", b"", b"b"), bytes([0, 0, 1, 1]) + b"te", True),
    # V1 JSON, docs/protocol.md §3.3: never a join_ref
    (V1.encode_reply, ("6", "7", "room:1", "error", b'{"reason":"x"}'),
     b'{"topic":"room:1","event":"phx_reply","payload":{"status":"error","response":{"reason":"x"}},"ref":"7"}',
     False),
    (V1.encode_push, ("6", "room:1", "pushed", b'{"a":1}'),
     b'{"topic":"room:1","event":"pushed","payload":{"a":1},"ref":null}', False),
    (V1.encode_broadcast, ("room:1", "bcast", b'{"b":2}'),
     b'{"topic":"room:1","event":"bcast","payload":{"b":2},"ref":null}', False),
    (V1.encode_close, ("6", "room:1"), b'{"topic":"room:1","event":"phx_close","payload":{},"ref":"6"}', False),
    (V1.encode_error, ("6", "room:1"),
     b'{"topic":"room:1","event":"phx_error","payload":{"reason":"channel_crash"},"ref":"6"}', False),
]


@pytest.mark.parametrize("encode,args,frame,is_binary", ENCODE_CASES)
def test_encoders_produce_the_exact_protocol_frames(encode, args, frame, is_binary):
    assert encode(*args) == (frame, is_binary)


ENCODE_BAD = [
    (V1.encode_push, ("6", "t", "e", b"\x01", b"b"), "V1 client"),
    (V1.encode_reply, ("6", "7", "t", "ok", b"\x01", b"b"), "V1 client"),
    (V1.encode_broadcast, ("t", "e", b"\x01", b"b"), "V1 client"),
    (V2.encode_push, ("6", "t" * 256, "e", b"", b"b"), "topic is 256 bytes"),
    (V2.encode_reply, ("6", "7", "t", "s" * 300, b"", b"b"), "status is 300 bytes"),
    (V2.encode_broadcast, ("t", "\u00e9" * 128, b"", b"b"), "event is 256 bytes"),
    (V2.encode_push, ("6", "t", "e", b"{}", b"x"), "payload format"),
]


@pytest.mark.parametrize("encode,args,fragment", ENCODE_BAD)
def test_encoders_refuse_what_the_format_cannot_carry(encode, args, fragment):
    with pytest.raises(EncodeError) as info:
        encode(*args)
    assert fragment in str(info.value)


def test_binary_string_of_exactly_255_bytes_is_allowed():
    frame, is_binary = V2.encode_broadcast("t" * 255, "e", b"", b"b")
    assert is_binary and client_decode_binary(frame)["topic"] == "t" * 255


# --- negotiation --------------------------------------------------------------------

VSN = [
    (None, V1), ("1.0.0", V1), ("1.0.7", V1), ("1.0.0+build.1", V1),
    ("2.0.0", V2), ("2.0.3", V2), ("2.0.1-rc.1", V2),
    ("2.1.0", None), ("3.0.0", None), ("0.9.0", None), ("1.1.0", None), ("2.0", None),
    ("2", None), ("", None), ("v2.0.0", None), ("2.0.0-rc", None), ("02.0.0", None),
    ("2.0.0 ", None), ("\u0662.0.0", None), (["2.0.0"], None),
]


@pytest.mark.parametrize("vsn,expected", VSN)
def test_serializer_for_vsn_follows_phoenix_requirements(vsn, expected):
    assert serializer_for_vsn(vsn) is expected


def test_serializer_identity():
    assert isinstance(V1, V1JSON) and (V1.name, V1.supports_binary) == ("v1", False)
    assert isinstance(V2, V2JSON) and (V2.name, V2.supports_binary) == ("v2", True)


# --- properties ---------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=10)
objects = st.dictionaries(st.text(), json_values, max_size=4)
refs = st.none() | st.text()
short = st.text().filter(lambda s: len(s.encode()) <= 255)


@given(join_ref=refs, ref=refs, topic=st.text(), status=st.text(), response=json_values)
def test_property_json_replies_parse_to_the_expected_message(join_ref, ref, topic, status, response):
    body = orjson.dumps(response)
    expected_payload = {"status": status, "response": orjson.loads(body)}
    frame, is_binary = V2.encode_reply(join_ref, ref, topic, status, body)
    assert not is_binary
    assert orjson.loads(frame) == [join_ref, ref, topic, "phx_reply", expected_payload]
    frame, is_binary = V1.encode_reply(join_ref, ref, topic, status, body)
    assert not is_binary
    assert orjson.loads(frame) == {"topic": topic, "event": "phx_reply", "payload": expected_payload,
                                   "ref": ref}


@given(join_ref=refs, topic=st.text(), event=st.text(), payload=objects)
def test_property_json_pushes_and_broadcasts_parse_to_the_expected_message(join_ref, topic, event, payload):
    body = orjson.dumps(payload)
    parsed = orjson.loads(body)
    push = V2.encode_push(join_ref, topic, event, body)[0]
    assert orjson.loads(push) == [join_ref, None, topic, event, parsed]
    assert orjson.loads(V2.encode_broadcast(topic, event, body)[0]) == [None, None, topic, event, parsed]
    expected_v1 = {"topic": topic, "event": event, "payload": parsed, "ref": None}
    assert orjson.loads(V1.encode_push(join_ref, topic, event, body)[0]) == expected_v1
    assert orjson.loads(V1.encode_broadcast(topic, event, body)[0]) == expected_v1


@given(join_ref=st.none() | short, ref=short, topic=short, event=short, data=st.binary())
def test_property_binary_frames_round_trip(join_ref, ref, topic, event, data):
    push = client_decode_binary(V2.encode_push(join_ref, topic, event, data, b"b")[0])
    assert push == {"kind": 0, "join_ref": join_ref or "", "topic": topic, "event": event, "data": data}
    reply = client_decode_binary(V2.encode_reply(join_ref, ref, topic, event, data, b"b")[0])
    assert reply == {"kind": 1, "join_ref": join_ref or "", "ref": ref, "topic": topic,
                     "status": event, "data": data}
    bcast = client_decode_binary(V2.encode_broadcast(topic, event, data, b"b")[0])
    assert bcast == {"kind": 2, "topic": topic, "event": event, "data": data}
    # and the client->server layout (with a ref byte) decodes back to the same fields
    parts = [(join_ref or "").encode(), ref.encode(), topic.encode(), event.encode()]
    client_frame = bytes([0, *map(len, parts)]) + b"".join(parts) + data
    assert V2.decode_binary(client_frame) == Message(join_ref or None, ref, topic, event, data, True)


@given(join_ref=refs, ref=refs, topic=st.text(), event=st.text(), payload=json_values)
def test_property_v2_text_round_trips(join_ref, ref, topic, event, payload):
    frame = orjson.dumps([join_ref, ref, topic, event, payload])
    assert V2.decode_text(frame) == Message(join_ref, ref, topic, event, orjson.loads(frame)[4], False)


def _only_decode_errors(decode, data):
    try:
        decode(data)
    except DecodeError:
        pass


@settings(max_examples=300)
@given(data=st.text() | st.binary() | json_values.map(orjson.dumps)
       | st.lists(json_values, max_size=7).map(orjson.dumps)
       | st.dictionaries(st.sampled_from(["topic", "event", "payload", "ref", "join_ref"]),
                         json_values).map(orjson.dumps))
def test_property_decode_text_raises_only_decode_error(data):
    _only_decode_errors(V2.decode_text, data)
    _only_decode_errors(V1.decode_text, data)


@settings(max_examples=300)
@given(data=st.binary() | st.binary().map(lambda b: b"\x00" + b))
def test_property_decode_binary_raises_only_decode_error(data):
    _only_decode_errors(V2.decode_binary, data)
    _only_decode_errors(V1.decode_binary, data)
