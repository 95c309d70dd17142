"""The client side of a channel test: a connection (``ClientSocket``) and its joined channels
(``ClientChannel``), with Phoenix.ChannelTest's pushes, replies and assertions.

Each call turns into the bus message an edge would send the worker (wire.join, wire.inbound,
wire.leave, wire.terminate), delivered in-process by the ChannelTest (harness.py), which
also routes what the worker sends back here.  Assertions run the worker's event loop until
the expected message arrives or the timeout passes (in loop time: see clock.py).
"""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Literal
from unittest.mock import ANY

import orjson

from zchannels.bus import wire
from zchannels.workers.api import Channel
from zchannels.workers.channels import CLOSED, ChannelProc
from zchannels.workers.payload import JSON, JSONObject, Payload
from zchannels.testing.mailbox import Mailbox, Message, ReplyMessage, decode, show

if TYPE_CHECKING:
    from zchannels.testing.harness import ChannelTest

END_TIMEOUT = 5.0   # seconds of loop time for a channel's end (its terminate), like Phoenix's close/2

ChannelState = Literal["joining", "joined", "refused", "closed", "crashed", "terminated"]


class ConnectRefused(AssertionError):
    """The app's ``connect`` refused the connection; ``reason`` is what the client is told."""

    def __init__(self, reason: str):
        super().__init__(f"connect refused: {reason}")
        self.reason = reason


class JoinRefused(AssertionError):
    """``join`` returned ``error(...)`` (or crashed, or no route matched the topic);
    ``response`` is the error reply the client gets."""

    def __init__(self, topic: str, response: JSONObject):
        super().__init__(f"join of {topic!r} refused: {show(response)}")
        self.topic = topic
        self.response = response


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


class ClientSocket:
    """One client connection, as after ``connect`` (``ChannelTest.connect`` or ``.socket``).

    ``assigns`` and ``id`` are what ``connect`` (and ``@socket.id``) gave it; each join
    hands the channel a copy of the assigns, as the edge does."""

    def __init__(self, harness: "ChannelTest", conn_id: bytes, assigns: JSONObject, id: str | None):
        self.harness = harness
        self.conn_id = conn_id
        self.assigns = assigns
        self.id = id
        self.socket_json = orjson.dumps({"assigns": assigns, "id": id})
        self.id_key = wire.topic_key(id) if id else None
        self.closed = False
        self.channels: dict[str, ClientChannel] = {}   # topic -> the latest channel joined on it
        self._refs = itertools.count(1)

    def next_ref(self) -> str:
        """A new message ref, as phoenix.js makes them ("1", "2", ...)."""
        return str(next(self._refs))

    def subscribe_and_join(self, topic: str, payload: JSON = None, *,
                           timeout: float | None = None) -> "ClientChannel":
        """Join ``topic`` with ``payload`` (None: ``{}``) and wait for the join's reply.

        Returns the joined channel (its ``response`` is what ``join`` returned in ``ok(...)``);
        raises ``JoinRefused`` (with the ``response``) when the join is refused, crashes or
        no route matches the topic.  Broadcasts on the topic are recorded for
        ``assert_broadcast``, as Phoenix's ``subscribe_and_join`` subscribes the test.
        Joining a topic this connection already joined replaces that channel, as a
        duplicate join does (its ``terminate`` is not called)."""
        self._check_open("subscribe_and_join")
        old = self.channels.get(topic)
        if old is not None and old.live:
            old.ended = "terminated"
            self.harness._deliver(wire.terminate(self.harness.edge_id, self.conn_id, old.topic_b,
                                                 old.join_ref_b, b"duplicate_join"))
        ref = self.next_ref()
        channel = ClientChannel(self, topic, join_ref=ref)
        self.channels[topic] = channel
        self.harness._add_channel(channel)
        self.harness._deliver(wire.join(self.harness.edge_id, self.conn_id, channel.topic_b,
                                        channel.join_ref_b, ref.encode(), self.socket_json,
                                        orjson.dumps({} if payload is None else payload)))
        channel._proc = self.harness.worker.channels.get((self.harness.edge_id, self.conn_id, channel.topic_b))
        if not self.harness._wait(lambda: channel.state != "joining" or None, timeout):
            raise AssertionError(f"no reply to the join of {topic!r} within "
                                 f"{_ms(self.harness.timeout_or(timeout))} (is join still running?)")
        if channel.state == "refused":
            raise JoinRefused(topic, channel.response)
        return channel

    def close(self, *, timeout: float | None = None) -> None:
        """The client goes away: every channel of this connection ends with
        ``terminate(("shutdown", "closed"))``; returns once those terminate calls have run
        (``timeout``: 5 s of loop time by default)."""
        self._end(b"closed", timeout)

    def _end(self, reason: bytes, timeout: float | None) -> None:
        if self.closed:
            return
        self.closed = True
        live = [c for c in self.channels.values() if c.live]
        for channel in live:
            channel.ended = "terminated"
            self.harness._deliver(wire.terminate(self.harness.edge_id, self.conn_id, channel.topic_b,
                                                 channel.join_ref_b, reason))
        self.harness._wait_ended([c._proc for c in live], timeout, "close")

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise RuntimeError(f"{what}: this connection is closed")

    def __repr__(self) -> str:
        return f"ClientSocket(id={self.id!r}, assigns={show(self.assigns)})"


class ClientChannel:
    """A channel joined by a ``ClientSocket``: what a phoenix.js ``channel`` can do, and the
    Phoenix.ChannelTest assertions on what it receives.

    ``response`` is the join's reply; ``state`` is "joined", then "closed" (``phx_close``: a
    graceful ``stop`` or a leave), "crashed" (``phx_error``: an exception, a bad return, an
    abnormal stop; ``crash`` holds the logged error) or "terminated" (the client side ended
    it: ``close``, a duplicate join, a ``disconnect`` broadcast)."""

    def __init__(self, socket: ClientSocket, topic: str, join_ref: str):
        self.socket = socket
        self.harness = socket.harness
        self.topic = topic
        self.topic_b = topic.encode()
        self.join_ref = join_ref
        self.join_ref_b = join_ref.encode()
        self.origin = wire.origin_of(self.harness.edge_id, socket.conn_id)
        self.response: JSONObject = {}
        self.joined = False
        self.refused = False
        self.ended: Literal["phx_close", "phx_error", "terminated"] | None = None
        self.crash: str | None = None
        self.intercept: frozenset[str] = frozenset()
        self.pushes = Mailbox()
        self.replies: dict[str, ReplyMessage] = {}
        self._early: list[Message] = []   # broadcasts before the join reply, as the edge holds them
        self._proc: ChannelProc | None = None

    # --- state --------------------------------------------------------------------------

    @property
    def state(self) -> ChannelState:
        if self.ended == "phx_close":
            return "closed"
        if self.ended == "phx_error":
            return "crashed"
        if self.ended == "terminated":
            return "terminated"
        if self.refused:
            return "refused"
        return "joined" if self.joined else "joining"

    @property
    def live(self) -> bool:
        return self.ended is None and not self.refused

    @property
    def channel(self) -> Channel:
        """The app's Channel instance serving this join (its ``socket.assigns`` included)."""
        if self._proc is None:
            raise RuntimeError(f"no channel instance for {self.topic!r} (the join was refused)")
        return self._proc.channel

    @property
    def assigns(self) -> dict[str, Any]:
        """The channel's own ``socket.assigns``, as its callbacks see them now."""
        return self.channel.socket.assigns

    def _describe_state(self) -> str:
        if self.state == "crashed":
            return "the channel crashed (phx_error)" + (f": {self.crash}" if self.crash else "")
        return f"the channel is {self.state}"

    # --- what the worker sends (harness.py routes it here) -----------------------------

    def _from_worker(self, kind: bytes, msg: Any) -> None:
        if kind == wire.PUSH:
            self.pushes.add(Message(self.topic, msg.event.decode(), decode(msg.payload, msg.fmt)))
        elif kind == wire.REPLY:
            ref = wire.decode_ref(msg.ref)
            self.replies[str(ref)] = ReplyMessage(str(ref), msg.status.decode(), decode(msg.response, msg.fmt))
        elif kind == wire.JOIN_REPLY:
            self.response = orjson.loads(msg.response) if msg.response else {}
            if msg.status == b"ok":
                self.joined = True
                self.intercept = frozenset(orjson.loads(msg.intercept or b"[]"))
                early, self._early = self._early, []
                for message in early:
                    self._fastlane(message, b"")
            else:
                self.refused = True
        elif kind in (wire.CHANNEL_CLOSE, wire.CHANNEL_ERROR):
            if self.ended is None:
                self.ended = "phx_close" if kind == wire.CHANNEL_CLOSE else "phx_error"
            if kind == wire.CHANNEL_ERROR:
                self.crash = self.harness._crash_of(self)

    def _broadcast(self, message: Message, origin: bytes) -> None:
        """A broadcast on this channel's topic reached the edge."""
        if self.joined:
            self._fastlane(message, origin)
        elif not self.refused:
            self._early.append(message)   # the join's origin never matches: no broadcast_from yet

    def _fastlane(self, message: Message, origin: bytes) -> None:
        if self.live and not (origin and origin == self.origin) and message.event not in self.intercept:
            self.pushes.add(message)

    # --- what the client does -----------------------------------------------------------

    def push(self, event: str, payload: Payload = None) -> str:
        """Push ``event`` to the channel (``handle_in``), ``payload`` a JSON value or bytes (a
        binary frame; None sends ``{}``).  Returns the message's ref, for ``assert_reply``."""
        self._check_live("push")
        ref = self.socket.next_ref()
        if isinstance(payload, (bytes, bytearray, memoryview)):
            data, fmt = bytes(payload), wire.BINARY
        else:
            data, fmt = orjson.dumps({} if payload is None else payload), wire.JSON
        self.harness._deliver(wire.inbound(self.harness.edge_id, self.socket.conn_id, self.topic_b,
                                           self.join_ref_b, ref.encode(), event.encode(), data, fmt))
        return ref

    def send(self, message: Any) -> None:
        """Deliver ``message`` to the channel's ``handle_info`` (Elixir's ``send(pid, msg)``)."""
        self._check_live("send")
        if self._proc is None:
            raise RuntimeError(f"send on {self.topic!r}: no channel instance (the join was refused)")
        self.harness._call(self.harness.worker.post_info, self._proc, message)

    def broadcast_from(self, event: str, payload: JSONObject | bytes) -> None:
        """Broadcast ``event`` on this channel's topic as if this channel did: every other
        subscriber gets it, this client does not (Phoenix's ``broadcast_from``)."""
        self.harness._publish(self.topic, event, payload, self.origin)

    def leave(self, *, timeout: float | None = None) -> str:
        """The client leaves (``phx_leave``); returns once ``terminate(("shutdown", "left"))``
        has run (``timeout``: 5 s of loop time by default, as Phoenix's ``close``).  Returns
        the leave's ref: ``assert_reply(ref, "ok")`` holds."""
        self._check_live("leave")
        ref = self.socket.next_ref()
        self.harness._deliver(wire.leave(self.harness.edge_id, self.socket.conn_id, self.topic_b,
                                         self.join_ref_b, ref.encode()))
        self.harness._wait_ended([self._proc], timeout, f"leave of {self.topic!r}")
        return ref

    def close(self, *, timeout: float | None = None) -> None:
        """The client drops this channel as when its connection closes: returns once
        ``terminate(("shutdown", "closed"))`` has run (``ClientSocket.close`` ends them all)."""
        if not self.live:
            return
        self.ended = "terminated"
        self.harness._deliver(wire.terminate(self.harness.edge_id, self.socket.conn_id, self.topic_b,
                                             self.join_ref_b, b"closed"))
        self.harness._wait_ended([self._proc], timeout, f"close of {self.topic!r}")

    def _check_live(self, what: str) -> None:
        if not self.live:
            raise RuntimeError(f"{what} on {self.topic!r}: {self._describe_state()}")

    # --- assertions ---------------------------------------------------------------------

    def assert_reply(self, ref: str, status: str, response: object = ANY, *,
                     timeout: float | None = None) -> Any:
        """Assert that the message ``ref`` gets a reply with ``status`` (and ``response``, if
        given) within ``timeout``; returns the reply's response."""
        reply = self.harness._wait(lambda: self.replies.get(ref), timeout)
        if reply is None:
            raise AssertionError(f"no reply to ref {ref!r} on {self.topic!r} within "
                                 f"{_ms(self.harness.timeout_or(timeout))} ({self._describe_state()})\n"
                                 f"{self._describe_replies()}")
        if reply.status != status or not response == reply.response:
            raise AssertionError(f"the reply to ref {ref!r} on {self.topic!r} is {reply.status!r} "
                                 f"{show(reply.response)}, expected {status!r}{self._matching(response)}")
        return reply.response

    def refute_reply(self, ref: str, status: object = ANY, response: object = ANY, *,
                     timeout: float | None = None) -> None:
        """Assert that no reply to ``ref`` (with ``status`` and ``response``, if given) arrives
        within ``timeout``."""
        reply = self.harness._wait(lambda: self.replies.get(ref), timeout)
        if reply is not None and status == reply.status and response == reply.response:
            raise AssertionError(f"unexpected reply to ref {ref!r} on {self.topic!r}: "
                                 f"{reply.status!r} {show(reply.response)}")

    def assert_push(self, event: str, payload: object = ANY, *, timeout: float | None = None) -> Any:
        """Assert that the client receives ``event`` (with ``payload``, if given; compared
        with ``==``, so ``ANY`` matches anything) within ``timeout``: a ``push`` of the
        channel, or a broadcast on its topic (directly, or through ``handle_out`` for the
        events it intercepts).  Takes that message out of the mailbox; returns its payload."""
        found = self.harness._wait(lambda: self.pushes.find(None, event, payload, take=True), timeout)
        if found is None:
            raise AssertionError(f"no push {event!r}{self._matching(payload, ' matching')} to {self.topic!r} within "
                                 f"{_ms(self.harness.timeout_or(timeout))} ({self._describe_state()})\n"
                                 f"{self.pushes.describe(what='pushes')}")
        return found.payload

    def refute_push(self, event: str, payload: object = ANY, *, timeout: float | None = None) -> None:
        """Assert that the client receives no ``event`` (with ``payload``, if given) within
        ``timeout`` (and none is waiting unasserted)."""
        found = self.harness._wait(lambda: self.pushes.find(None, event, payload), timeout)
        if found is not None:
            raise AssertionError(f"unexpected push {event!r} to {self.topic!r}: {show(found.payload)}")

    def assert_broadcast(self, event: str, payload: object = ANY, *, timeout: float | None = None) -> Any:
        """``ChannelTest.assert_broadcast`` on this channel's topic."""
        return self.harness.assert_broadcast(self.topic, event, payload, timeout=timeout)

    def refute_broadcast(self, event: str, payload: object = ANY, *, timeout: float | None = None) -> None:
        """``ChannelTest.refute_broadcast`` on this channel's topic."""
        self.harness.refute_broadcast(self.topic, event, payload, timeout=timeout)

    def assert_closed(self, *, timeout: float | None = None) -> None:
        """Assert that the channel stops gracefully (``phx_close``, sent after its
        ``terminate``) within ``timeout`` (5 s of loop time by default)."""
        self._assert_end("phx_close", timeout)

    def assert_crashed(self, *, timeout: float | None = None) -> str | None:
        """Assert that the channel crashes (``phx_error``: an exception or a bad return, or
        after ``terminate`` for an abnormal ``stop``) within ``timeout`` (5 s of loop time by
        default); returns the error the worker logged for it (None if it logged none)."""
        self._assert_end("phx_error", timeout)
        return self.crash

    def _assert_end(self, expected: str, timeout: float | None) -> None:
        limit = END_TIMEOUT if timeout is None else timeout
        ended = self.harness._wait(lambda: self.ended, limit)
        if ended != expected:
            raise AssertionError(f"expected {expected} on {self.topic!r} within {_ms(limit)}: "
                                 f"{self._describe_state()}")

    @staticmethod
    def _matching(payload: object, word: str = "") -> str:
        return "" if payload is ANY else f"{word} {show(payload)}"

    def _describe_replies(self) -> str:
        if not self.replies:
            return "no replies received on this channel"
        return "replies received: " + ", ".join(
            f"ref {r.ref!r}: {r.status!r} {show(r.response)}" for r in self.replies.values())

    def __repr__(self) -> str:
        return f"ClientChannel({self.topic!r}, {self.state})"


def ended(proc: ChannelProc | None) -> bool:
    """Whether the worker is done with a channel: closed, its mailbox (terminate) run."""
    return proc is None or (proc.state == CLOSED and not proc.running)
