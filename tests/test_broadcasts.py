"""The checks every broadcast passes before it goes on the bus (bus/broadcasts.py), from tables.

The callers (workers.broadcast and Channel.broadcast, zchannels.Publisher, POST /api/broadcast)
are tested through their own interfaces in test_worker_runtime.py and test_publish.py.
"""
from __future__ import annotations

import re

import pytest

from zchannels.bus import broadcasts, wire

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize("topic, event, payload", [
    ("room:lobby", "new_msg", {"body": "hi"}),
    ("room:lobby", "new_msg", {}),
    ("r", "e", b"\x00binary"),
    ("r", "e", bytearray(b"ab")),
    ("r", "e", memoryview(b"ab")),
    ("room:é✓", "évènement", {"nested": {"a": [1, 2]}}),
    ("zchannels", "e", {}),               # only the "zchannels:" prefix is reserved
    ("t" * 10_000, "e" * 10_000, {}),     # no length limit on the bus
])
def test_good_broadcasts_pass_from_inside_and_outside(topic, event, payload):
    assert broadcasts.check(topic, event, payload) is None
    assert broadcasts.check(topic, event, payload, outside=True) is None


BAD = [
    # topic, event, payload, field, error, text
    ("", "e", {}, "topic", TypeError, "topic must be a non-empty string"),
    (None, "e", {}, "topic", TypeError, "topic must be a non-empty string"),
    (b"room:1", "e", {}, "topic", TypeError, "topic must be a non-empty string"),
    (5, "e", {}, "topic", TypeError, "topic must be a non-empty string"),
    ("room:\x00x", "e", {}, "topic", ValueError, "topic must not contain NUL (it ends topic keys)"),
    ("room:1\x00", "e", {}, "topic", ValueError, "topic must not contain NUL (it ends topic keys)"),
    ("\x00", "e", {}, "topic", ValueError, "topic must not contain NUL (it ends topic keys)"),
    ("r", "", {}, "event", TypeError, "event must be a non-empty string"),
    ("r", None, {}, "event", TypeError, "event must be a non-empty string"),
    ("r", b"e", {}, "event", TypeError, "event must be a non-empty string"),
    ("r", "a\x00b", {}, "event", ValueError, "event must not contain NUL"),
    ("r", "e", [1, 2], "payload", TypeError, "payload must be a dict (JSON object) or bytes"),
    ("r", "e", "text", "payload", TypeError, "payload must be a dict (JSON object) or bytes"),
    ("r", "e", None, "payload", TypeError, "payload must be a dict (JSON object) or bytes"),
    ("r", "e", 1.5, "payload", TypeError, "payload must be a dict (JSON object) or bytes"),
]


@pytest.mark.parametrize("topic, event, payload, field, error, text", BAD)
def test_bad_broadcasts_name_the_field_the_error_and_the_value(topic, event, payload, field, error, text):
    for outside in (False, True):
        problem = broadcasts.check(topic, event, payload, outside=outside)
        assert problem == broadcasts.Problem(field, text, {"topic": topic, "event": event,
                                                           "payload": payload}[field], error)


def test_the_first_problem_is_reported_topic_then_event_then_payload():
    assert broadcasts.check("", "", []).field == "topic"
    assert broadcasts.check("r", "", []).field == "event"
    assert broadcasts.check("r", "e", []).field == "payload"


@pytest.mark.parametrize("topic", [wire.STATUS_TOPIC, "zchannels:", "zchannels:anything"])
def test_system_topics_are_refused_to_outside_publishers_only(topic):
    assert broadcasts.check(topic, "e", {}) is None
    assert broadcasts.check(topic, "e", {}, outside=True) == broadcasts.Problem(
        "topic", "topics starting with 'zchannels:' are reserved for zchannels itself", topic, ValueError)


@pytest.mark.parametrize("problem, what, error, message", [
    (broadcasts.check("", "e", {}), "broadcast", TypeError,
     "broadcast topic must be a non-empty string, got ''"),
    (broadcasts.check("a\x00b", "e", {}), "broadcast", ValueError,
     "broadcast topic must not contain NUL (it ends topic keys), got 'a\\x00b'"),
    (broadcasts.check("r", 7, {}), "broadcast_from", TypeError,
     "broadcast_from event must be a non-empty string, got 7"),
    (broadcasts.check("r", "e", [1]), "push", TypeError,
     "push payload must be a dict (JSON object) or bytes, got list"),
    (broadcasts.check("zchannels:status", "e", {}, outside=True), "broadcast", ValueError,
     "broadcast topics starting with 'zchannels:' are reserved for zchannels itself, "
     "got 'zchannels:status'"),
])
def test_python_callers_raise_the_problem_with_its_value(problem, what, error, message):
    exc = problem.exception(what)
    assert type(exc) is error and str(exc) == message


@pytest.mark.parametrize("payload, encoded", [
    ({"a": 1, "b": [True, None]}, (b'{"a":1,"b":[true,null]}', wire.JSON)),
    ({}, (b"{}", wire.JSON)),
    (b"\x00\xff", (b"\x00\xff", wire.BINARY)),
    (bytearray(b"xy"), (b"xy", wire.BINARY)),
    (memoryview(b"xyz")[1:], (b"yz", wire.BINARY)),
])
def test_encode_gives_the_payload_bytes_and_format(payload, encoded):
    data, fmt = broadcasts.encode("room:1", "e", payload)
    assert (data, fmt) == encoded and type(data) is bytes
    assert broadcasts.encode_payload(payload) == encoded


@pytest.mark.parametrize("topic, event, payload, error, message", [
    ("room:\x00", "e", {}, ValueError, "broadcast topic must not contain NUL"),
    ("room:1", "", {}, TypeError, "broadcast event must be a non-empty string, got ''"),
    ("room:1", "e", ["x"], TypeError, "broadcast payload must be a dict (JSON object) or bytes, got list"),
    ("room:1", "e", {"s": {1, 2}}, TypeError, "not JSON serializable"),   # orjson's own error
])
def test_encode_raises_for_a_broadcast_no_edge_could_deliver(topic, event, payload, error, message):
    with pytest.raises(error, match=re.escape(message)):
        broadcasts.encode(topic, event, payload)


def test_encode_refuses_system_topics_only_outside():
    assert broadcasts.encode(wire.STATUS_TOPIC, "worker", {}) == (b"{}", wire.JSON)
    with pytest.raises(ValueError, match="reserved for zchannels itself"):
        broadcasts.encode(wire.STATUS_TOPIC, "worker", {}, outside=True)


def test_encode_payload_names_the_call():
    with pytest.raises(TypeError, match=r"^push payload must be a dict \(JSON object\) or bytes, got tuple$"):
        broadcasts.encode_payload((1,), "push")
