"""The bus encoding (broker/wire.py) on its own."""
from __future__ import annotations

import pytest

from broker import wire


def test_sync_channel_list_round_trips_any_number_of_channels_and_rejects_garbage():
    channels = {(str(i).encode(), f"room:{i}".encode(), b"" if i % 7 == 0 else str(i * 3).encode())
                for i in range(1000)}
    assert wire.unpack_channel_list(wire.pack_channel_list(sorted(channels))) == channels
    assert wire.unpack_channel_list(wire.pack_channel_list([])) == set()
    for bad in (b"\x01", b"\x09\x00\x00\x00abc", wire.pack_channel_list([(b"1", b"t", b"2")])[:-1],
                wire.pack_channel_list([(b"1", b"t", b"2")]) + b"\x00\x00\x00\x00"):
        with pytest.raises(wire.BusFrameError):
            wire.unpack_channel_list(bad)
