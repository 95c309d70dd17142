"""RFC 6455 to the letter, in-process: the cases the Autobahn|Testsuite (1-10) failed or passed
only non-strictly.  Reserved opcodes fail the connection (1002), a malformed close frame is
answered 1002 (bad length or code) or 1007 (reason not UTF-8), and invalid UTF-8 in a
fragmented text message is caught at the fragment that carries it, before the message ends.
"""
from __future__ import annotations

import pytest

from tests.test_wsproto import feed, masked

pytestmark = pytest.mark.timeout(30)

HEARTBEAT = b'[null,"1","phoenix","heartbeat",{}]'


def close_code(written: bytes) -> int | None:
    """The code of the server's close frame in `written` (frames are unmasked, short)."""
    pos = 0
    while pos + 2 <= len(written):
        opcode, n = written[pos] & 0x0F, written[pos + 1] & 0x7F
        if n >= 126:
            pos += 2 + (2 if n == 126 else 8) + int.from_bytes(
                written[pos + 2:pos + (4 if n == 126 else 10)], "big")
            continue
        if opcode == 0x8:
            return int.from_bytes(written[pos + 2:pos + 4], "big")
        pos += 2 + n
    return None


def close_frame(code: int | None = None, reason: bytes = b"", raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else code.to_bytes(2, "big") + reason
    return masked(body, opcode=0x8)


@pytest.mark.parametrize("opcode", [0xB, 0xC, 0xD, 0xE, 0xF])
def test_a_reserved_control_opcode_fails_the_connection_1002(opcode):
    conn, transport = feed([masked(b"", opcode=opcode) + masked(HEARTBEAT)])
    assert close_code(transport.written) == 1002 and transport.closed
    assert conn.messages == []          # nothing after it is read


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7])
def test_a_reserved_data_opcode_fails_the_connection_1002(opcode):
    conn, transport = feed([masked(b"x", opcode=opcode) + masked(HEARTBEAT)])
    assert close_code(transport.written) == 1002 and transport.closed
    assert conn.messages == []


def test_a_close_frame_with_a_one_byte_body_is_answered_1002():
    _conn, transport = feed([close_frame(raw=b"\x03")])
    assert close_code(transport.written) == 1002 and transport.closed


def test_a_close_reason_that_is_not_utf8_is_answered_1007():
    reason = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80ed"   # Autobahn 7.5.1's
    _conn, transport = feed([close_frame(1000, reason)])
    assert close_code(transport.written) == 1007 and transport.closed


def test_an_empty_close_frame_is_answered_1000():
    _conn, transport = feed([close_frame(raw=b"")])
    assert close_code(transport.written) == 1000 and transport.closed


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_a_close_code_no_peer_may_send_is_answered_1002(code):
    _conn, transport = feed([close_frame(code, b"bye")])
    assert close_code(transport.written) == 1002


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999,
                                  4000, 4999])
def test_a_valid_close_code_with_a_utf8_reason_is_echoed(code):
    _conn, transport = feed([close_frame(code, "au revoir, ça va".encode())])
    assert close_code(transport.written) == code


def test_invalid_utf8_in_a_first_fragment_fails_before_the_message_ends():
    conn, transport = feed([masked(b'[null,"1","phoenix","heart\xff', fin=False)])
    assert close_code(transport.written) == 1007 and transport.closed
    assert conn.messages == []


def test_invalid_utf8_in_a_continuation_fails_at_that_fragment():
    first = masked(b'[null,"1","phoenix",', fin=False)
    bad = masked(b'"\xed\xa0\x80"', opcode=0, fin=False)      # a UTF-16 surrogate, encoded
    conn, transport = feed([first, bad])
    assert close_code(transport.written) == 1007 and transport.closed


def test_a_message_ending_inside_a_character_fails_1007():
    conn, transport = feed([masked(b'[null,"1","phoenix","heartbeat",{}]', fin=False)
                            + masked(b"\xe2\x82", opcode=0)])
    assert close_code(transport.written) == 1007


def test_a_character_split_across_fragments_is_valid():
    body = '[null,"1","phoenix","heartbeat",{"s":"€ and ☃"}]'.encode()
    cut = body.index("€".encode()) + 1         # inside the euro sign's three bytes
    stream = masked(body[:cut], fin=False) + masked(body[cut:cut + 2], opcode=0, fin=False) \
        + masked(b"", opcode=0x9) + masked(body[cut + 2:], opcode=0)
    conn, transport = feed([stream])
    assert [m.payload for m in conn.messages] == [{"s": "€ and ☃"}]
    assert not transport.closed


def test_binary_fragments_are_not_checked_as_utf8():
    _conn, transport = feed([masked(b"\xff", opcode=0x2, fin=False)
                             + masked(b"\xfe", opcode=0, fin=False)])
    assert not transport.closed and close_code(transport.written) is None


def test_rsv1_without_an_agreed_extension_fails_1002():
    frame = bytearray(masked(HEARTBEAT))
    frame[0] |= 0x40
    _conn, transport = feed([bytes(frame)])
    assert close_code(transport.written) == 1002


def test_invalid_utf8_inside_one_frame_fails_before_the_frame_ends():
    """Autobahn 6.4.3: one text frame sent in chops; the chop with the invalid bytes fails it."""
    body = '[null,"1","phoenix","heartbeat",{"s":"κόσμε'.encode() + b"\xf4\x90\x80\x80" + b'"}]'
    frame = masked(body)
    cut = len(frame) - len(body) + body.index(b"\xf4")
    _conn, transport = feed([frame[:cut]])
    assert not transport.closed                            # valid so far: waits for more
    _conn, transport = feed([frame[:cut], frame[cut:cut + 2]])
    assert close_code(transport.written) == 1007 and transport.closed


def test_a_text_frame_arriving_byte_by_byte_is_checked_and_delivered_whole():
    body = '[null,"1","phoenix","heartbeat",{"s":"€ 𝄞 ☃ é"}]'.encode()
    frame = masked(body)
    conn, transport = feed([frame[i:i + 1] for i in range(len(frame))])
    assert [m.payload for m in conn.messages] == [{"s": "€ 𝄞 ☃ é"}] and not transport.closed


def test_a_continuation_arriving_in_chops_goes_on_from_the_fragments_before_it():
    body = '[null,"1","phoenix","heartbeat",{"s":"€€"}]'.encode()
    cut = body.index("€".encode()) + 2                      # the first fragment ends mid-character
    second = masked(body[cut:], opcode=0)
    conn, transport = feed([masked(body[:cut], fin=False), second[:7], second[7:]])
    assert [m.payload for m in conn.messages] == [{"s": "€€"}] and not transport.closed
    bad = masked(b"\x41" + body[cut + 1:], opcode=0)        # not the continuation byte expected
    _conn, transport = feed([masked(body[:cut], fin=False), bad[:8]])
    assert close_code(transport.written) == 1007


def test_the_next_frame_is_not_checked_as_the_rest_of_the_last():
    """A frame checked while it arrived, then completed at the end of a read: the following
    frame, arriving in pieces from the buffer's start too, is checked from its own first byte."""
    first = masked('[null,"1","phoenix","heartbeat",{"s":"€"}]'.encode())
    cut = len(first) - len('€"}]'.encode()) + 1             # leaves the check inside the euro sign
    second = masked(b'[null,"2","phoenix","heartbeat",{"s":"abcdefghijklmnopqrstuvwxyz"}]')
    for chunks in ([first[:cut], first[cut:], second[:-3]],      # the next read starts with it
                   [first[:cut], first[cut:] + second[:-3]]):    # the same read completes the first
        conn, transport = feed(chunks)
        assert [m.payload for m in conn.messages] == [{"s": "€"}] and not transport.closed


def test_a_binary_frame_in_chops_is_not_checked_as_utf8():
    frame = masked(b"\xff\xfe\xfd" * 50, opcode=0x2)
    _conn, transport = feed([frame[:40], frame[40:80]])
    assert not transport.closed and close_code(transport.written) is None
