"""The Phoenix client wire format: the only place that knows how client frames look.

The edge decodes every client frame here into a `Message`, and builds every frame it
writes to a client here.  Three formats exist (docs/protocol.md §3):

* V1 JSON   - a JSON object ``{"topic", "event", "payload", "ref"}`` (``vsn=1.0.x``);
* V2 JSON   - a JSON array ``[join_ref, ref, topic, event, payload]`` (``vsn=2.0.x``);
* V2 binary - a kind byte, string lengths, the strings, then raw payload bytes.

Payloads arriving from workers are already encoded (JSON text or raw bytes, told
apart by ``fmt``), so the encoders splice them into the envelope and never parse
them: a broadcast is framed once and the same bytes go to every subscriber.
Pure functions, no I/O.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import orjson

JSON = b"j"     # payload bytes are JSON text (same values as bus.wire.JSON/BINARY)
BINARY = b"b"   # payload bytes are raw binary

# V2 binary kind bytes (docs/protocol.md §3.4).
KIND_PUSH = 0
KIND_REPLY = 1
KIND_BROADCAST = 2

_MAX_STR = 255  # every binary string field has a one-byte length


class DecodeError(ValueError):
    """A client frame that does not follow the wire format; the text says what is wrong."""


class EncodeError(ValueError):
    """A message that cannot be expressed in this wire format (e.g. binary on V1)."""


class Message(NamedTuple):
    """One decoded client frame.  Refs keep the JSON type the client gave them (phoenix.js
    sends strings, some clients integers): Phoenix echoes them verbatim."""
    join_ref: object
    ref: object
    topic: str
    event: str
    payload: object      # decoded JSON value, or `bytes` when `binary` is True
    binary: bool         # True when payload is raw bytes from a binary frame


# --- decoding helpers ---------------------------------------------------------

def _loads(data: str | bytes) -> object:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:  # also covers invalid UTF-8 and lone surrogates
        raise DecodeError(f"invalid JSON: {exc}") from None


def _type_name(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), "number")


def _text(field: str, value: object) -> str:
    if isinstance(value, str):
        return value
    raise DecodeError(f"{field} must be a string, got {_type_name(value)} {value!r}")


# --- encoding helpers ---------------------------------------------------------

_dumps = orjson.dumps


def _check_fmt(fmt: bytes) -> None:
    if fmt != JSON and fmt != BINARY:
        raise EncodeError(f"payload format must be b'j' or b'b', got {fmt!r}")


def _bstr(field: str, value) -> bytes:
    if value is None:
        raw = b""
    elif type(value) is str:
        raw = value.encode()
    else:   # a ref the client sent as a number: its JSON text, the nearest a binary frame has
        raw = _dumps(value)
    if len(raw) > _MAX_STR:
        raise EncodeError(f"{field} is {len(raw)} bytes in UTF-8; binary frames allow at most {_MAX_STR}")
    return raw


def _binary(kind: int, fields: list[tuple[str, str | None]], payload: bytes) -> bytes:
    parts = [_bstr(name, value) for name, value in fields]
    return bytes([kind, *map(len, parts)]) + b"".join(parts) + payload


# --- V1 JSON ------------------------------------------------------------------

class V1JSON:
    """Phoenix V1: JSON objects, no join_ref towards the client, no binary."""
    name = "v1"
    supports_binary = False

    def decode_text(self, data: str | bytes) -> Message:
        obj = _loads(data)
        if not isinstance(obj, dict):
            raise DecodeError(f"expected a JSON object with topic, event, payload and ref, "
                              f"got {_type_name(obj)}")
        missing = [k for k in ("topic", "event", "payload", "ref") if k not in obj]
        if missing:
            raise DecodeError(f"message is missing required key(s): {', '.join(missing)}")
        return Message(obj.get("join_ref"), obj["ref"],
                       _text("topic", obj["topic"]), _text("event", obj["event"]),
                       obj["payload"], False)

    def decode_binary(self, data: bytes) -> Message:
        # Phoenix's V1 serializer parses a binary frame's bytes as JSON too (phx-events sends
        # its JSON that way); V1 has no binary payloads, so this is the same message.
        return self.decode_text(bytes(data))

    def _obj(self, topic: str, event: str, payload: bytes, ref: str | None) -> bytes:
        return (b'{"topic":' + _dumps(topic) + b',"event":' + _dumps(event)
                + b',"payload":' + payload + b',"ref":' + _dumps(ref) + b"}")

    def _json_only(self, fmt: bytes) -> None:
        _check_fmt(fmt)
        if fmt == BINARY:
            raise EncodeError("binary payloads cannot be sent to a V1 client (vsn 1.0.x)")

    def encode_reply(self, join_ref, ref, topic, status: str, response: bytes,
                     fmt: bytes = JSON) -> tuple[bytes, bool]:
        self._json_only(fmt)
        body = b'{"status":' + _dumps(status) + b',"response":' + response + b"}"
        return self._obj(topic, "phx_reply", body, ref), False

    def encode_push(self, join_ref, topic, event, payload: bytes,
                    fmt: bytes = JSON) -> tuple[bytes, bool]:
        self._json_only(fmt)
        return self._obj(topic, event, payload, None), False

    def encode_broadcast(self, topic, event, payload: bytes, fmt: bytes = JSON,
                         ref: str | None = None) -> tuple[bytes, bool]:
        """``ref``: the broadcast's history position (docs/recovery.md), else null."""
        self._json_only(fmt)
        return self._obj(topic, event, payload, ref), False

    def encode_close(self, join_ref, topic) -> tuple[bytes, bool]:
        # Phoenix puts the join ref in the ref slot of phx_close/phx_error; V1 keeps only `ref`.
        return self._obj(topic, "phx_close", b"{}", join_ref), False

    def encode_error(self, join_ref, topic) -> tuple[bytes, bool]:
        return self._obj(topic, "phx_error", b'{"reason":"channel_crash"}', join_ref), False


# --- V2 JSON + binary -----------------------------------------------------------

class V2JSON:
    """Phoenix V2: five-element JSON arrays in text frames, kind-tagged binary frames."""
    name = "v2"
    supports_binary = True

    def decode_text(self, data: str | bytes) -> Message:
        arr = _loads(data)
        if not isinstance(arr, list):
            raise DecodeError(f"expected a JSON array [join_ref, ref, topic, event, payload], "
                              f"got {_type_name(arr)}")
        if len(arr) < 5:  # Phoenix ignores extra trailing elements, so only a minimum is checked
            raise DecodeError(f"expected a JSON array of 5 elements, got {len(arr)}")
        return Message(arr[0], arr[1], _text("topic", arr[2]), _text("event", arr[3]), arr[4], False)

    def decode_binary(self, data: bytes) -> Message:
        data = bytes(data)
        if not data:
            raise DecodeError("empty binary frame")
        if data[0] != KIND_PUSH:  # clients only ever send kind 0; 1 and 2 are server-only
            raise DecodeError(f"unknown binary frame kind {data[0]}; clients may only send kind 0 (push)")
        if len(data) < 5:
            raise DecodeError(f"binary push header needs 5 bytes, frame has {len(data)}")
        sizes = data[1:5]
        end = 5 + sum(sizes)
        if end > len(data):
            raise DecodeError(f"binary push declares {end - 5} bytes of strings, "
                              f"frame has only {len(data) - 5} after the header")
        fields, pos = [], 5
        for name, size in zip(("join_ref", "ref", "topic", "event"), sizes):
            try:
                fields.append(data[pos:pos + size].decode())
            except UnicodeDecodeError:
                raise DecodeError(f"binary push {name} is not valid UTF-8") from None
            pos += size
        join_ref, ref, topic, event = fields
        # A null join_ref is written as zero length (docs/protocol.md §3.4), so read it back as null.
        return Message(join_ref or None, ref, topic, event, data[end:], True)

    def encode_reply(self, join_ref, ref, topic, status: str, response: bytes,
                     fmt: bytes = JSON) -> tuple[bytes, bool]:
        _check_fmt(fmt)
        if fmt == BINARY:  # kind 1 carries the status where other kinds carry the event
            fields = [("join_ref", join_ref), ("ref", ref), ("topic", topic), ("status", status)]
            return _binary(KIND_REPLY, fields, response), True
        return (b"[" + _dumps(join_ref) + b"," + _dumps(ref) + b"," + _dumps(topic)
                + b',"phx_reply",{"status":' + _dumps(status) + b',"response":' + response
                + b"}]"), False

    def encode_push(self, join_ref, topic, event, payload: bytes,
                    fmt: bytes = JSON) -> tuple[bytes, bool]:
        _check_fmt(fmt)
        if fmt == BINARY:  # the server->client push has no ref byte, unlike the client's kind 0
            fields = [("join_ref", join_ref), ("topic", topic), ("event", event)]
            return _binary(KIND_PUSH, fields, payload), True
        return (b"[" + _dumps(join_ref) + b",null," + _dumps(topic) + b"," + _dumps(event)
                + b"," + payload + b"]"), False

    def encode_broadcast(self, topic, event, payload: bytes, fmt: bytes = JSON,
                         ref: str | None = None) -> tuple[bytes, bool]:
        """``ref``: the broadcast's history position in the ref slot (docs/recovery.md); the
        binary broadcast frame has no ref slot, so it carries none."""
        _check_fmt(fmt)
        if fmt == BINARY:
            return _binary(KIND_BROADCAST, [("topic", topic), ("event", event)], payload), True
        return (b"[null," + _dumps(ref) + b"," + _dumps(topic) + b"," + _dumps(event) + b"," + payload
                + b"]"), False

    def encode_close(self, join_ref, topic) -> tuple[bytes, bool]:
        j = _dumps(join_ref)
        return b"[" + j + b"," + j + b"," + _dumps(topic) + b',"phx_close",{}]', False

    def encode_error(self, join_ref, topic) -> tuple[bytes, bool]:
        j = _dumps(join_ref)
        return (b"[" + j + b"," + j + b"," + _dumps(topic)
                + b',"phx_error",{"reason":"channel_crash"}]'), False


V1 = V1JSON()
V2 = V2JSON()

# Elixir's Version grammar: MAJOR.MINOR.PATCH[-pre][+build], no leading zeros.
_VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
                      r"(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")


def serializer_for_vsn(vsn: str | None) -> V1JSON | V2JSON | None:
    """The serializer for a ``vsn`` query value, or None when the connection must be refused.

    Phoenix matches ``~> 1.0.0`` (V1) and ``~> 2.0.0`` (V2); an absent vsn means 1.0.0.
    """
    if vsn is None:
        return V1
    if not isinstance(vsn, str):
        return None
    m = _VERSION.fullmatch(vsn)
    if m is None:
        return None
    major, minor, patch, pre = int(m[1]), int(m[2]), int(m[3]), m[4]
    if minor != 0 or (patch == 0 and pre):  # X.0.0-pre sorts below X.0.0, outside ~> X.0.0
        return None
    return {1: V1, 2: V2}.get(major)
