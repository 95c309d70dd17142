"""One LongPoll session: the transport a ``Connection`` writes through when the
client polls over HTTP instead of holding a WebSocket (docs/protocol.md §6).

A WebSocket writes each frame as it is produced; a LongPoll client fetches them,
so the session buffers every frame for the client as a ready-made JSON value and
hands the whole buffer to the next poll.  At most one poll waits at a time.  An
entry of the response's ``messages`` is a JSON string holding a text frame, or
``{"binary": "<base64>"}`` holding a V2 binary frame (reply, push or broadcast),
which is how phoenix.js 1.8.17 reads them (``longpoll.js`` ``decodeMessage``).
POST bodies come in here too and go, decoded, to the same ``Connection.handle``
a WebSocket frame goes to, so the channel rules exist once: a binary push
arrives as a base64 line and reaches its handler as it would over a WebSocket.

The session token names the edge holding the session, so any edge that gets a
request can relay it there (``edge/lphub.py``); the random secret in it is what
makes it unguessable.  Phoenix signs its token with a key all nodes share; here
only the holding edge checks the secret, so edges share no key.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import os
import re
import time
from typing import TYPE_CHECKING, NamedTuple

import orjson

from zchannels.edge import memtrim
from zchannels.edge.serializer import DecodeError, Message

if TYPE_CHECKING:
    from zchannels.edge.connection import Connection
    from zchannels.edge.lphub import LongPollHub

log = logging.getLogger(__name__)

FRAME_KIND = "longpoll"
MAX_LINES = 100               # Phoenix ignores the lines of a POST after the 100th
MAX_BUFFERED = 10_000         # frames waiting for a poll before the session is ended
NDJSON = "application/x-ndjson"

GONE = b'{"status":410}'
POSTED = b'{"status":200}'

# What woke a waiting poll.
_DATA, _SUPERSEDED, _EXPIRED, _ENDED = "data", "superseded", "expired", "ended"

_UNSENDABLE = object()   # prebuilt stand-in for a text frame that is not UTF-8

# "lp1." keeps the token apart from anything an app passes as its own `token` param (a
# Phoenix.Token also has three dot-separated parts, but starts with "SFMy").
_TOKEN = re.compile(r"lp1\.(E[A-Za-z0-9_-]{1,64})\.([0-9]{1,20})\.([A-Za-z0-9_-]{22})")


class SessionToken(NamedTuple):
    edge: bytes       # the bus id of the edge holding the session
    sid: str
    secret: str
    text: str


def make_token(edge_id: bytes, sid: str) -> SessionToken:
    secret = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    text = f"lp1.{edge_id.decode()}.{sid}.{secret}"
    return SessionToken(edge_id, sid, secret, text)


def parse_token(text: str | None) -> SessionToken | None:
    """A well-formed session token, or None (no token, or someone else's value)."""
    if not text:
        return None
    m = _TOKEN.fullmatch(text)
    if m is None:
        return None
    return SessionToken(m[1].encode(), m[2], m[3], text)


def decode_body(serializer, content_type: str, body: bytes, max_size: int) -> list[Message]:
    """A POST body -> messages, or DecodeError naming the bad line (docs/protocol.md §6.4).

    ``application/x-ndjson`` carries one frame per line: a text frame starts with ``[``,
    anything else is standard base64 of a binary frame.  Any other content type makes the
    whole body one text frame, as Phoenix does for older clients.  The whole body is
    decoded before anything is dispatched, so a bad line leaves the session untouched.
    """
    if content_type.split(";", 1)[0].strip().lower() == NDJSON:
        lines = body.split(b"\n", MAX_LINES)
        if len(lines) > MAX_LINES:
            lines.pop()   # the unsplit rest: lines after the 100th are ignored, like Phoenix
    else:
        lines = [body]
    messages = []
    for n, line in enumerate(lines, 1):
        line = line.removesuffix(b"\r")
        if not line:
            continue
        # V1 clients have no binary frames, and their JSON objects start with "{".
        if line[:1] == b"[" or not serializer.supports_binary:
            if len(line) > max_size:
                raise DecodeError(f"line {n} is {len(line)} bytes, more than the {max_size} allowed")
            try:
                messages.append(serializer.decode_text(line))
            except DecodeError as exc:
                raise DecodeError(f"line {n}: {exc}") from None
        else:
            messages.append(decode_binary_line(serializer, line, n, max_size))
    return messages


def decode_binary_line(serializer, line: bytes, n: int, max_size: int) -> Message:
    """Line `n` of a POST that is not a text frame: standard base64 (phoenix.js
    ``arrayBufferToBase64``) of a V2 binary push.  ``max_size`` bounds the decoded frame,
    so a binary push may be as large over LongPoll as over a WebSocket."""
    padding = 2 if line.endswith(b"==") else 1 if line.endswith(b"=") else 0
    size = (len(line) - padding) * 3 // 4
    if size > max_size:
        raise DecodeError(f"line {n} is a binary frame of {size} bytes, more than the "
                          f"{max_size} allowed")
    try:
        raw = base64.b64decode(line + b"=" * (-len(line) % 4), validate=True)
    except binascii.Error as exc:
        raise DecodeError(f"line {n} is neither a text frame (starting with '[') nor standard "
                          f"base64 of a binary frame ({exc}); it starts {line[:20]!r}") from None
    try:
        return serializer.decode_binary(raw)
    except DecodeError as exc:
        raise DecodeError(f"line {n} (base64 of a binary frame): {exc}") from None


class LongPollSession:
    """The transport object of one LongPoll ``Connection``; see the module docstring."""
    frame_kind = FRAME_KIND
    __slots__ = ("lp", "conn", "token", "token_json", "buffer", "buffered_bytes", "waiter",
                 "last_active", "started", "ended", "ending")

    def __init__(self, lp: "LongPollHub"):
        self.lp = lp
        self.conn: "Connection | None" = None
        self.token: SessionToken | None = None
        self.token_json = b'""'
        self.buffer: list[bytes] = []      # JSON values, ready to join into a response
        self.buffered_bytes = 0
        self.waiter: asyncio.Future | None = None
        self.last_active = self.started = time.monotonic()
        self.ended = False
        self.ending = False                # an end is scheduled: drop anything written meanwhile

    def attach(self, conn: "Connection", token: SessionToken) -> None:
        self.conn = conn
        self.token = token
        self.token_json = orjson.dumps(token.text)

    def owns(self, token: SessionToken) -> bool:
        return not self.ended and hmac.compare_digest(self.token.secret, token.secret)

    # --- the transport interface Connection and the fast lane write through ----------
    def prebuild(self, data: bytes, binary: bool) -> object:
        if binary:
            # phoenix.js 1.8.17 longpoll.js: `typeof(msg) === "string" ? msg :
            # base64ToArrayBuffer(msg.binary)`.  The base64 alphabet needs no JSON escaping.
            return b'{"binary":"' + base64.b64encode(data) + b'"}'
        try:
            return orjson.dumps(data.decode())
        except UnicodeDecodeError:
            log.warning("conn %s: frame is not UTF-8, not sent", self.conn.label)
            return _UNSENDABLE

    def send(self, data: bytes, binary: bool) -> None:
        self.send_prebuilt(self.prebuild(data, binary))

    def send_prebuilt(self, item) -> None:
        if self.ended or self.ending:
            return
        if item is _UNSENDABLE:
            self.lp.stats["not_utf8_dropped"] += 1
            return
        self.buffer.append(item)
        self.buffered_bytes += len(item)
        if len(self.buffer) > MAX_BUFFERED or self.buffered_bytes > self.lp.max_buffered_bytes:
            self.lp.hub.stats["slow_consumer_closes"] += 1
            log.info("conn %s: slow consumer, %d frames (%d bytes) not polled; ending the session",
                     self.conn.label, len(self.buffer), self.buffered_bytes)
            self.buffer.clear()
            # Not now: we may be deep inside Connection code that is still using its channels.
            self.ending = True
            asyncio.get_running_loop().call_soon(self.end, "slow consumer")
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(_DATA)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """The hub ends the connection (heartbeat timeout, shutdown): the next poll gets 410."""
        self.end(f"closed with {code} {reason}".rstrip())

    # --- requests ------------------------------------------------------------------------
    async def poll(self, window: float) -> bytes:
        """Answer a GET: what is buffered at once, else wait up to `window` for something."""
        self.touch()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(_SUPERSEDED)      # one poll per session: the older one gets 204
        if not self.buffer and not self.ended:
            loop = asyncio.get_running_loop()
            fut = self.waiter = loop.create_future()
            timer = loop.call_later(window, _settle, fut, _EXPIRED)
            try:
                outcome = await fut
            finally:
                timer.cancel()
                if self.waiter is fut:
                    self.waiter = None
                self.touch()
            if outcome == _SUPERSEDED:
                return self.body(204)
        if self.buffer:
            return self.flush()
        return GONE if self.ended else self.body(204)

    def post(self, content_type: str, body: bytes) -> tuple[int, bytes]:
        """Answer a POST: decode every line, then hand the messages to the connection in order."""
        self.touch()
        conn = self.conn
        try:
            messages = decode_body(conn.serializer, content_type, body, self.lp.hub.limits.max_frame_size)
        except DecodeError as exc:
            self.lp.stats["bad_posts"] += 1
            log.info("conn %s: malformed LongPoll POST (%s)", conn.label, exc)
            return 400, orjson.dumps({"status": 400, "error": str(exc)})
        for msg in messages:
            if conn.closed or self.ending:
                break
            conn.handle(msg)
        return 200, POSTED

    def body(self, status: int) -> bytes:
        return b'{"status":%d,"token":%s,"messages":[]}' % (status, self.token_json)

    def flush(self) -> bytes:
        messages = b",".join(self.buffer)
        self.buffer.clear()
        self.buffered_bytes = 0
        return b'{"status":200,"token":' + self.token_json + b',"messages":[' + messages + b"]}"

    def touch(self) -> None:
        self.last_active = time.monotonic()
        if self.conn is not None:
            self.conn.last_recv = self.last_active

    def idle_for(self, now: float) -> float:
        """Seconds without a poll; a poll being held counts as activity."""
        return 0.0 if self.waiter is not None else now - self.last_active

    # --- the end ---------------------------------------------------------------------------
    def end(self, why: str, terminate_reason: bytes = b"closed") -> None:
        """End the session: its channels terminate in their workers, a waiting poll returns."""
        if self.ended:
            return
        self.ended = True
        self.lp.forget(self)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(_ENDED)
        conn = self.conn
        log.info("longpoll session %s ended (%s) after %.0fs: conn %s", self.token.sid, why,
                 time.monotonic() - self.started, conn.label)
        if terminate_reason != b"closed":
            # Connection.on_transport_closed terminates with ("shutdown", "closed"); Phoenix
            # ends the channels of an abandoned LongPoll session with {:shutdown, :inactive}.
            conn.drop_channels(terminate_reason)
        conn.on_transport_closed()
        # The Connection's transport is this session: drop our side of the cycle so an ended
        # session's memory comes back without waiting for a garbage collection.  Frames still
        # buffered go to a poll held now, or to nobody (the next request gets 410).
        self.conn = None
        memtrim.freed(self.buffered_bytes)
        if self.waiter is None:
            self.buffer.clear()
            self.buffered_bytes = 0


def _settle(fut: asyncio.Future, outcome: str) -> None:
    if not fut.done():
        fut.set_result(outcome)
