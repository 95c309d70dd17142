"""The internal bus protocol: the one place that knows how frames look.

Edges, workers and the broker all import this module; nothing else builds or
parses bus frames.  Every envelope is a ZeroMQ multipart message whose first
frame is a one-byte *kind*.  Routing fields follow, one per frame, so the
broker routes by reading two frames and never parses a payload.  Payloads are
opaque bytes (JSON encoded once by their producer, or raw binary).

Point-to-point (DEALER -> broker ROUTER -> DEALER)::

    sent by a peer:      [kind, dest_id, *fields]
    delivered to dest:   [kind, sender_id, *fields]

The broker swaps ``dest_id`` for ``sender_id``; ``dest_id == b""`` on CONNECT
and JOIN asks the broker to place the request on the least-loaded worker.

Broadcasts (PUB -> broker XSUB/XPUB proxy -> SUB)::

    [topic_key, BROADCAST, event, origin, payload, fmt]

``origin`` is ``b""`` or ``edge_id + b"/" + conn_id`` (the channel that must
not receive its own ``broadcast_from``).
"""
from __future__ import annotations

import os

# --- kinds --------------------------------------------------------------
# control, peer <-> broker
HEARTBEAT = b"h"        # peer->broker [HEARTBEAT, role, load]; broker->peer [HEARTBEAT, b""]
BYE = b"q"              # peer->broker [BYE, role]: leaving cleanly
WORKER_DOWN = b"w"      # broker->edge [WORKER_DOWN, worker_id]
EDGE_DOWN = b"e"        # broker->worker [EDGE_DOWN, edge_id]
UNROUTABLE = b"u"       # broker->sender [UNROUTABLE, dest_id, kind, *fields]

# edge -> worker
CONNECT = b"C"          # [CONNECT, dest, conn_id, request_json]
JOIN = b"J"             # [JOIN, dest, conn_id, topic, join_ref, ref, socket_json, payload]
IN = b"I"               # [IN, dest, conn_id, topic, join_ref, ref, event, payload, fmt]
LEAVE = b"L"            # [LEAVE, dest, conn_id, topic, join_ref, ref]
TERMINATE = b"T"        # [TERMINATE, dest, conn_id, topic, join_ref, reason]

# worker -> edge
CONNECT_REPLY = b"c"    # [CONNECT_REPLY, dest, conn_id, status, body_json]
JOIN_REPLY = b"j"       # [JOIN_REPLY, dest, conn_id, topic, join_ref, ref, status, response_json, intercept_json]
REPLY = b"r"            # [REPLY, dest, conn_id, topic, join_ref, ref, status, response, fmt]
PUSH = b"p"             # [PUSH, dest, conn_id, topic, join_ref, event, payload, fmt]
CHANNEL_CLOSE = b"x"    # [CHANNEL_CLOSE, dest, conn_id, topic, join_ref]  -> phx_close
CHANNEL_ERROR = b"!"    # [CHANNEL_ERROR, dest, conn_id, topic, join_ref]  -> phx_error

# pub/sub
BROADCAST = b"B"        # [topic_key, BROADCAST, event, origin, payload, fmt]

# payload formats
JSON = b"j"
BINARY = b"b"

# roles in HEARTBEAT / BYE
ROLE_EDGE = b"E"
ROLE_WORKER = b"W"

# number of frames (kind included) each point-to-point kind must have
FRAME_COUNTS = {
    CONNECT: 4, JOIN: 8, IN: 9, LEAVE: 6, TERMINATE: 6,
    CONNECT_REPLY: 5, JOIN_REPLY: 9, REPLY: 9, PUSH: 8,
    CHANNEL_CLOSE: 5, CHANNEL_ERROR: 5,
}
EDGE_TO_WORKER = frozenset((CONNECT, JOIN, IN, LEAVE, TERMINATE))
WORKER_TO_EDGE = frozenset((CONNECT_REPLY, JOIN_REPLY, REPLY, PUSH, CHANNEL_CLOSE, CHANNEL_ERROR))
BROADCAST_FRAMES = 6

TOPIC_TERMINATOR = b"\x00"


class BusFrameError(ValueError):
    """A bus message that does not have the shape its kind requires."""


def topic_key(topic: str) -> bytes:
    """The exact-match subscription key of a topic (ZeroMQ filters by prefix)."""
    return topic.encode() + TOPIC_TERMINATOR


def topic_from_key(key: bytes) -> str:
    if not key.endswith(TOPIC_TERMINATOR):
        raise BusFrameError(f"topic key without terminator: {key[:60]!r}")
    return key[:-1].decode()


def new_peer_id(role: bytes, label: str = "") -> bytes:
    """A routing id unique across restarts: role, optional label, random suffix."""
    suffix = os.urandom(4).hex()
    return role + (label.encode() + b"-" if label else b"-") + suffix.encode()


def origin_of(edge_id: bytes, conn_id: bytes) -> bytes:
    return edge_id + b"/" + conn_id


def check_frames(frames: list[bytes]) -> bytes:
    """Validate a point-to-point message as delivered to a peer; return its kind."""
    if not frames:
        raise BusFrameError("empty bus message")
    kind = frames[0]
    expected = FRAME_COUNTS.get(kind)
    if expected is None:
        raise BusFrameError(f"unknown bus kind {kind[:8]!r}")
    if len(frames) != expected:
        raise BusFrameError(f"bus kind {kind!r} needs {expected} frames, got {len(frames)}")
    return kind


def broadcast_frames(topic: str, event: str, payload: bytes, fmt: bytes = JSON,
                     origin: bytes = b"") -> list[bytes]:
    return [topic_key(topic), BROADCAST, event.encode(), origin, payload, fmt]


def check_broadcast(frames: list[bytes]) -> None:
    if len(frames) != BROADCAST_FRAMES or frames[1] != BROADCAST:
        raise BusFrameError(f"malformed broadcast ({len(frames)} frames)")
    if not frames[0].endswith(TOPIC_TERMINATOR):
        raise BusFrameError("broadcast topic key without terminator")
    if frames[5] not in (JSON, BINARY):
        raise BusFrameError(f"unknown payload format {frames[5][:8]!r}")


def bus_endpoints(base: str) -> tuple[str, str, str]:
    """``tcp://host:P`` -> (router, publish-in, subscribe-out) on P, P+1, P+2."""
    scheme, sep, rest = base.partition("://")
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isdigit():
        raise ValueError(f"--bus must look like tcp://HOST:PORT, got {base!r}")
    p = int(port)
    if not 0 < p < 65534:
        raise ValueError(f"--bus port must be between 1 and 65533, got {p}")
    return tuple(f"tcp://{host}:{p + i}" for i in range(3))  # type: ignore[return-value]
