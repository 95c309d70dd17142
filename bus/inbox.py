"""Point-to-point messages between edges and workers, through the broker's C proxy.

A peer's SUB subscribes to its own inbox key (``wire.inbox_key``); a sender publishes to the
destination's inbox on its PUB.  ``Outbox`` gathers what the event loop sends to each
destination and publishes it at the end of the turn: one ZeroMQ message when there is one, one
batch when there are several.  Each ZeroMQ message saved is a send, a pass through the proxy
thread and a receive, each waking a thread.  Under load a flush also waits until ``HOLD``
after the previous one, so that a batch gathers several turns; an Outbox that flushed longer
ago than that (idle, or lightly used) flushes at the end of the turn, adding no delay.

The receiving side is ``wire.unpack_inbox``: an inbox message or batch -> the logical frames
of each message, as ``[kind, sender, *fields]``.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from zchannels.bus import wire

# A batch is flushed before it would grow past this many bytes, far below any bus message
# limit (--max-bus-message is at least the largest client frame, 16 MiB by default).
BATCH_BYTES = 256 * 1024
# Under load a flush waits until this long after the previous one, so that more messages
# share it; an Outbox idle for longer flushes at the end of the turn, adding no delay.
HOLD = 0.001


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
        self._last_flush = 0.0
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
            wait = self._last_flush + HOLD - self._loop.time()
            if wait > 0:
                self._loop.call_later(wait, self.flush)
            else:
                self._loop.call_soon(self.flush)
        return True

    def flush(self) -> None:
        """Publish everything queued now."""
        self._scheduled = False
        self._last_flush = self._loop.time()
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

