"""What channel callbacks return: ``ok`` / ``error`` from ``join`` (and ``connect``),
``reply`` / ``noreply`` / ``stop`` from the ``handle_*`` callbacks, and the check that a
callback returned one of its valid shapes.  Re-exported by ``workers`` and ``workers.api``.

For type checkers, each callback's shapes have a name: ``JoinResult`` (``join``),
``HandlerResult`` (``handle_in``) and ``OutResult`` (``handle_out``, ``handle_info``);
``MaybeAwaitable[...]`` of one is what the base class declares, since a callback may be
``def`` or ``async def``.
"""
from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

from zchannels.workers.payload import JSON, Binary, JSONObject

if TYPE_CHECKING:
    from zchannels.workers.api import Channel

_T = TypeVar("_T")


def _json_object(what: str, reply: object) -> JSONObject:
    if reply is not None and not isinstance(reply, dict):
        raise TypeError(f"{what}() takes a dict (JSON object) reply, got {type(reply).__name__}")
    return {} if reply is None else reply


class Ok:
    """``join`` accepted; ``reply`` (a dict) goes to the client as the join response."""
    __slots__ = ("reply",)

    def __init__(self, reply: JSONObject | None = None):
        self.reply: JSONObject = _json_object("ok", reply)

    def __repr__(self) -> str:
        return f"ok({self.reply!r})"


class Error:
    """``join`` (or ``connect``) refused; ``reply`` (a dict) goes to the client."""
    __slots__ = ("reply",)

    def __init__(self, reply: JSONObject | str | None = None):
        self.reply: JSONObject = _json_object("error", {"reason": reply} if isinstance(reply, str) else reply)

    def __repr__(self) -> str:
        return f"error({self.reply!r})"


class Reply:
    """Answer the client's push: ``phx_reply`` with ``status`` and ``response``."""
    __slots__ = ("status", "response")

    def __init__(self, status: str, response: JSON | Binary = None):
        if not isinstance(status, str) or not status:
            raise TypeError(f"reply() status must be a non-empty string, got {status!r}")
        if isinstance(response, (bytearray, memoryview)):
            response = bytes(response)
        self.status: str = status
        self.response: JSON | bytes = {} if response is None else response

    def __repr__(self) -> str:
        return f"reply({self.status!r}, {self.response!r})"


class NoReply:
    """Nothing to send back."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "noreply()"


class Stop:
    """Stop the channel: ``phx_close`` for a graceful reason, else ``phx_error``."""
    __slots__ = ("reason", "reply")

    def __init__(self, reason: Any = "normal",
                 reply: Reply | tuple[str, JSON | Binary] | str | None = None):
        if isinstance(reply, tuple) and len(reply) == 2:
            reply = Reply(*reply)
        elif isinstance(reply, str):
            reply = Reply(reply)
        elif reply is not None and not isinstance(reply, Reply):
            raise TypeError("stop(reply=...) takes a reply(...), a (status, response) tuple "
                            f"or a status string, got {reply!r}")
        self.reason: Any = reason
        self.reply: Reply | None = reply

    @property
    def graceful(self) -> bool:
        """``"normal"``, ``"shutdown"`` and ``("shutdown", anything)`` close the channel."""
        reason = self.reason
        if isinstance(reason, tuple):
            return len(reason) == 2 and reason[0] == "shutdown"
        return reason in ("normal", "shutdown")

    def __repr__(self) -> str:
        return f"stop({self.reason!r}, reply={self.reply!r})"


_NOREPLY = NoReply()

#: What ``join`` returns: ``ok(...)`` or ``error(...)``.
JoinResult: TypeAlias = Ok | Error
#: What ``handle_in`` returns: ``reply(...)``, ``noreply()`` or ``stop(...)``.
HandlerResult: TypeAlias = Reply | NoReply | Stop
#: What ``handle_out`` and ``handle_info`` return: ``noreply()`` or ``stop(reason)``.
OutResult: TypeAlias = NoReply | Stop
#: A callback's result, or an awaitable of it (``async def`` callbacks).
MaybeAwaitable: TypeAlias = _T | Awaitable[_T]


def ok(reply: JSONObject | None = None) -> Ok:
    """Accept a join; the optional dict is the join response (``{}`` by default)."""
    return Ok(reply)


def error(reply: JSONObject | str | None = None) -> Error:
    """Refuse a join (or a connection). ``error("x")`` is short for ``error({"reason": "x"})``."""
    return Error(reply)


def reply(status: str, response: JSON | Binary = None) -> Reply:
    """Reply to the client's push with ``status`` (any string) and ``response``.

    ``response`` is any JSON value (``{}`` when omitted) or ``bytes``, sent as a binary frame.
    """
    return Reply(status, response)


def noreply() -> NoReply:
    """Handled; nothing goes back to the client."""
    return _NOREPLY


def stop(reason: Any = "normal", reply: Reply | tuple[str, JSON | Binary] | str | None = None) -> Stop:
    """Stop this channel after replying (``reply=("ok", {...})``, only from ``handle_in``).

    ``"normal"``, ``"shutdown"`` and ``("shutdown", x)`` end it with ``phx_close``: the
    client forgets the channel.  Any other reason is a crash: ``phx_error``, and
    phoenix.js rejoins.  ``terminate(reason, socket)`` runs in both cases.
    """
    return Stop(reason, reply)


class BadReturn(TypeError):
    """A callback returned a value that is not one of its valid shapes."""


_SHAPES = {
    "join": ((Ok, Error), "ok(), ok(reply_dict), error(reply_dict)"),
    "handle_in": ((Reply, NoReply, Stop),
                  "reply(status, response=None), noreply(), stop(reason, reply=None)"),
    "handle_out": ((NoReply, Stop), "noreply(), stop(reason)"),
    "handle_info": ((NoReply, Stop), "noreply(), stop(reason)"),
}


def check_result(channel: "Channel", callback: str, value: Any) -> None:
    """Raise ``BadReturn`` unless ``value`` is a valid return of ``callback``."""
    types, text = _SHAPES[callback]
    if type(value) in types and not (
            type(value) is Stop and value.reply is not None and callback != "handle_in"):
        return
    raise BadReturn(f"{type(channel).__name__}.{callback} returned {value!r} "
                    f"({type(value).__name__}); valid returns: {text}")
