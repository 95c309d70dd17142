"""Topic routes: ``"room:*"`` -> a Channel class.

A worker routes every join itself: the edge never imports user code (DESIGN principle 1),
so the socket's channel table lives in the worker, made of these routes.  Loading the user's
handler module is workers/loadapp.py's job.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zchannels.bus import wire

if TYPE_CHECKING:
    from zchannels.workers.api import Channel

__all__ = ["Route", "check_pattern", "SYSTEM_PREFIX"]

# Topics under this prefix belong to zchannels itself (workers/status.py); apps cannot route them.
SYSTEM_PREFIX = wire.SYSTEM_TOPIC_PREFIX


def check_pattern(pattern: Any) -> str:
    """Validate a route pattern: an exact topic, or a prefix followed by one trailing ``*``."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"a channel route pattern must be a non-empty string, got {pattern!r}")
    if "*" in pattern[:-1]:
        raise ValueError(f"channel route {pattern!r}: '*' is allowed only once, as the last "
                         "character (\"room:*\")")
    return pattern


class Route:
    """One ``socket.channel(pattern, Channel, assigns=...)`` declaration."""
    __slots__ = ("pattern", "channel", "assigns", "_prefix")

    def __init__(self, pattern: str, channel: type[Channel], assigns: dict[str, Any] | None = None):
        self.pattern = check_pattern(pattern)
        self.channel = channel
        self.assigns = assigns or {}
        # Phoenix: "room:*" matches every topic starting with "room:", "room:" included.
        self._prefix = pattern[:-1] if pattern.endswith("*") else None

    def matches(self, topic: str) -> bool:
        if self._prefix is None:
            return topic == self.pattern
        return topic.startswith(self._prefix)

    def __repr__(self) -> str:
        return f"Route({self.pattern!r}, {self.channel.__name__})"
