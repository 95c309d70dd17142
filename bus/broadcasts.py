"""What a broadcast must be before it goes on the bus, whoever publishes it.

Three kinds of code publish: handlers in a worker (``workers.broadcast``,
``Channel.broadcast``), Python processes outside the workers (``zchannels.Publisher``) and
HTTP callers (POST /api/broadcast on an edge, edge/publish_api.py).  They all check here, and
each tells its own users what is wrong in its own way: ``check`` returns a ``Problem``, a
value, which Python callers raise (``Problem.exception``, or ``encode`` does it for them) and
the HTTP endpoint answers with a 400.

A topic goes on the bus as a topic key ending in NUL (``wire.topic_key``): a NUL inside it
would end the key early, and the message would reach the subscribers of another topic.
Events may not carry one either.  Topics starting with ``zchannels:`` belong to zchannels
itself (``zchannels:status``): a publisher from outside (``outside=True``) may not use them,
or it could forge that data; code running in the workers is trusted with them.  Payloads are
what a server may send a client (docs/protocol.md §5.5): a JSON object, or bytes for a binary
frame.  Topics and events have no length limit here (a topic longer than 255 bytes can never
be joined, so nobody receives it).
"""
from __future__ import annotations

from typing import NamedTuple

import orjson

from zchannels.bus import wire

NUL = wire.TOPIC_TERMINATOR.decode()
PAYLOAD_TYPES = (dict, bytes, bytearray, memoryview)
_SYSTEM = wire.SYSTEM_TOPIC_PREFIX
_JSON, _BINARY = wire.JSON, wire.BINARY


class Problem(NamedTuple):
    """Why a broadcast cannot be published."""
    field: str                  # "topic", "event" or "payload"
    text: str                   # what is wrong, starting with the field's name
    value: object               # the value received
    error: type[Exception]      # TypeError for a wrong type, ValueError for a wrong value

    def exception(self, what: str = "broadcast") -> Exception:
        """The exception a Python caller raises, e.g. ``TypeError("broadcast event must be a
        non-empty string, got ''")``; ``what`` names the call (``broadcast_from``, ``push``)."""
        got = type(self.value).__name__ if self.field == "payload" else repr(self.value)
        return self.error(f"{what} {self.text}, got {got}")


def check(topic: object, event: object, payload: object, outside: bool = False) -> Problem | None:
    """The first problem of a broadcast, or None when it can be published.  ``outside``: the
    publisher is not part of zchannels (a Publisher, an HTTP caller), so the system topics
    are not for it."""
    if not isinstance(topic, str) or not topic:
        return Problem("topic", "topic must be a non-empty string", topic, TypeError)
    if NUL in topic:
        return Problem("topic", "topic must not contain NUL (it ends topic keys)", topic, ValueError)
    if outside and topic.startswith(_SYSTEM):
        return Problem("topic", f"topics starting with {_SYSTEM!r} are reserved for zchannels "
                                "itself", topic, ValueError)
    if not isinstance(event, str) or not event:
        return Problem("event", "event must be a non-empty string", event, TypeError)
    if NUL in event:
        return Problem("event", "event must not contain NUL", event, ValueError)
    if not isinstance(payload, PAYLOAD_TYPES):
        return _payload_problem(payload)
    return None


def _payload_problem(payload: object) -> Problem:
    return Problem("payload", "payload must be a dict (JSON object) or bytes", payload, TypeError)


def encode(topic: object, event: object, payload: object, outside: bool = False,
           what: str = "broadcast") -> tuple[bytes, bytes]:
    """(payload bytes, format) of a broadcast that passes ``check``: a dict as JSON
    (``wire.JSON``), bytes as they are (``wire.BINARY``).  Otherwise its problem is raised
    (TypeError or ValueError), the message naming the call ``what``; orjson's error (a
    TypeError too) for a dict that JSON cannot hold."""
    problem = check(topic, event, payload, outside)
    if problem is not None:
        raise problem.exception(what)
    if isinstance(payload, dict):
        return orjson.dumps(payload), _JSON
    return bytes(payload), _BINARY   # type: ignore[arg-type]


def encode_payload(payload: object, what: str = "push") -> tuple[bytes, bytes]:
    """``encode``'s payload part alone, for a push to one client (the same payloads)."""
    if isinstance(payload, dict):
        return orjson.dumps(payload), _JSON
    if isinstance(payload, PAYLOAD_TYPES):
        return bytes(payload), _BINARY   # type: ignore[arg-type]
    raise _payload_problem(payload).exception(what)
