"""A worker's place on the bus, in memory: the stand-in for bus.peer.BusPeer in channel tests.

``workers.runner.Worker`` talks to the bus through its BusPeer only: ``send`` for what it
sends edges (replies, pushes, channel closes), ``publish`` for broadcasts, ``subscribe`` /
``unsubscribe`` for the topics it intercepts and presence's replication topic, ``sub.drain`` to
read what is already waiting.  ``MemoryBus`` offers the same with no sockets and no broker:
what the worker sends goes to ``to_edge``, and every broadcast, once the loop gets to it (as
it would come back through the broker's proxy), goes to ``fan_out`` (the test's edge, which
plays the fastlane) and, if the worker subscribes to its topic, back to the worker
(``on_broadcast``: intercepts and presence replication).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from zchannels.bus import wire

log = logging.getLogger("zchannels.testing")

Frames = list[bytes]


class _Outbox:
    """A send-only socket: ``send(frames)`` hands them on at once (LoopSocket's interface)."""

    def __init__(self, deliver: Callable[[Frames], None]):
        self._deliver = deliver
        self.dropped = 0    # read by the worker's status snapshots

    def send(self, frames: Frames) -> bool:
        self._deliver(frames)
        return True


class _Inbox:
    """The SUB side: ``drain()`` delivers the broadcasts waiting now."""

    def __init__(self, drain: Callable[[], None]):
        self.drain = drain


class MemoryBus:
    """What a Worker needs of its BusPeer, with no sockets (see the module docstring).

    Made by the worker like a BusPeer, ``MemoryBus(sockets, role, on_direct=..., ...)``;
    ``to_edge`` and ``fan_out`` are bound in by the test (functools.partial)."""

    def __init__(self, sockets: object, role: bytes, *, on_direct: Callable[[Frames], None],
                 on_broadcast: Callable[[Frames], None], to_edge: Callable[[Frames], None],
                 fan_out: Callable[[Frames], None], loop: asyncio.AbstractEventLoop | None = None,
                 **_peer_options: Any):
        self.role = role
        self.on_direct = on_direct        # frames as the broker delivers them, to the worker
        self._on_broadcast = on_broadcast
        self._fan_out = fan_out
        self.loop = loop or asyncio.get_running_loop()
        self.dealer = _Outbox(to_edge)
        self.pub = _Outbox(self._published)
        self.sub = _Inbox(self.drain)
        self.send = self.dealer.send
        self._waiting: deque[Frames] = deque()
        self._scheduled = False
        self._sub_counts: dict[bytes, int] = {}
        self.said_bye = False
        self.broker_silent = False
        self.broker_instance = b"memory"

    # --- broadcasts -------------------------------------------------------------------

    def publish(self, topic: str, event: str, payload: bytes, fmt: bytes = wire.JSON,
                origin: bytes = b"") -> bool:
        return self.pub.send(wire.broadcast_frames(topic, event, payload, fmt, origin))

    def _published(self, frames: Frames) -> None:
        self._waiting.append(frames)
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.drain)

    def drain(self) -> None:
        """Deliver every broadcast published so far (and those their handlers publish)."""
        self._scheduled = False
        while self._waiting:
            frames = self._waiting.popleft()
            try:
                self._fan_out(frames)
                if self._sub_counts.get(frames[0]):
                    self._on_broadcast(frames)
            except Exception:   # like LoopSocket: one bad delivery never stops the others
                log.exception("delivering a broadcast on %r failed", frames[0][:60])

    # --- subscriptions (counted like BusPeer's) ----------------------------------------

    def subscribe(self, key: bytes) -> None:
        self._sub_counts[key] = self._sub_counts.get(key, 0) + 1

    def unsubscribe(self, key: bytes) -> None:
        n = self._sub_counts.get(key, 0)
        if n <= 1:
            self._sub_counts.pop(key, None)
        else:
            self._sub_counts[key] = n - 1

    def subscribers(self, key: bytes) -> int:
        return self._sub_counts.get(key, 0)

    # --- life ---------------------------------------------------------------------------

    def silent_for(self) -> float:
        return 0.0

    def bye(self) -> None:
        self.said_bye = True

    def close(self, linger_ms: int = 0) -> None:
        self.bye()
