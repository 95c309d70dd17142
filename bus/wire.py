"""The internal bus protocol: the one place that knows how bus messages look.

Edges, workers and the broker all import this module; nothing else builds or
parses bus messages.  Code works with *logical frames*, a list of bytes whose
first item is a one-byte kind and whose routing fields follow, one per item.
Payloads are opaque bytes (JSON encoded once by their producer, or raw binary);
the broker routes by kind and destination and never parses a payload.

Point-to-point (DEALER -> broker ROUTER -> DEALER), logical frames::

    sent by a peer:      [kind, dest_id, *fields]
    delivered to dest:   [kind, sender_id, *fields]

The broker swaps ``dest_id`` for ``sender_id``; ``dest_id == b""`` on CONNECT
and JOIN asks the broker to place the request on the least-loaded worker.

Broadcasts (PUB -> broker XSUB/XPUB proxy -> SUB), logical frames::

    [topic_key, BROADCAST, event, origin, payload, fmt]

``origin`` is ``b""`` or ``edge_id + b"/" + conn_id`` (the channel that must
not receive its own ``broadcast_from``).

On the wire each logical message travels as ONE ZeroMQ frame (``pack`` /
``pack_broadcast``): every ZeroMQ frame costs a few microseconds per hop on
each side, and a routed message used to have nine.  The packed layout keeps
what the broker and libzmq need in front::

    point-to-point:  kind | len(peer) u8 | peer | fields
    broadcast:       topic_key | fields          (topic_key is a prefix, so
                                                  SUB filtering still works)
    fields:          count u8 | count-1 lengths u32le | bytes... (the last
                                                  field takes the rest)
"""
from __future__ import annotations

import os
import struct
from typing import NamedTuple

import orjson

# --- kinds --------------------------------------------------------------
# control, peer <-> broker
HEARTBEAT = b"h"        # peer->broker [HEARTBEAT, role, load]; broker->peer [HEARTBEAT, broker_instance]
BYE = b"q"              # peer->broker [BYE, role]: leaving cleanly
WORKER_DOWN = b"w"      # broker->edge, broker->worker [WORKER_DOWN, worker_id]
EDGE_DOWN = b"e"        # broker->worker [EDGE_DOWN, edge_id]
UNROUTABLE = b"u"       # broker->sender [UNROUTABLE, dest_id, kind, *fields]
EVICTED = b"v"          # broker->peer [EVICTED, b""]: you were declared dead; your peers
                        # dropped everything they shared with you, so drop it too

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
# After a broker restart (a new broker_instance): the worker's channels on that edge,
# (conn_id, topic, join_ref) triples packed into one frame, to settle messages the restart lost.
SYNC = b"Y"             # [SYNC, dest, channels]
# edge -> worker, back on the bus after a silence or with a new broker: every channel the edge
# has (joined or joining), packed like SYNC; the worker ends its instances of that edge not
# listed and answers with its SYNC.  A kind of its own, so each kind keeps one sender role.
EDGE_SYNC = b"Z"        # [EDGE_SYNC, dest, channels]

# edge -> edge: a LongPoll request that reached an edge other than the one holding its
# session (non-sticky load balancing), relayed to the holder, and the holder's answer
LP_REQUEST = b"P"       # [LP_REQUEST, dest, request_id, session_token, method, hold_ms, content_type, body]
LP_RESPONSE = b"R"      # [LP_RESPONSE, dest, request_id, http_status, body_json]

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
    CHANNEL_CLOSE: 5, CHANNEL_ERROR: 5, SYNC: 3, EDGE_SYNC: 3,
    LP_REQUEST: 8, LP_RESPONSE: 5,
}
EDGE_TO_WORKER = frozenset((CONNECT, JOIN, IN, LEAVE, TERMINATE, EDGE_SYNC))
WORKER_TO_EDGE = frozenset((CONNECT_REPLY, JOIN_REPLY, REPLY, PUSH, CHANNEL_CLOSE, CHANNEL_ERROR, SYNC))
EDGE_TO_EDGE = frozenset((LP_REQUEST, LP_RESPONSE))
# The role that may send each point-to-point kind: the broker drops the others, and an
# edge takes worker kinds only from a worker (routing ids begin with the role, new_peer_id).
SENDER_ROLE = {**{kind: ROLE_EDGE for kind in EDGE_TO_WORKER | EDGE_TO_EDGE},
               **{kind: ROLE_WORKER for kind in WORKER_TO_EDGE}}
BROADCAST_FRAMES = 6

# The largest message any bus socket accepts (ZeroMQ MAXMSGSIZE, `--max-bus-message`).
# libzmq reads a message's size before its body and closes the connection of a peer that
# announces a larger one, so one bus message never costs more memory than this.  Edges
# re-encode a client frame into an IN message (orjson may write a number up to ~4x longer:
# 1e15 -> 1000000000000000.0), hence the factor in edge_bus_message_need.
DEFAULT_MAX_BUS_MESSAGE = 16 * 1024 * 1024
ENVELOPE_OVERHEAD = 64 * 1024   # routing fields around a payload: ids, topic (<= 255 B), refs, event


def edge_bus_message_need(max_frame_size: int) -> int:
    """The bus message limit an edge with this client frame limit needs."""
    return 4 * max_frame_size + ENVELOPE_OVERHEAD


TOPIC_TERMINATOR = b"\x00"
# Topics of zchannels itself (zchannels:status); publishers from outside the workers
# (zchannels.Publisher, POST /api/broadcast) may not use them, or they could forge its data.
SYSTEM_TOPIC_PREFIX = "zchannels:"

# The system topic every edge and worker publishes a snapshot of itself on, once a second
# (edge/status.py, workers/status.py); the "zchannels:" prefix is reserved for the system.
STATUS_TOPIC = "zchannels:status"


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


# A client's ref or join_ref on the bus.  Phoenix echoes refs verbatim whatever their JSON
# type (phxsocket sends integers), so a non-string ref travels as its JSON text behind a
# marker byte; a plain string travels as its UTF-8 (the common case: phoenix.js), and null
# as the empty frame, a value phoenix.js never uses.
_JSON_REF = b"\x01"


def encode_ref(value) -> bytes:
    """A ref as decoded from a client frame (str, number, null, any JSON) -> bus bytes."""
    if value is None:
        return b""
    if type(value) is str and value and value[:1] != "\x01":
        return value.encode()
    return _JSON_REF + orjson.dumps(value)


def decode_ref(data: bytes):
    """Bus bytes -> the ref exactly as the client sent it (inverse of encode_ref)."""
    if data == b"":
        return None
    if data[:1] == _JSON_REF:
        try:
            return orjson.loads(data[1:])
        except orjson.JSONDecodeError:
            raise BusFrameError(f"ref marked JSON is not JSON: {data[:40]!r}") from None
    return data.decode()


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


# --- one constructor and one parser per kind ------------------------------------------
# A constructor returns the logical frames as sent, ``[kind, dest, *fields]``; the broker
# delivers them as ``[kind, sender, *fields]``, which the kind's parser checks (frame
# count) and names.  ``peer`` is the destination on the way in, the sender on the way out.
# Nothing outside this module writes an envelope as a list literal.

class Connect(NamedTuple):
    peer: bytes
    request_id: bytes       # the edge's id for this connect attempt
    request: bytes          # JSON: params, connect_info, transport


class Join(NamedTuple):
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes
    ref: bytes
    socket: bytes           # JSON: the socket's id and assigns
    payload: bytes          # JSON: the join's params


class In(NamedTuple):
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes
    ref: bytes
    event: bytes
    payload: bytes
    fmt: bytes


class Leave(NamedTuple):
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes
    ref: bytes


class Terminate(NamedTuple):
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes
    reason: bytes


class ConnectReply(NamedTuple):
    peer: bytes
    request_id: bytes
    status: bytes
    body: bytes


class JoinReply(NamedTuple):
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes
    ref: bytes
    status: bytes
    response: bytes
    intercept: bytes        # JSON list of the events the channel intercepts


class Reply(NamedTuple):
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes
    ref: bytes
    status: bytes
    response: bytes
    fmt: bytes


class Push(NamedTuple):
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes
    event: bytes
    payload: bytes
    fmt: bytes


class ChannelEnd(NamedTuple):   # CHANNEL_CLOSE and CHANNEL_ERROR
    peer: bytes
    conn_id: bytes
    topic: bytes
    join_ref: bytes


class ChannelList(NamedTuple):  # SYNC and EDGE_SYNC
    peer: bytes
    channels: set[tuple[bytes, bytes, bytes]]


class LpRequest(NamedTuple):
    peer: bytes
    request_id: bytes
    token: bytes
    method: bytes
    hold_ms: bytes
    content_type: bytes
    body: bytes


class LpResponse(NamedTuple):
    peer: bytes
    request_id: bytes
    status: bytes
    body: bytes


class Broadcast(NamedTuple):
    key: bytes              # topic_key(topic)
    event: bytes
    origin: bytes
    payload: bytes
    fmt: bytes


def connect(dest: bytes, request_id: bytes, request: bytes) -> list[bytes]:
    return [CONNECT, dest, request_id, request]


def join(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes, ref: bytes,
         socket: bytes, payload: bytes) -> list[bytes]:
    return [JOIN, dest, conn_id, topic, join_ref, ref, socket, payload]


def inbound(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes, ref: bytes,
            event: bytes, payload: bytes, fmt: bytes) -> list[bytes]:
    """IN: a client's message for its channel's worker."""
    return [IN, dest, conn_id, topic, join_ref, ref, event, payload, fmt]


def leave(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes, ref: bytes) -> list[bytes]:
    return [LEAVE, dest, conn_id, topic, join_ref, ref]


def terminate(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes,
              reason: bytes) -> list[bytes]:
    return [TERMINATE, dest, conn_id, topic, join_ref, reason]


def connect_reply(dest: bytes, request_id: bytes, status: bytes, body: bytes) -> list[bytes]:
    return [CONNECT_REPLY, dest, request_id, status, body]


def join_reply(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes, ref: bytes,
               status: bytes, response: bytes, intercept: bytes) -> list[bytes]:
    return [JOIN_REPLY, dest, conn_id, topic, join_ref, ref, status, response, intercept]


def reply(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes, ref: bytes,
          status: bytes, response: bytes, fmt: bytes) -> list[bytes]:
    return [REPLY, dest, conn_id, topic, join_ref, ref, status, response, fmt]


def push(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes, event: bytes,
         payload: bytes, fmt: bytes) -> list[bytes]:
    return [PUSH, dest, conn_id, topic, join_ref, event, payload, fmt]


def channel_close(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes) -> list[bytes]:
    return [CHANNEL_CLOSE, dest, conn_id, topic, join_ref]


def channel_error(dest: bytes, conn_id: bytes, topic: bytes, join_ref: bytes) -> list[bytes]:
    return [CHANNEL_ERROR, dest, conn_id, topic, join_ref]


def sync(dest: bytes, channels) -> list[bytes]:
    """SYNC: a worker's channels on one edge, (conn_id, topic, join_ref) triples."""
    return [SYNC, dest, pack_channel_list(channels)]


def edge_sync(dest: bytes, channels) -> list[bytes]:
    return [EDGE_SYNC, dest, pack_channel_list(channels)]


def lp_request(dest: bytes, request_id: bytes, token: bytes, method: bytes, hold_ms: bytes,
               content_type: bytes, body: bytes) -> list[bytes]:
    return [LP_REQUEST, dest, request_id, token, method, hold_ms, content_type, body]


def lp_response(dest: bytes, request_id: bytes, status: bytes, body: bytes) -> list[bytes]:
    return [LP_RESPONSE, dest, request_id, status, body]


def heartbeat(role: bytes, load: bytes | None = None) -> list[bytes]:
    """A peer's heartbeat to the broker, with its load (a worker's channel count) if any."""
    return [HEARTBEAT, role] if load is None else [HEARTBEAT, role, load]


def broker_heartbeat(instance: bytes) -> list[bytes]:
    """The broker's heartbeat to a peer: its instance id, new after each broker restart."""
    return [HEARTBEAT, instance]


def bye(role: bytes) -> list[bytes]:
    return [BYE, role]


def worker_down(worker_id: bytes) -> list[bytes]:
    return [WORKER_DOWN, worker_id]


def edge_down(edge_id: bytes) -> list[bytes]:
    return [EDGE_DOWN, edge_id]


def evicted() -> list[bytes]:
    return [EVICTED, b""]


def unroutable(dest: bytes, kind: bytes, fields: list[bytes]) -> list[bytes]:
    """The broker's answer to a message for a peer it does not know, with the message."""
    return [UNROUTABLE, dest, kind, *fields]


def _channel_list(frames: list[bytes]) -> ChannelList:
    return ChannelList(frames[1], unpack_channel_list(frames[2]))


_PARSERS = {
    CONNECT: lambda f: Connect._make(f[1:]),
    JOIN: lambda f: Join._make(f[1:]),
    IN: lambda f: In._make(f[1:]),
    LEAVE: lambda f: Leave._make(f[1:]),
    TERMINATE: lambda f: Terminate._make(f[1:]),
    CONNECT_REPLY: lambda f: ConnectReply._make(f[1:]),
    JOIN_REPLY: lambda f: JoinReply._make(f[1:]),
    REPLY: lambda f: Reply._make(f[1:]),
    PUSH: lambda f: Push._make(f[1:]),
    CHANNEL_CLOSE: lambda f: ChannelEnd._make(f[1:]),
    CHANNEL_ERROR: lambda f: ChannelEnd._make(f[1:]),
    SYNC: _channel_list,
    EDGE_SYNC: _channel_list,
    LP_REQUEST: lambda f: LpRequest._make(f[1:]),
    LP_RESPONSE: lambda f: LpResponse._make(f[1:]),
}


def parse(frames: list[bytes]):
    """A point-to-point message as delivered -> its kind's named tuple (``Reply``, ``Join``,
    ...; ``peer`` is the sender).  BusFrameError for an unknown kind, a wrong frame count or
    a malformed channel list."""
    return _PARSERS[check_frames(frames)](frames)


def parse_broadcast(frames: list[bytes]) -> Broadcast:
    """A broadcast as delivered -> Broadcast; BusFrameError for a malformed one.  Every edge
    runs it once per broadcast, so it checks the frames itself and builds the tuple with
    tuple.__new__ (the named tuple's own __new__ is a Python function, twice the cost)."""
    if len(frames) != BROADCAST_FRAMES or frames[1] != BROADCAST:
        raise BusFrameError(f"malformed broadcast ({len(frames)} frames)")
    key, _marker, event, origin, payload, fmt = frames
    if not key.endswith(TOPIC_TERMINATOR):
        raise BusFrameError("broadcast topic key without terminator")
    if fmt != JSON and fmt != BINARY:
        raise BusFrameError(f"unknown payload format {fmt[:8]!r}")
    return _tuple_new(Broadcast, (key, event, origin, payload, fmt))


_tuple_new = tuple.__new__


def broadcast_frames(topic: str, event: str, payload: bytes, fmt: bytes = JSON,
                     origin: bytes = b"") -> list[bytes]:
    return [topic_key(topic), BROADCAST, event.encode(), origin, payload, fmt]


def check_broadcast(frames: list[bytes]) -> None:
    """BusFrameError for a malformed broadcast (``parse_broadcast``'s checks)."""
    parse_broadcast(frames)


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


# --- one ZeroMQ frame per logical message ----------------------------------
_LENGTHS = [struct.Struct(f"<{n}I") for n in range(32)]


def pack_fields(fields: list[bytes]) -> bytes:
    n = len(fields)
    if n == 0:
        return b"\x00"
    head = _LENGTHS[n - 1].pack(*map(len, fields[:-1]))
    return b"".join((bytes((n,)), head, *fields))


def unpack_fields(data: bytes, offset: int = 0) -> list[bytes]:
    try:
        n = data[offset]
    except IndexError:
        raise BusFrameError("bus message without fields") from None
    if n == 0:
        return []
    if n > len(_LENGTHS):
        raise BusFrameError(f"bus message claims {n} fields")
    lengths = _LENGTHS[n - 1]
    pos = offset + 1 + lengths.size
    if pos > len(data):
        raise BusFrameError("bus message truncated in its field lengths")
    out = []
    for size in lengths.unpack_from(data, offset + 1):
        end = pos + size
        out.append(data[pos:end])
        pos = end
    if pos > len(data):
        raise BusFrameError("bus message shorter than its field lengths")
    out.append(data[pos:])
    return out


def pack(frames: list[bytes]) -> bytes:
    """Logical point-to-point frames -> one ZeroMQ frame."""
    kind, peer = frames[0], frames[1]
    return kind + bytes((len(peer),)) + peer + pack_fields(frames[2:])


def split_route(data: bytes) -> tuple[bytes, bytes, int]:
    """(kind, peer, offset of the fields) of a packed message: all the broker reads."""
    if len(data) < 2 or len(data) < 2 + data[1]:
        raise BusFrameError("bus message too short for its routing header")
    end = 2 + data[1]
    return data[:1], data[2:end], end


def readdress(data: bytes, peer: bytes, offset: int) -> bytes:
    """The same packed message with its peer field replaced (dest -> sender)."""
    return data[:1] + bytes((len(peer),)) + peer + data[offset:]


def unpack(data: bytes) -> list[bytes]:
    kind, peer, offset = split_route(data)
    return [kind, peer, *unpack_fields(data, offset)]


_FIELD_LENGTH = struct.Struct("<I")


def pack_channel_list(channels: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """SYNC's payload, one frame however many channels: (conn_id, topic, join_ref) triples,
    each field a 4-byte length and its bytes."""
    out = bytearray()
    for channel in channels:
        for field in channel:
            out += _FIELD_LENGTH.pack(len(field))
            out += field
    return bytes(out)


def unpack_channel_list(data: bytes) -> set[tuple[bytes, bytes, bytes]]:
    fields, pos, size = [], 0, len(data)
    while pos < size:
        if pos + 4 > size:
            raise BusFrameError("SYNC payload truncated in a field length")
        (length,) = _FIELD_LENGTH.unpack_from(data, pos)
        pos += 4
        if pos + length > size:
            raise BusFrameError("SYNC payload truncated in a field")
        fields.append(data[pos:pos + length])
        pos += length
    if len(fields) % 3:
        raise BusFrameError(f"SYNC payload has {len(fields)} fields, not (conn_id, topic, join_ref) triples")
    return {(fields[i], fields[i + 1], fields[i + 2]) for i in range(0, len(fields), 3)}


def pack_broadcast(frames: list[bytes]) -> bytes:
    return frames[0] + pack_fields(frames[1:])


def unpack_broadcast(data: bytes) -> list[bytes]:
    end = data.find(TOPIC_TERMINATOR) + 1
    if end == 0:
        raise BusFrameError("broadcast without a topic key")
    return [data[:end], *unpack_fields(data, end)]


# --- a message handed back ---------------------------------------------------------------
def parse_returned(frames: list[bytes]):
    """UNROUTABLE as delivered, ``[UNROUTABLE, dest, kind, *fields]`` -> the message the
    broker handed back, named by ``parse`` as if it had been delivered: its ``peer`` is the
    destination the broker did not know (``b""`` when it had no worker to place it on).
    BusFrameError for a notice too short to name a message, or a message its kind's parser
    refuses."""
    if len(frames) < 3 or frames[0] != UNROUTABLE:
        raise BusFrameError(f"UNROUTABLE needs at least 3 frames, got {len(frames)}")
    return parse([frames[2], frames[1], *frames[3:]])
