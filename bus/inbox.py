"""Point-to-point messages between edges and workers, through the broker's C proxy.

A peer's SUB subscribes to its own inbox key (``wire.inbox_key``); a sender publishes to the
destination's inbox on its PUB.  ``Outbox`` gathers what one turn of the event loop sends to
each destination and publishes it at the end of that turn: one ZeroMQ message when there is
one, one batch when there are several.  Under load a turn handles many client frames or
handler replies, and each ZeroMQ message saved is a send, a hop through the proxy thread
and a receive; when idle a turn sends one message and nothing waits longer than the turn.

``unpack`` is the receiving side: an inbox message or batch -> the logical frames of each
message, as ``[kind, sender, *fields]``.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from zchannels.bus import wire

# A batch is flushed before it would grow past this many bytes, far below any bus message
# limit (--max-bus-message is at least the largest client frame, 16 MiB by default).
BATCH_BYTES = 256 * 1024


class Outbox:
    """Per-destination queues of one loop turn, published at its end through ``send_packed``
    (the PUB's LoopSocket.send_packed).  ``on_undelivered(frames)`` gets each message a full
    queue or the bus limit refused, so its sender can answer for it."""

    def __init__(self, sender: bytes, send_packed: Callable[[bytes, list[bytes] | None], bool],
                 loop: asyncio.AbstractEventLoop,
                 on_undelivered: Callable[[list[bytes]], None]):
        self.sender = sender
        self._send_packed = send_packed
        self._loop = loop
        self._on_undelivered = on_undelivered
        self._waiting: dict[bytes, list[list[bytes]]] = {}
        self._bytes = 0
        self._scheduled = False
        self.batches = 0          # batches published (of two messages or more)
        self.batched = 0          # messages that left in them

    @property
    def waiting(self) -> bool:
        return bool(self._waiting)

    def send(self, frames: list[bytes]) -> bool:
        """Queue ``[kind, dest, *fields]`` for ``dest``'s inbox; it leaves at the end of this
        loop turn."""
        dest = frames[1]
        queue = self._waiting.get(dest)
        if queue is None:
            self._waiting[dest] = [frames]
        else:
            queue.append(frames)
        self._bytes += sum(map(len, frames))
        if self._bytes > BATCH_BYTES:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Publish everything queued now."""
        self._scheduled = False
        waiting, self._waiting, self._bytes = self._waiting, {}, 0
        sender, pack = self.sender, wire.pack
        for dest, queue in waiting.items():
            if len(queue) == 1:
                frames = queue[0]
                if not self._send_packed(wire.pack_inbox(frames, sender), frames):
                    self._on_undelivered(frames)
                continue
            parts = [pack([f[0], sender, *f[2:]]) for f in queue]
            if self._send_packed(wire.pack_inbox_batch(dest, parts), queue[0]):
                self.batches += 1
                self.batched += len(queue)
            else:
                for frames in queue:
                    self._on_undelivered(frames)


def unpack(data: bytes) -> list[list[bytes]]:
    """An inbox message or batch -> the logical frames of each of its messages.
    BusFrameError for a malformed one."""
    return wire.unpack_inbox(data)
