"""zchannels: Phoenix Channels for Python.

Handler modules import the handler API from here::

    from zchannels import Channel, Socket, ok, error, reply, noreply, stop

(``zchannels.workers`` is its manual), web apps and scripts the publisher client
(``Publisher``, ``AsyncPublisher``) and Phoenix.Token (``sign_token``, ``verify_token``).
The broker, bus, edge and workers packages live inside this one (``zchannels.edge`` ...);
the handler API is loaded on first use, so an edge or the broker never loads it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zchannels.publisher import AsyncPublisher, PublishError, Publisher

if TYPE_CHECKING:
    from zchannels.workers import (
        JSON as JSON,
        AppLoadError as AppLoadError,
        BadReturn as BadReturn,
        Binary as Binary,
        BroadcastPayload as BroadcastPayload,
        Channel as Channel,
        History as History,
        HistoryEntry as HistoryEntry,
        HistoryUnavailable as HistoryUnavailable,
        ConnectResult as ConnectResult,
        HandlerResult as HandlerResult,
        JoinResult as JoinResult,
        JSONObject as JSONObject,
        MaybeAwaitable as MaybeAwaitable,
        OutPayload as OutPayload,
        OutResult as OutResult,
        Payload as Payload,
        PresenceEntry as PresenceEntry,
        PresenceState as PresenceState,
        Socket as Socket,
        SocketState as SocketState,
        Timer as Timer,
        TokenError as TokenError,
        broadcast as broadcast,
        error as error,
        load_app as load_app,
        noreply as noreply,
        ok as ok,
        presence_list as presence_list,
        reply as reply,
        sign_token as sign_token,
        stop as stop,
        verify_token as verify_token,
    )

__version__: str
_HANDLER_API = frozenset((
    "Channel", "Socket", "SocketState", "Timer", "ok", "error", "reply", "noreply", "stop",
    "broadcast", "presence_list", "BadReturn", "AppLoadError", "load_app", "sign_token",
    "verify_token", "TokenError", "JSON", "JSONObject", "Binary", "Payload", "BroadcastPayload",
    "OutPayload", "JoinResult", "HandlerResult", "OutResult", "MaybeAwaitable", "ConnectResult",
    "PresenceEntry", "PresenceState", "History", "HistoryEntry", "HistoryUnavailable",
))
__all__ = ["Publisher", "AsyncPublisher", "PublishError", *sorted(_HANDLER_API)]


def __getattr__(name: str) -> Any:
    if name in _HANDLER_API:
        from zchannels import workers
        return getattr(workers, name)
    if name == "__version__":
        from zchannels.version import version
        return version()
    raise AttributeError(f"module 'zchannels' has no attribute {name!r}")
