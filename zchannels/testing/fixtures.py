"""``channel_app``: a pytest fixture of a ChannelTest, one fresh worker per test."""
from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from zchannels.workers.api import Socket
from zchannels.testing.harness import DEFAULT_TIMEOUT, ChannelTest


def channel_app(app: str | os.PathLike[str] | Socket, *, timeout: float = DEFAULT_TIMEOUT,
                autojump: bool = True) -> Any:
    """A pytest fixture giving each test a ``ChannelTest`` of ``app``, closed after it.

    The fixture takes the name it is assigned to, in a test module or a conftest.py::

        channels = channel_app(Path(__file__).parent / "channels.py")

        def test_lobby(channels):
            ...

    ``app``, ``timeout`` and ``autojump`` are ChannelTest's.  A file path is loaded afresh
    for every test, so module-level state and settings read at import (environment
    variables set with ``monkeypatch`` first, say) start clean each time.
    """
    import pytest   # only when a fixture is made: zchannels.testing itself does not need pytest

    @pytest.fixture
    def fixture() -> Iterator[ChannelTest]:
        with ChannelTest(app, timeout=timeout, autojump=autojump) as channels:
            yield channels

    return fixture
