"""LongPoll POST bodies -> messages (edge/lpsession.py ``decode_body``, PROTOCOL.md §5.4): text
lines and base64 binary lines, and the specific error each malformed binary line gets."""
from __future__ import annotations

import base64
import re

import pytest

from zchannels.edge.lpsession import MAX_LINES, decode_body
from zchannels.edge.serializer import V1, V2, DecodeError, Message

NDJSON = "application/x-ndjson"
MAX = 64


def push(payload: bytes = b"\x01\x02", join_ref: bytes = b"1", ref: bytes = b"2") -> bytes:
    fields = [join_ref, ref, b"t", b"e"]
    return bytes([0, *map(len, fields)]) + b"".join(fields) + payload


def b64(frame: bytes) -> bytes:
    return base64.b64encode(frame)


def test_text_and_binary_lines_decode_in_order():
    body = b'["1","1","t","phx_join",{}]\r\n' + b64(push()) + b"\n" + b64(push(b"")).rstrip(b"=")
    assert decode_body(V2, NDJSON, body, MAX) == [
        Message("1", "1", "t", "phx_join", {}, False),
        Message("1", "2", "t", "e", b"\x01\x02", True),
        Message("1", "2", "t", "e", b"", True)]      # padding may be left out


def test_a_binary_line_counts_toward_the_100_lines():
    lines = [b64(push(ref=str(i).encode())) for i in range(MAX_LINES + 1)]
    messages = decode_body(V2, NDJSON, b"\n".join(lines), MAX)
    assert [m.ref for m in messages] == [str(i) for i in range(MAX_LINES)]


def test_the_frame_size_limit_applies_to_the_decoded_binary_frame():
    fits = push(bytes(MAX - len(push(b""))))
    assert len(fits) == MAX and len(b64(fits)) > MAX
    assert decode_body(V2, NDJSON, b64(fits), MAX)[0].payload == bytes(MAX - len(push(b"")))
    with pytest.raises(DecodeError, match=f"line 1 is a binary frame of {MAX + 1} bytes, more than the {MAX}"):
        decode_body(V2, NDJSON, b64(fits + b"\x00"), MAX)


BAD_BINARY_LINES = [
    (b"!!not base64!!", "line 2 is neither a text frame"),
    (b"AAE C", "line 2 is neither a text frame"),
    (b"AAECA", "line 2 is neither a text frame"),
    (b"AA==AA==", "line 2 is neither a text frame"),
    (b64(b""), None),                                    # an empty line is skipped
    (b64(b"\x00\x05"), "line 2 (base64 of a binary frame): binary push header needs 5 bytes"),
    (b64(bytes([1, 1, 1, 1, 1]) + b"abcd"), "unknown binary frame kind 1"),
    (b64(bytes([0, 9, 9, 9, 9]) + b"abc"), "declares 36 bytes of strings"),
    (b64(push(join_ref=b"\xff")), "join_ref is not valid UTF-8"),
]


@pytest.mark.parametrize("line,fragment", BAD_BINARY_LINES)
def test_malformed_binary_lines_get_an_error_naming_the_line(line, fragment):
    body = b64(push()) + b"\n" + line
    if fragment is None:
        assert len(decode_body(V2, NDJSON, body, MAX)) == 1
        return
    with pytest.raises(DecodeError, match=re.escape(fragment)):
        decode_body(V2, NDJSON, body, MAX)


def test_a_v1_session_reads_every_line_as_json():
    with pytest.raises(DecodeError, match="line 1: invalid JSON"):
        decode_body(V1, NDJSON, b64(push()), MAX)
