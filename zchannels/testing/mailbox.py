"""What a channel test received and has not asserted yet: pushes, broadcasts and replies.

Like an ExUnit test process's mailbox: ``assert_push`` takes the first message that matches
and leaves the others for later assertions; a failed assertion lists what is still there.
Expected payloads are compared with ``==``, so ``unittest.mock.ANY`` (``zchannels.testing.ANY``)
matches any value, also inside dicts and lists.
"""
from __future__ import annotations

import reprlib
from typing import Any, NamedTuple
from unittest.mock import ANY

import orjson

from zchannels.bus import wire

SHOWN = 20                     # messages listed in a failure
_repr = reprlib.Repr()
_repr.maxstring, _repr.maxother, _repr.maxdict, _repr.maxlist, _repr.maxlevel = 120, 120, 12, 12, 6


def show(value: object) -> str:
    """A value for a failure message, cut to a readable length."""
    return _repr.repr(value)


def decode(data: bytes, fmt: bytes) -> Any:
    """A payload as the client gets it: decoded JSON, or bytes for a binary one."""
    return orjson.loads(data) if fmt == wire.JSON else data


class Message(NamedTuple):
    """A push to the client (direct, or a broadcast through the fastlane or handle_out), or a
    broadcast on a topic."""
    topic: str
    event: str
    payload: Any


class Mailbox:
    """Messages in arrival order; assertions take them out."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def add(self, message: Message) -> None:
        self.messages.append(message)

    def find(self, topic: str | None, event: str, payload: object = ANY, take: bool = False) -> Message | None:
        """The first message with this ``event`` (on ``topic``, unless None) whose payload
        equals ``payload``; removed from the mailbox if ``take``."""
        for i, message in enumerate(self.messages):
            if (topic is None or message.topic == topic) and message.event == event \
                    and payload == message.payload:
                if take:
                    del self.messages[i]
                return message
        return None

    def describe(self, topic: str | None = None, what: str = "messages") -> str:
        """The messages still here (on ``topic``), one per line, for a failure message."""
        here = [m for m in self.messages if topic is None or m.topic == topic]
        if not here:
            return f"no {what} received (or all already asserted)"
        lines = [f"{what} received and not yet asserted ({len(here)}):"]
        for m in here[:SHOWN]:
            where = "" if topic is not None else f"{m.topic} "
            lines.append(f"  {where}{m.event!r} {show(m.payload)}")
        if len(here) > SHOWN:
            lines.append(f"  ... and {len(here) - SHOWN} more")
        return "\n".join(lines)


class ReplyMessage(NamedTuple):
    """A ``phx_reply``: the answer to the client message with ``ref``."""
    ref: str
    status: str
    response: Any
