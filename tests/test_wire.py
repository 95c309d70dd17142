"""The bus encoding (bus/wire.py) on its own."""
from __future__ import annotations

import pytest

from bus import wire


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
