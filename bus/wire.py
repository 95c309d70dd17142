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

Once the destination is known (every message but a CONNECT or JOIN still to be placed, and
the LongPoll relay), point-to-point messages between edges and workers do not pass the
broker's Python loop: the sender publishes them to the destination's *inbox* through the
broker's C proxy, the way broadcasts travel, and each peer subscribes to its own inbox
(``pack_inbox`` / ``unpack_inbox``).  They arrive as the same logical frames
``[kind, sender_id, *fields]``; the sender names itself, as CURVE admits every peer alike.

Broadcasts (PUB -> broker XSUB/XPUB proxy -> SUB), logical frames::

    [topic_key, BROADCAST, event, origin, payload, fmt, position]

``origin`` is ``b""`` or ``edge_id + b"/" + conn_id`` (the channel that must
not receive its own ``broadcast_from``).  ``position`` is ``b""``, or
``"<epoch>:<offset>"`` on a topic that keeps history (set by the broker's
sequencer, broker/sequencer.py).  A broadcast for a topic with history goes to
the sequencer first, under ``SEQUENCER_PREFIX + topic_key``: a key no client
topic can start with, which only the sequencer subscribes to.

Each kind has one constructor here (``reply(...)``, ``join(...)``, ...), which
returns the frames as sent, and one named tuple (``Reply``, ``Join``, ...),
which ``parse`` returns for the frames as delivered.  The named tuples are the
one statement of each kind's fields and their order: ``FRAME_COUNTS``, which
every receiver checks, is derived from them.

On the wire each logical message travels as ONE ZeroMQ frame (``pack`` /
``pack_broadcast``): every ZeroMQ frame costs a few microseconds per hop on
each side, and a routed message used to have nine.  The packed layout keeps
what the broker and libzmq need in front::

    point-to-point:  kind | len(peer) u8 | peer | fields
    broadcast:       topic_key | fields          (topic_key is a prefix, so
                                                  SUB filtering still works)
    inbox:           0xFF '@' dest 0x00 | kind | len(sender) u8 | sender | fields
                                                 (0xFF never occurs in UTF-8, so no
                                                  topic key is a prefix of an inbox key)
    fields:          count u8 | count-1 lengths u32le | bytes... (the last
                                                  field takes the rest)
"""
from __future__ import annotations

import os
import struct
from typing import NamedTuple

import orjson

# --- kinds (their fields: the named tuples below) ------------------------
# control, peer <-> broker
HEARTBEAT = b"h"        # both ways: a peer's role and load; the broker's instance id
BYE = b"q"              # peer -> broker: leaving cleanly
WORKER_DOWN = b"w"      # broker -> edges and workers: a worker is gone
EDGE_DOWN = b"e"        # broker -> workers: an edge is gone
UNROUTABLE = b"u"       # broker -> sender: a message for a peer it does not know, handed back
EVICTED = b"v"          # broker -> peer: you were declared dead; your peers dropped
                        # everything they shared with you, so drop it too

# edge -> worker
CONNECT = b"C"
JOIN = b"J"
IN = b"I"               # a client's message for its channel
LEAVE = b"L"
TERMINATE = b"T"        # the edge dropped the channel (connection closed, duplicate join)

# worker -> edge
CONNECT_REPLY = b"c"
JOIN_REPLY = b"j"
REPLY = b"r"
PUSH = b"p"
CHANNEL_CLOSE = b"x"    # -> phx_close
CHANNEL_ERROR = b"!"    # -> phx_error
# After a broker restart (a new broker_instance): the worker's channels on that edge,
# (conn_id, topic, join_ref) triples packed into one frame, to settle messages the restart lost.
SYNC = b"Y"
# edge -> worker, back on the bus after a silence or with a new broker: every channel the edge
# has (joined or joining), packed like SYNC; the worker ends its instances of that edge not
# listed and answers with its SYNC.  A kind of its own, so each kind keeps one sender role.
EDGE_SYNC = b"Z"

# edge -> edge: a LongPoll request that reached an edge other than the one holding its
# session (non-sticky load balancing), relayed to the holder, and the holder's answer
LP_REQUEST = b"P"
LP_RESPONSE = b"R"

# pub/sub
BROADCAST = b"B"

# history (docs/recovery.md): reads answered by the broker itself, from its history store
HISTORY_READ = b"S"     # edge or worker -> broker: the stored broadcasts of a topic
HISTORY = b"s"          # broker -> the reader: the answer, in chunks under the bus message limit
APP_HISTORY = b"A"      # worker -> broker: the history rules its app declares

# payload formats
JSON = b"j"
BINARY = b"b"

# roles in HEARTBEAT / BYE
ROLE_EDGE = b"E"
ROLE_WORKER = b"W"

EDGE_TO_WORKER = frozenset((CONNECT, JOIN, IN, LEAVE, TERMINATE, EDGE_SYNC))
WORKER_TO_EDGE = frozenset((CONNECT_REPLY, JOIN_REPLY, REPLY, PUSH, CHANNEL_CLOSE, CHANNEL_ERROR, SYNC))
EDGE_TO_EDGE = frozenset((LP_REQUEST, LP_RESPONSE))
# The role that may send each point-to-point kind: the broker drops the others, and an
# edge takes worker kinds only from a worker (routing ids begin with the role, new_peer_id).
# The kinds a peer sends to a known destination's inbox, through the broker's C proxy; the
# others (heartbeats, placement, the LongPoll relay, the broker's notices) go through its
# ROUTER.  A CONNECT or JOIN with an empty destination asks the ROUTER for placement.
VIA_INBOX = frozenset(EDGE_TO_WORKER | WORKER_TO_EDGE)
SENDER_ROLE = {**{kind: ROLE_EDGE for kind in EDGE_TO_WORKER | EDGE_TO_EDGE},
               **{kind: ROLE_WORKER for kind in WORKER_TO_EDGE}}

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
# Keys of the broker's own pub/sub traffic.  0xFF never occurs in UTF-8, so no client topic's
# key (its UTF-8 and the terminator) starts with them, and no SUB of an edge matches them.
SEQUENCER_PREFIX = b"\xffS"    # a broadcast on its way to the sequencer: PREFIX + topic_key
RULES_KEY = b"\xffR"           # the broker's history rule table, once a second, for publishers
INBOX_PREFIX = b"\xff@"        # a peer's inbox: PREFIX + peer id + TOPIC_TERMINATOR
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
    """Validate the frame count of a message as delivered to a peer; return its kind
    (``parse`` does this and names the fields too)."""
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
# delivers them as ``[kind, sender, *fields]``, which ``parse`` checks (frame count) and
# names with the kind's named tuple.  ``peer`` is the destination on the way in, the sender
# on the way out.  Nothing outside this module writes an envelope as a list literal.

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
    fmt: bytes              # JSON or BINARY: how the payload is encoded


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
    reason: bytes           # for terminate ("closed", ...); "duplicate_join" skips terminate


class ConnectReply(NamedTuple):
    peer: bytes
    request_id: bytes
    status: bytes           # "ok" or "error"
    body: bytes             # JSON: the socket's assigns and id, or the refusal's reason


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
    token: bytes            # the LongPoll session token
    method: bytes
    hold_ms: bytes
    content_type: bytes
    body: bytes


class LpResponse(NamedTuple):
    peer: bytes
    request_id: bytes
    status: bytes           # the HTTP status, in decimal
    body: bytes             # JSON


# What the broker itself sends a peer.  A peer's HEARTBEAT and BYE to the broker have no
# parser: the broker reads their role and load from the packed bytes (split_route).

class BrokerHeartbeat(NamedTuple):
    instance: bytes         # the broker's id, new after each restart
    rules: bytes            # the history rule table (bus/history.py pack_rules)


class HistoryRead(NamedTuple):
    peer: bytes             # b"": the broker answers it itself
    request_id: bytes       # the reader's id for this read, echoed in each answer chunk
    topic: bytes
    after: bytes            # decimal: entries with a larger offset; b"": the last `limit` ones
    limit: bytes            # decimal: at most this many entries


class HistoryAnswer(NamedTuple):
    peer: bytes             # b"": from the broker
    request_id: bytes
    status: bytes           # HISTORY_OK, HISTORY_NONE (no rule), HISTORY_ERROR (the store failed)
    epoch: bytes
    first: bytes            # decimal: the oldest offset still kept (head + 1 when none is)
    head: bytes             # decimal: the topic's last offset when the read was answered
    more: bytes             # b"1" when another chunk of this answer follows
    entries: bytes          # pack_history_entries: (offset, packed BROADCAST) pairs, in order


class AppHistory(NamedTuple):
    peer: bytes             # b"": for the broker
    rules: bytes            # bus/history.py pack_rules


class PeerDown(NamedTuple):     # WORKER_DOWN and EDGE_DOWN
    peer: bytes             # the worker or edge that is gone


class Evicted(NamedTuple):
    peer: bytes             # b"": the notice concerns its receiver


class Unroutable(NamedTuple):
    dest: bytes             # the unknown peer; b"" when no worker came to place it on
    kind: bytes             # the message handed back: its kind ...
    fields: list[bytes]     # ... and its fields after the destination

    def message(self):
        """The message handed back, named by ``parse`` as if it had been delivered: its
        ``peer`` is the destination the broker did not know.  BusFrameError if its kind's
        parser refuses it."""
        return parse([self.kind, self.dest, *self.fields])


class Broadcast(NamedTuple):
    key: bytes              # topic_key(topic)
    event: bytes
    origin: bytes
    payload: bytes
    fmt: bytes
    position: bytes = b""   # "<epoch>:<offset>" on a topic with history, else b""


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


def broker_heartbeat(instance: bytes, rules: bytes = b"[]") -> list[bytes]:
    """The broker's heartbeat to a peer: its instance id, new after each broker restart, and
    its history rule table."""
    return [HEARTBEAT, instance, rules]


def history_read(request_id: bytes, topic: bytes, after: int | None, limit: int) -> list[bytes]:
    """HISTORY_READ: entries of ``topic`` with offset > ``after`` (None: the last ``limit``)."""
    return [HISTORY_READ, b"", request_id, topic, b"" if after is None else str(after).encode(),
            str(limit).encode()]


def history_answer(request_id: bytes, status: bytes, epoch: bytes, first: int, head: int,
                   more: bool, entries: bytes) -> list[bytes]:
    return [HISTORY, b"", request_id, status, epoch, str(first).encode(), str(head).encode(),
            b"1" if more else b"", entries]


def app_history(rules: bytes) -> list[bytes]:
    return [APP_HISTORY, b"", rules]


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


# kind -> the named tuple of its fields as delivered, for the kinds with a fixed frame count
_MESSAGES = {
    CONNECT: Connect, JOIN: Join, IN: In, LEAVE: Leave, TERMINATE: Terminate,
    CONNECT_REPLY: ConnectReply, JOIN_REPLY: JoinReply, REPLY: Reply, PUSH: Push,
    CHANNEL_CLOSE: ChannelEnd, CHANNEL_ERROR: ChannelEnd, SYNC: ChannelList, EDGE_SYNC: ChannelList,
    LP_REQUEST: LpRequest, LP_RESPONSE: LpResponse,
    HEARTBEAT: BrokerHeartbeat, WORKER_DOWN: PeerDown, EDGE_DOWN: PeerDown, EVICTED: Evicted,
    HISTORY_READ: HistoryRead, HISTORY: HistoryAnswer, APP_HISTORY: AppHistory,
}
# number of frames (kind included) each kind must have as delivered to a peer
FRAME_COUNTS = {kind: 1 + len(fields._fields) for kind, fields in _MESSAGES.items()}
UNROUTABLE_MIN_FRAMES = 3   # [UNROUTABLE, dest, kind, *fields]
BROADCAST_FRAMES = 1 + len(Broadcast._fields)   # its fields and the BROADCAST marker


def _wrong_count(frames: list[bytes], expected: int) -> BusFrameError:
    return BusFrameError(f"bus kind {frames[0]!r} needs {expected} frames, got {len(frames)}")


def _fixed_parser(fields: type):
    expected = 1 + len(fields._fields)
    new = tuple.__new__   # the count is checked: no need for the named tuple's own __new__

    def parse_fixed(frames: list[bytes]):
        if len(frames) != expected:
            raise _wrong_count(frames, expected)
        return new(fields, frames[1:])
    return parse_fixed


def _parse_channel_list(frames: list[bytes]) -> ChannelList:
    expected = FRAME_COUNTS[frames[0]]
    if len(frames) != expected:
        raise _wrong_count(frames, expected)
    return ChannelList(frames[1], unpack_channel_list(frames[2]))


def _parse_unroutable(frames: list[bytes]) -> Unroutable:
    if len(frames) < UNROUTABLE_MIN_FRAMES:
        raise BusFrameError(f"bus kind {UNROUTABLE!r} needs at least {UNROUTABLE_MIN_FRAMES} "
                            f"frames, got {len(frames)}")
    return Unroutable(frames[1], frames[2], frames[3:])


_PARSERS = {kind: _fixed_parser(fields) for kind, fields in _MESSAGES.items()}
_PARSERS.update({SYNC: _parse_channel_list, EDGE_SYNC: _parse_channel_list,
                 UNROUTABLE: _parse_unroutable})


def parse(frames: list[bytes]):
    """A point-to-point message as delivered to a peer -> its kind's named tuple (``Reply``,
    ``Join``, ...; ``peer`` is the sender).  BusFrameError for an empty message, an unknown
    kind, a wrong frame count or a malformed channel list."""
    try:
        parser = _PARSERS[frames[0]]
    except IndexError:
        raise BusFrameError("empty bus message") from None
    except KeyError:
        raise BusFrameError(f"unknown bus kind {frames[0][:8]!r}") from None
    return parser(frames)


def parse_broadcast(frames: list[bytes]) -> Broadcast:
    """A broadcast as delivered -> Broadcast; BusFrameError for a malformed one.  Every edge
    runs it once per broadcast, so it checks the frames itself and builds the tuple with
    tuple.__new__ (the named tuple's own __new__ is a Python function, twice the cost)."""
    n = len(frames)
    if n == BROADCAST_FRAMES:
        key, marker, event, origin, payload, fmt, position = frames
    elif n == BROADCAST_FRAMES - 1:    # from a publisher of a version before positions
        key, marker, event, origin, payload, fmt = frames
        position = b""
    else:
        raise BusFrameError(f"malformed broadcast ({n} frames)")
    if marker != BROADCAST:
        raise BusFrameError(f"malformed broadcast ({n} frames)")
    if not key.endswith(TOPIC_TERMINATOR):
        raise BusFrameError("broadcast topic key without terminator")
    if fmt != JSON and fmt != BINARY:
        raise BusFrameError(f"unknown payload format {fmt[:8]!r}")
    return _tuple_new(Broadcast, (key, event, origin, payload, fmt, position))


_tuple_new = tuple.__new__


def broadcast_frames(topic: str, event: str, payload: bytes, fmt: bytes = JSON,
                     origin: bytes = b"", position: bytes = b"") -> list[bytes]:
    return [topic_key(topic), BROADCAST, event.encode(), origin, payload, fmt, position]


def to_sequencer(frames: list[bytes]) -> list[bytes]:
    """The same broadcast, addressed to the broker's sequencer instead of its subscribers."""
    return [SEQUENCER_PREFIX + frames[0], *frames[1:]]


def sequenced(data: bytes, position: bytes) -> bytes:
    """A packed broadcast the sequencer received (its key without SEQUENCER_PREFIX) ->
    the packed broadcast for the subscribers, with ``position`` set; BusFrameError if
    malformed."""
    frames = unpack_broadcast(data)
    check_broadcast(frames)
    if len(frames) < BROADCAST_FRAMES:
        frames.append(position)
    else:
        frames[-1] = position
    return pack_broadcast(frames)


def rules_announcement(rules: bytes) -> bytes:
    """The broker's rule table as published on its XPUB under RULES_KEY (packed)."""
    return RULES_KEY + pack_fields([rules])


def parse_rules_announcement(data: bytes) -> bytes:
    if not data.startswith(RULES_KEY):
        raise BusFrameError("not a rule table announcement")
    fields = unpack_fields(data, len(RULES_KEY))
    if len(fields) != 1:
        raise BusFrameError("malformed rule table announcement")
    return fields[0]


_ENTRY_HEAD = struct.Struct("<QI")


def pack_history_entries(entries) -> bytes:
    """(offset, packed BROADCAST) pairs -> HISTORY's entries field."""
    out = bytearray()
    for offset, data in entries:
        out += _ENTRY_HEAD.pack(offset, len(data))
        out += data
    return bytes(out)


def history_entry_size(data: bytes) -> int:
    """What one entry adds to the entries field (for chunking under the bus message limit)."""
    return _ENTRY_HEAD.size + len(data)


def unpack_history_entries(data: bytes) -> list[tuple[int, bytes]]:
    out, pos, size = [], 0, len(data)
    while pos < size:
        if pos + _ENTRY_HEAD.size > size:
            raise BusFrameError("history entries truncated in an entry header")
        offset, length = _ENTRY_HEAD.unpack_from(data, pos)
        pos += _ENTRY_HEAD.size
        if pos + length > size:
            raise BusFrameError("history entries truncated in an entry")
        out.append((offset, data[pos:pos + length]))
        pos += length
    return out


# HISTORY's status
HISTORY_OK = b"ok"
HISTORY_NONE = b"none"      # no rule keeps this topic's history
HISTORY_ERROR = b"error"    # the store could not be read


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


def pack_length_prefixed(items) -> bytes:
    """Byte strings one after another, each behind its 4-byte little-endian length."""
    out = []
    for item in items:
        out.append(_FIELD_LENGTH.pack(len(item)))
        out.append(item)
    return b"".join(out)


def unpack_length_prefixed(data: bytes, pos: int, what: str) -> list[bytes]:
    """The byte strings of ``pack_length_prefixed`` from ``pos`` to the end of ``data``;
    BusFrameError naming ``what`` if they are truncated."""
    items, size = [], len(data)
    while pos < size:
        if pos + 4 > size:
            raise BusFrameError(f"{what} truncated in a length")
        (length,) = _FIELD_LENGTH.unpack_from(data, pos)
        pos += 4
        if pos + length > size:
            raise BusFrameError(f"{what} truncated in an item")
        items.append(data[pos:pos + length])
        pos += length
    return items


def pack_channel_list(channels: list[tuple[bytes, bytes, bytes]]) -> bytes:
    """SYNC's payload, one frame however many channels: (conn_id, topic, join_ref) triples,
    each field a 4-byte length and its bytes."""
    return pack_length_prefixed(field for channel in channels for field in channel)


def unpack_channel_list(data: bytes) -> set[tuple[bytes, bytes, bytes]]:
    fields = unpack_length_prefixed(data, 0, "SYNC payload")
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


INBOX_MARK = 0xFF


def inbox_key(peer_id: bytes) -> bytes:
    """The subscription key of a peer's inbox.  ValueError for an id no inbox can have."""
    if not peer_id or TOPIC_TERMINATOR in peer_id or len(peer_id) > 255:
        raise ValueError(f"peer id {peer_id[:60]!r} cannot name an inbox")
    return INBOX_PREFIX + peer_id + TOPIC_TERMINATOR


def pack_inbox(frames: list[bytes], sender: bytes) -> bytes:
    """Logical frames as sent ``[kind, dest, *fields]`` -> one ZeroMQ frame for dest's inbox,
    delivered as ``[kind, sender, *fields]``."""
    kind, dest = frames[0], frames[1]
    return (INBOX_PREFIX + dest + TOPIC_TERMINATOR + kind + bytes((len(sender),)) + sender
            + pack_fields(frames[2:]))


def is_inbox(data: bytes) -> bool:
    """Whether a ZeroMQ frame a peer's SUB received is an inbox message (else a broadcast)."""
    return data[:2] == INBOX_PREFIX


INBOX_BATCH = b"*"      # an inbox message holding several packed messages (bus/inbox.py)


def pack_inbox_batch(dest: bytes, parts: list[bytes]) -> bytes:
    """Several messages for one inbox in one ZeroMQ frame; each part is a ``pack``ed
    ``[kind, sender, *fields]``."""
    return INBOX_PREFIX + dest + TOPIC_TERMINATOR + INBOX_BATCH + pack_length_prefixed(parts)


def unpack_inbox(data: bytes) -> list[list[bytes]]:
    """An inbox message or batch -> the logical frames ``[kind, sender, *fields]`` of each of
    its messages, as ``unpack`` gives for one from the ROUTER.  BusFrameError if malformed."""
    start = data.find(TOPIC_TERMINATOR) + 1
    if start == 0 or data[:2] != INBOX_PREFIX:
        raise BusFrameError("inbox message without its key")
    if data[start:start + 1] != INBOX_BATCH:
        return [unpack(data[start:])]
    return [unpack(part) for part in unpack_length_prefixed(data, start + 1, "inbox batch")]


# --- a message handed back ---------------------------------------------------------------
