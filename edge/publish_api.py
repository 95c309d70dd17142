"""POST /api/broadcast: publish to channel topics over HTTP, from any language or a shell.

The same broadcasts a worker sends (``bus/wire.py`` BROADCAST), published through the
edge's own PUB socket to the broker, so they reach subscribers on every edge.  Off unless an
API key is configured (``--api-key`` or ``ZCHANNELS_API_KEY``): then the route answers 404.

    POST /api/broadcast
    Authorization: Bearer KEY
    {"topic": "room:lobby", "event": "new_msg", "payload": {"body": "hi"}}   (or a JSON array
                                                                              of up to 1000)
    -> 202 {"accepted": n} | 400 / 401 / 404 / 503 {"error": "..."}

The API key is checked from the headers before any of the body is read (the body streams
in, ``@stream_request_body``), so a caller without the key gets its 401 at once and the edge
holds none of its bytes; ``--max-api-body`` bounds the body (413, ``edge/httplimits.py``).
A body is checked whole before anything is published (like a LongPoll POST), each item with
the checks every publisher shares (bus/broadcasts.py), so a 400 means nothing was sent.  503: the broker has been silent for 5 s, or the bus send queue is full
(then ``accepted`` says how many of a batch went out).  Delivery is at most once, like every
broadcast.
"""
from __future__ import annotations

import hmac
import logging

import orjson
from tornado import web

from zchannels.bus import broadcasts, wire
from zchannels.bus.timing import BROKER_SILENCE_LIMIT

log = logging.getLogger("edge")

PATH = r"/api/broadcast"
MAX_BATCH = 1000
_FIELDS = ("topic", "event", "payload")


class BadRequest(ValueError):
    """A body that cannot be published; the text goes back to the caller."""


def parse_broadcasts(body: bytes) -> list[list[bytes]]:
    """The bus frames of a request body, or BadRequest naming what is wrong and where."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(doc, list):
        return [_frames(doc, "")]
    if not doc:
        raise BadRequest("empty batch: send an object {topic, event, payload} or a non-empty array of them")
    if len(doc) > MAX_BATCH:
        raise BadRequest(f"batch of {len(doc)} items; at most {MAX_BATCH} per request")
    return [_frames(item, f"item {i}: ") for i, item in enumerate(doc)]


def _frames(item: object, where: str) -> list[bytes]:
    if not isinstance(item, dict):
        raise BadRequest(f"{where}expected an object {{topic, event, payload}}, got {_kind(item)}")
    missing = [k for k in _FIELDS if k not in item]
    if missing:
        raise BadRequest(f"{where}missing field(s): {', '.join(missing)}")
    topic, event, payload = item["topic"], item["event"], item["payload"]
    problem = broadcasts.check(topic, event, payload, outside=True)
    if problem is None:
        return wire.broadcast_frames(topic, event, orjson.dumps(payload))
    if problem.field == "payload":
        # JSON cannot carry bytes, so over HTTP a broadcast payload is a JSON object
        # (docs/protocol.md §5.5); a dict is all the checks let through from a JSON body.
        raise BadRequest(f"{where}payload must be a JSON object, got {_kind(payload)}")
    raise BadRequest(f"{where}{problem.text}, got {_show(problem.value)}")


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    return orjson.dumps(value).decode()[:80]


@web.stream_request_body
class BroadcastHandler(web.RequestHandler):
    """POST /api/broadcast on one edge; ``api_key`` None = the endpoint is off (404)."""

    def initialize(self, hub, api_key: str | None, refused) -> None:
        self.hub = hub
        self.api_key = api_key.encode() if api_key else None
        self.refused = refused
        self._chunks: list[bytes] = []

    def prepare(self) -> None:
        if self.api_key is None:
            self._answer(404, {"error": "HTTP publishing is off: start the edge with --api-key or "
                                        "ZCHANNELS_API_KEY to enable POST /api/broadcast"})
            return
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            self.set_header("WWW-Authenticate", 'Bearer realm="zchannels"')
            self.refused("api_key_refusals", "refused %s: %s /api/broadcast with a missing or "
                         "wrong API key; 401 before its body", self.request.remote_ip,
                         self.request.method)
            self._answer(401, {"error": "missing or wrong API key: send the header "
                                        "'Authorization: Bearer KEY'"})

    def data_received(self, chunk: bytes) -> None:
        self._chunks.append(chunk)   # bounded by --max-api-body in edge/httplimits.py

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._chunks = []

    def post(self) -> None:
        body = b"".join(self._chunks)
        self._chunks = []
        try:
            batch = parse_broadcasts(body)
        except BadRequest as exc:
            return self._answer(400, {"error": str(exc)})
        bus = self.hub.bus
        if bus.broker_silent:
            return self._answer(503, {"error": f"bus unreachable: no word from the broker for more "
                                               f"than {BROKER_SILENCE_LIMIT:g} s; nothing was "
                                               f"published", "accepted": 0})
        for n, frames in enumerate(batch):
            if not bus.send_broadcast(frames):
                return self._answer(503, {"error": "bus send queue full; the rest of the batch was "
                                                   "not published", "accepted": n})
        self._answer(202, {"accepted": len(batch)})

    def _answer(self, status: int, body: dict) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(orjson.dumps(body))
