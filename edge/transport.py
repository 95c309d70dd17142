"""What a ``Connection`` (edge/connection.py) needs of the two objects it is built from.

A connection speaks to its client through a *serializer*, which turns client frames into
``Message``s and Phoenix messages into frames (edge/serializer.py: ``V1``, ``V2``), and a
*transport*, which moves those frames: a WebSocket protocol (edge/wsproto.py, and
edge/wsdeflate.py's compressing one) or a LongPoll session (edge/lpsession.py).  Neither
knows the other; the connection and the fast lane (edge/fastlane.py) hold one of each.

These are structural types (``typing.Protocol``): nothing inherits from them, a class that
has the members fits.
"""
from __future__ import annotations

from typing import Any, Protocol

from zchannels.edge.serializer import Message


class Serializer(Protocol):
    """One Phoenix wire format (V1 JSON, V2 JSON + binary).  Every encoder returns
    ``(frame bytes, binary)``: whether the frame must travel as a binary one.  Payloads are
    already encoded (``fmt`` says JSON text or raw bytes) and spliced in, never parsed."""

    name: str                 # for log lines: "v1", "v2"
    supports_binary: bool     # whether clients of this format send and get binary frames

    def decode_text(self, data: str | bytes) -> Message:
        """A text frame -> Message; DecodeError (a ValueError) saying what is wrong."""

    def decode_binary(self, data: bytes) -> Message:
        """A binary frame -> Message; DecodeError saying what is wrong."""

    def encode_reply(self, join_ref: object, ref: object, topic: str, status: str,
                     response: bytes, fmt: bytes = ...) -> tuple[bytes, bool]:
        """phx_reply; EncodeError (a ValueError) for what the format cannot carry."""

    def encode_push(self, join_ref: object, topic: str, event: str, payload: bytes,
                    fmt: bytes = ...) -> tuple[bytes, bool]:
        """A channel's push to its own client."""

    def encode_broadcast(self, topic: str, event: str, payload: bytes,
                         fmt: bytes = ...) -> tuple[bytes, bool]:
        """A broadcast: no join_ref, so the same frame fits every subscriber."""

    def encode_close(self, join_ref: object, topic: str) -> tuple[bytes, bool]:
        """phx_close of one channel instance."""

    def encode_error(self, join_ref: object, topic: str) -> tuple[bytes, bool]:
        """phx_error of one channel instance."""


class Transport(Protocol):
    """How a connection's frames reach its client.  ``send`` frames and writes one message;
    the fast lane builds a broadcast's frame once per kind of transport (``prebuild``) and
    writes it to every subscriber (``send_prebuilt``).  Writes never block and never fail:
    a transport that cannot take more ends the connection itself (slow consumer)."""

    # Transports whose prebuilt frames are alike share one kind ("ws", "ws-deflate",
    # "longpoll"): the fast lane builds one frame per (serializer, frame_kind).
    frame_kind: str

    # A prebuilt frame is opaque (WebSocket frame bytes, a LongPoll JSON value): only a
    # transport of the same frame_kind takes it, hence Any rather than one type for all.
    def prebuild(self, data: bytes, binary: bool) -> Any:
        """The message framed for this kind of transport, to hand to ``send_prebuilt``."""

    def send(self, data: bytes, binary: bool) -> None:
        """Frame and write one message (``send_prebuilt(prebuild(data, binary))``)."""

    def send_prebuilt(self, frame: Any) -> None:
        """Write a frame ``prebuild`` made; dropped once the transport is closing."""

    def close(self, code: int = ..., reason: str = ...) -> None:
        """End the connection from the server side: a WebSocket close frame with ``code``,
        or a LongPoll session ended (its next request gets 410)."""
