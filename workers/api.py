"""Write Phoenix channels in Python: the handler API (``from zchannels import ...``).

This module is the user's manual.  A handler module declares one ``Socket`` (the
connection entry point and its topic routes) and one ``Channel`` subclass per kind of
topic.  Worker processes import it (``zchannels workers my_app.py``), run ``connect``
once per client connection, create one channel instance per joined topic and call
its callbacks.  Everything else (WebSocket/LongPoll transports, the Phoenix wire
format, fan-out between processes) happens elsewhere; clients are phoenix.js or
any other Phoenix Channels client.

A complete handler module::

    from zchannels.workers import Channel, Socket, ok, error, reply, noreply, stop

    class RoomChannel(Channel):
        intercept = ["user_joined"]          # broadcasts routed through handle_out

        async def join(self, topic, payload, socket):
            if topic == "room:lobby":
                self.send("after_join")      # push/broadcast are not allowed in join ...
                return ok({"hello": 1})      # ... so do it from handle_info, right after
            return error({"reason": "unauthorized"})

        def handle_info(self, msg, socket):
            if msg == "after_join":
                self.broadcast("user_joined", {"user": socket.assigns["user"]})
            return noreply()

        async def handle_in(self, event, payload, socket):
            if event == "new_msg":
                self.broadcast("new_msg", {"body": payload["body"]})
                return noreply()
            if event == "ping":
                return reply("ok", payload)
            return stop("shutdown", reply=("error", {"reason": "unknown event"}))

        def handle_out(self, event, payload, socket):
            if payload["user"] in socket.assigns.get("ignoring", ()):
                return noreply()             # filtered: this client never sees it
            self.push(event, payload)
            return noreply()

        def terminate(self, reason, socket):
            print("left", self.topic, reason)

    socket = Socket()
    socket.channel("room:*", RoomChannel)

    @socket.connect
    def connect(params, socket, connect_info):
        return socket.assign(user=params.get("user", "anonymous"))

Callbacks may be plain ``def`` or ``async def``.  Each joined channel handles its
messages one at a time, in order (a mailbox, like a Phoenix channel process); different
channels run concurrently, so an ``await`` in one channel never blocks another.  An
exception in a callback crashes that channel only: the client gets ``phx_error`` and
phoenix.js rejoins by itself.  A callback that returns something other than the shapes
listed for it is a crash too, with a log line naming the callback, the valid shapes and
the value received.

Return shapes, per callback:

=================  ==============================================================
``join``           ``ok()``, ``ok(reply_dict)``, ``error(reply_dict)``
``handle_in``      ``reply(status, response=None)``, ``noreply()``, ``stop(reason, reply=None)``
``handle_out``     ``noreply()``, ``stop(reason)``
``handle_info``    ``noreply()``, ``stop(reason)``
``terminate``      anything (ignored)
``connect``        the socket (after ``socket.assign(...)``) or ``True`` to accept;
                   ``False``, ``None`` or ``error({"reason": ...})`` to refuse (HTTP 403)
``id``             a string (the socket id topic) or ``None``
=================  ==============================================================

``terminate(reason, socket)`` reasons: ``("shutdown", "left")`` after the client left,
``("shutdown", "closed")`` when its connection went away, ``"shutdown"`` after
``join`` returned ``error(...)`` and when the worker stops, or the reason given to
``stop(...)``.  It is not called after a crash, nor for a duplicate join of the same
topic on the same connection (Phoenix semantics).

Type hints: ``workers`` ships them (``py.typed``); the ``workers`` package docstring shows
a typed handler.  ``Channel`` declares each callback's result as ``MaybeAwaitable[...]``
(``def`` or ``async def``), so a ``def`` override returning ``super().handle_in(...)``
declares that type too.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Mapping
from typing import Any, ClassVar, NamedTuple, TypeAlias, TypeVar


from zchannels.workers.payload import JSON, BroadcastPayload, JSONObject, OutPayload, Payload
from zchannels.bus import broadcasts
from zchannels.bus.history import Rule as History
from zchannels.bus.historyread import HistoryUnavailable
from zchannels.workers.presence import PresenceMixin
from zchannels.workers.results import (  # noqa: F401  (re-exported: the handler API in one place)
    BadReturn, Error, HandlerResult, JoinResult, MaybeAwaitable, NoReply, Ok, OutResult, Reply,
    Stop, check_result, error, noreply, ok, reply, stop,
)
from zchannels.workers.routes import SYSTEM_PREFIX, Route

log = logging.getLogger("zchannels.worker")

__all__ = [
    "Channel", "Socket", "SocketState", "Timer", "ok", "error", "reply", "noreply", "stop",
    "broadcast", "BadReturn", "Ok", "Error", "Reply", "NoReply", "Stop",
    "JoinResult", "HandlerResult", "OutResult", "MaybeAwaitable", "ConnectResult",
    "ConnectHandler", "IdHandler", "History", "HistoryEntry", "HistoryUnavailable",
]


# --- sockets --------------------------------------------------------------------------

class SocketState:
    """What a callback knows about its connection (Phoenix's ``%Socket{}``).

    ``assigns`` is a dict: in ``connect`` it starts empty and is what the connection
    keeps; each channel gets its own *copy* at join (merged with the route's
    ``assigns=``), so changes inside a channel stay in that channel.  ``id`` is the
    socket id from ``@socket.id``; ``topic`` and ``join_ref`` identify the channel
    (``None`` in ``connect``); ``ref`` is the client's message ref while ``handle_in`` runs.
    Refs are as the client sent them: strings from phoenix.js, numbers from some clients.
    """
    __slots__ = ("assigns", "id", "topic", "join_ref", "ref")

    def __init__(self, assigns: JSONObject | None = None, id: str | None = None,
                 topic: str | None = None, join_ref: JSON = None):
        self.assigns: dict[str, Any] = {} if assigns is None else assigns
        self.id = id
        self.topic = topic
        self.join_ref = join_ref
        self.ref: JSON = None

    def assign(self, mapping: Mapping[str, Any] | None = None, /, **values: Any) -> "SocketState":
        """Merge values into ``assigns`` and return this socket (``return socket.assign(x=1)``)."""
        if mapping:
            self.assigns.update(mapping)
        self.assigns.update(values)
        return self

    def __repr__(self) -> str:
        return f"SocketState(topic={self.topic!r}, id={self.id!r}, assigns={self.assigns!r})"


#: What ``connect`` returns: the socket or True to accept; False, None or ``error(...)`` to refuse.
ConnectResult: TypeAlias = SocketState | bool | Error | None
#: ``connect(params, socket, connect_info)``, ``def`` or ``async def``.
ConnectHandler: TypeAlias = Callable[[JSONObject, SocketState, JSONObject], MaybeAwaitable[ConnectResult]]
#: ``id(socket)``: the socket id topic, or None.
IdHandler: TypeAlias = Callable[[SocketState], str | None]
_ConnectFn = TypeVar("_ConnectFn", bound=ConnectHandler)
_IdFn = TypeVar("_IdFn", bound=IdHandler)


class Socket:
    """The handler module's entry point: routes topics to channels, accepts connections.

    Declare it at module level under the name ``socket`` (or name it in the app spec,
    ``my_app:other_name``)::

        socket = Socket()
        socket.channel("room:*", RoomChannel)              # every topic starting with "room:"
        socket.channel("admin", AdminChannel, assigns={"admin": True})

        @socket.connect
        def connect(params, socket, connect_info): ...

        @socket.id
        def socket_id(socket): return f"users_socket:{socket.assigns['user_id']}"
    """

    def __init__(self) -> None:
        self.routes: list[Route] = []
        self.connect_handler: ConnectHandler | None = None
        self.id_handler: IdHandler | None = None
        # The app module's ``history = [History(...)]`` (workers/loadapp.py): sent to the broker.
        self.history: tuple[History, ...] = ()

    def channel(self, pattern: str, channel: type["Channel"], *,
                assigns: JSONObject | None = None) -> None:
        """Route ``pattern`` to ``channel``: an exact topic, or a prefix ending in one ``*``.

        The first declared route that matches a topic wins.  ``assigns`` are merged into
        the assigns of every channel joined through this route.
        """
        if not (isinstance(channel, type) and issubclass(channel, Channel)):
            raise TypeError(f"socket.channel({pattern!r}, ...) needs a Channel subclass, got {channel!r}")
        if isinstance(pattern, str) and pattern.startswith(SYSTEM_PREFIX):
            raise ValueError(f"socket.channel({pattern!r}, ...): topics starting with {SYSTEM_PREFIX!r} "
                             "are reserved for zchannels itself (the status page's zchannels:status)")
        intercept = getattr(channel, "intercept", ())
        if isinstance(intercept, str) or not all(isinstance(e, str) for e in intercept):
            raise TypeError(f"{channel.__name__}.intercept must be a list of event names, got {intercept!r}")
        if assigns is not None and not isinstance(assigns, dict):
            raise TypeError(f"socket.channel({pattern!r}, assigns=...) must be a dict, got {assigns!r}")
        self.routes.append(Route(pattern, channel, assigns or {}))

    def route(self, topic: str) -> Route | None:
        """The first route whose pattern matches ``topic``, or None."""
        for route in self.routes:
            if route.matches(topic):
                return route
        return None

    def connect(self, fn: _ConnectFn) -> _ConnectFn:
        """Decorator: ``fn(params, socket, connect_info)`` runs once per client connection.

        ``params`` are the client's connect params (``new Socket(url, {params})``),
        ``connect_info`` what the edge knows about the request.  Return the socket
        (typically ``socket.assign(...)``) or ``True`` to accept; ``False``, ``None`` or
        ``error({"reason": ...})`` to refuse.  Assigns must be JSON-serialisable: the
        edge keeps them and sends them along with every join.  Without a connect
        handler every connection is accepted with empty assigns.
        """
        self.connect_handler = fn
        return fn

    def id(self, fn: _IdFn) -> _IdFn:
        """Decorator: ``fn(socket)`` returns the socket id (a string) or None.

        Broadcasting ``"disconnect"`` to that id closes every connection carrying it.
        """
        self.id_handler = fn
        return fn


# --- channels -------------------------------------------------------------------------

class _Sent:
    """What push/broadcast return: nothing to wait for, yet ``await`` on it is allowed."""
    __slots__ = ()

    def __await__(self) -> Generator[None, None, None]:
        yield from ()


SENT = _Sent()


class Timer:
    """Handle of a ``send_after`` message; ``cancel()`` it before it is delivered."""
    __slots__ = ("handle", "_owner")

    def __init__(self, handle: Any, owner: set["Timer"]):
        self.handle = handle
        self._owner = owner

    def cancel(self) -> None:
        self.handle.cancel()
        self._owner.discard(self)


def _check_event(what: str, event: Any) -> str:
    if not isinstance(event, str) or not event:
        raise TypeError(f"{what} event must be a non-empty string, got {event!r}")
    return event


class Channel(PresenceMixin):
    """Base class of a channel: one instance per joined topic per client connection.

    Subclass it and define the callbacks (``def`` or ``async def``); ``self.topic`` and
    ``self.socket`` (a ``SocketState``) are set before ``join`` runs.  An instance is
    created with no arguments; if you define ``__init__``, call ``super().__init__()``.

    ``intercept`` lists the broadcast events that go through ``handle_out`` for this
    channel; every other broadcast on the topic reaches the client directly (the
    Phoenix "fastlane", encoded once for all subscribers).

    Presence (``workers.presence``): ``self.track(key, meta)``, ``self.update(key, meta)``,
    ``self.untrack(key)`` and ``self.presence_list()``; push the list as ``"presence_state"``
    from ``handle_info`` right after each join, and phoenix.js ``Presence`` stays in sync.
    """

    intercept: ClassVar[list[str] | tuple[str, ...]] = []

    # Set by the worker runtime before __init__ (see workers/runner.py).
    topic: str
    socket: SocketState
    _proc: Any = None

    def __init__(self) -> None:
        pass

    # -- callbacks (override) --

    def join(self, topic: str, payload: JSON, socket: SocketState) -> MaybeAwaitable[JoinResult]:
        """Authorise the client to join ``topic``: return ``ok()``, ``ok(dict)`` or ``error(dict)``."""
        raise NotImplementedError(f"{type(self).__name__} must define join(self, topic, payload, socket)")

    def handle_in(self, event: str, payload: Payload,
                  socket: SocketState) -> MaybeAwaitable[HandlerResult]:
        """A client push: ``payload`` is the decoded JSON, or ``bytes`` for a binary frame."""
        raise NotImplementedError(f"{type(self).__name__} has no handle_in for event {event!r}")

    def handle_out(self, event: str, payload: OutPayload,
                   socket: SocketState) -> MaybeAwaitable[OutResult]:
        """An intercepted broadcast on this topic; by default it is pushed unchanged."""
        self.push(event, payload)
        return noreply()

    def handle_info(self, msg: Any, socket: SocketState) -> MaybeAwaitable[OutResult]:
        """A message from ``self.send(msg)`` or ``self.send_after(ms, msg)``."""
        log.warning("%s for %s got a message but defines no handle_info: %r",
                    type(self).__name__, self.topic, msg)
        return noreply()

    def terminate(self, reason: Any, socket: SocketState) -> object:
        """The channel is ending (see the module docs for the reasons); the return value is ignored."""

    # -- actions --

    def push(self, event: str, payload: BroadcastPayload) -> _Sent:
        """Send ``event`` to this channel's client only. Not allowed inside ``join``."""
        proc = self._joined("push")
        data, fmt = broadcasts.encode_payload(payload, "push")
        proc.worker.push(proc, _check_event("push", event), data, fmt)
        return SENT

    def broadcast(self, event: str, payload: BroadcastPayload) -> _Sent:
        """Send ``event`` to every subscriber of this topic, this client included."""
        proc = self._joined("broadcast")
        data, fmt = broadcasts.encode(self.topic, event, payload)
        proc.worker.publish(self.topic, event, data, fmt, b"")
        return SENT

    def broadcast_from(self, event: str, payload: BroadcastPayload) -> _Sent:
        """Like ``broadcast``, except to this channel's own client."""
        proc = self._joined("broadcast_from")
        data, fmt = broadcasts.encode(self.topic, event, payload, what="broadcast_from")
        proc.worker.publish(self.topic, event, data, fmt, proc.origin)
        return SENT

    def send(self, msg: Any) -> None:
        """Deliver ``msg`` to ``handle_info`` after the messages already queued (allowed in join)."""
        if self._proc is None:
            raise RuntimeError("send() needs a channel run by a worker")
        self._proc.worker.post_info(self._proc, msg)

    def send_after(self, ms: float, msg: Any) -> Timer:
        """Deliver ``msg`` to ``handle_info`` in ``ms`` milliseconds; returns a cancellable Timer."""
        if self._proc is None:
            raise RuntimeError("send_after() needs a channel run by a worker")
        timer: Timer = self._proc.worker.send_after(self._proc, ms, msg)
        return timer

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        """The last ``limit`` broadcasts still kept for this channel's topic, oldest first, as
        ``HistoryEntry(event, payload, position)`` (payload: the JSON object, or bytes).
        An empty list for a topic no ``History`` rule covers.  Allowed in ``join`` (e.g. to
        push them from ``handle_info``); raises ``HistoryUnavailable`` when the broker does
        not answer within 5 s."""
        if self._proc is None:
            raise RuntimeError("history() needs a channel run by a worker")
        if type(limit) is not int or limit < 1:
            raise ValueError(f"history(limit=...) must be a positive integer, got {limit!r}")
        entries: list[HistoryEntry] = await self._proc.worker.read_history(self.topic, limit)
        return entries

    def _joined(self, what: str) -> Any:
        proc = self._proc
        if proc is None or not proc.joined:
            raise RuntimeError(
                f"{what}() called before the join of {getattr(self, 'topic', '?')!r} completed. "
                "Push and broadcast are not allowed inside join(); call self.send(msg) there "
                "and push from handle_info(msg, socket).")
        return proc

    # the return shapes, for `return self.ok()` style
    ok = staticmethod(ok)
    error = staticmethod(error)
    reply = staticmethod(reply)
    noreply = staticmethod(noreply)
    stop = staticmethod(stop)


class HistoryEntry(NamedTuple):
    """One stored broadcast, from ``Channel.history``."""
    event: str
    payload: Any            # the JSON object, or bytes for a binary broadcast
    position: str           # "<epoch>:<offset>"


# The worker runtime of this process (set by workers/runner.py), for module-level broadcast.
_runtime: Any = None


def broadcast(topic: str, event: str, payload: BroadcastPayload) -> _Sent:
    """Broadcast ``event`` to every subscriber of any ``topic``, from any callback.

    ``topic`` and ``event`` are non-empty strings without NUL characters, ``payload`` a dict
    (sent as JSON) or bytes (a binary frame); anything else raises TypeError or ValueError
    naming what is wrong.  Outside a worker process, use the publisher client instead.
    """
    if _runtime is None:
        raise RuntimeError("workers.broadcast() works inside a worker process only")
    data, fmt = broadcasts.encode(topic, event, payload)
    _runtime.publish(topic, event, data, fmt, b"")
    return SENT
