"""ZeroMQ sockets driven by an asyncio event loop, without a coroutine per message.

Edges and workers read the bus on their hot path.  ``zmq.asyncio`` costs a
future per recv; here the socket's file descriptor is watched with
``loop.add_reader`` and every readable message is drained in one batch with
NOBLOCK until EAGAIN, calling a plain function per message.

libzmq's descriptor is edge-triggered: it signals when the socket's state
changes, and a send (or a subscription, which is a send) can consume that
signal.  So after every send, every (un)subscription and each batch we look at
``EVENTS`` again instead of trusting the descriptor.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

import zmq

from zchannels.bus import wire
from zchannels.bus.timing import (LINK_CONNECT_TIMEOUT_MS, LINK_HANDSHAKE_MS, LINK_HEARTBEAT_MS,
                        LINK_RECONNECT_MAX_MS, LINK_RECONNECT_MIN_MS, LINK_TIMEOUT_MS)

log = logging.getLogger(__name__)

MAX_BATCH = 512  # messages handled before yielding to other loop callbacks
NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's enum flags cost a conversion per call

# ZeroMQ MAXMSGSIZE of every bus socket this process connects; the CLI sets it once per
# process (`--max-bus-message`) before any socket exists, as curve.install does for keys.
_max_message = wire.DEFAULT_MAX_BUS_MESSAGE


def set_max_message(size: int) -> None:
    """The largest bus message this process sends or accepts (bytes, > 0)."""
    global _max_message
    if size <= 0:
        raise ValueError(f"--max-bus-message must be a positive number of bytes, got {size}")
    _max_message = size


def max_message() -> int:
    return _max_message


class LoopSocket:
    def __init__(self, sock: zmq.Socket, on_message: Callable[[list[bytes]], None] | None,
                 loop: asyncio.AbstractEventLoop | None = None, name: str = "bus",
                 decode: Callable[[bytes], list[bytes]] | None = None):
        """``decode``: what turns a received ZeroMQ frame into the logical frames handed to
        ``on_message`` (default: the packing of the socket's type, wire.unpack or
        wire.unpack_broadcast)."""
        self.sock = sock
        self.name = name
        self.on_message = on_message
        self.loop = loop or asyncio.get_running_loop()
        self._scheduled = False
        self._closed = False
        self.dropped = 0  # sends refused by a full high-water mark
        self.malformed = 0
        self.oversized = 0  # sends refused for being over the socket's MAXMSGSIZE
        limit = sock.getsockopt(zmq.MAXMSGSIZE)
        self._max_size = limit if limit > 0 else None
        kind = sock.type
        self._encode = wire.pack_broadcast if kind in (zmq.PUB, zmq.XPUB) else wire.pack
        self._decode = decode or (wire.unpack_broadcast if kind in (zmq.SUB, zmq.XSUB) else wire.unpack)
        if on_message is not None:
            self.loop.add_reader(sock.getsockopt(zmq.FD), self._drain)
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed and self.on_message is not None:
            self._scheduled = True
            self.loop.call_soon(self._drain)

    def drain(self) -> None:
        """Handle what is waiting now, before going on (up to MAX_BATCH messages)."""
        self._drain()

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock = self.sock
        handle = self.on_message
        recv = sock.recv
        decode = self._decode
        for _ in range(MAX_BATCH):
            try:
                frames = decode(recv(NOBLOCK))
            except wire.BusFrameError as exc:
                self.malformed += 1
                if self.malformed <= 20 or self.malformed % 1000 == 0:
                    log.warning("%s: dropped malformed bus message: %s (%d so far)",
                                self.name, exc, self.malformed)
                continue
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if self._closed:
                    return
                log.error("%s: recv failed: %s", self.name, exc)
                return
            try:
                handle(frames)
            except Exception:
                log.exception("%s: message handler failed; message dropped", self.name)
        # More may be waiting: come back after other callbacks had a turn.
        self._schedule()

    def send(self, frames: list[bytes]) -> bool:
        """Send without blocking; False (and a counted drop) when the HWM is reached, or when
        the message is over the bus limit (the broker would close this connection for it)."""
        return self.send_packed(self._encode(frames), frames)

    def send_packed(self, data: bytes, frames: list[bytes] | None = None) -> bool:
        """``send`` for a message already packed into its ZeroMQ frame (``frames``, if given,
        names it in a log line)."""
        if self._max_size is not None and len(data) > self._max_size:
            self._refuse_oversized(frames or [data[:40]], len(data))
            return False
        try:
            self.sock.send(data, NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            if self.dropped in (1, 10, 100, 1000) or self.dropped % 10000 == 0:
                log.warning("%s: send queue full, %d message(s) dropped so far", self.name, self.dropped)
            return False
        except zmq.ZMQError as exc:
            log.error("%s: send failed: %s", self.name, exc)
            return False
        finally:
            # A send may have consumed the descriptor's edge: look again, once per loop turn
            # however many messages this turn sends.
            self._schedule()
        return True

    def set_option(self, option: int, value: int | bytes) -> None:
        """setsockopt, then look at EVENTS again: (un)subscribing sends on the socket's pipe,
        and like a send it may consume the descriptor's edge."""
        self.sock.setsockopt(option, value)
        self._schedule()

    def _refuse_oversized(self, frames: list[bytes], size: int) -> None:
        self.oversized += 1
        if self.oversized <= 20 or self.oversized % 1000 == 0:
            log.warning("%s: %r message of %d bytes not sent: over the bus limit of %d bytes "
                        "(--max-bus-message); %d refused so far", self.name, frames[0][:40], size,
                        self._max_size, self.oversized)

    def close(self, linger_ms: int = 0) -> None:
        """Stop reading and close the socket; what is still queued may leave for ``linger_ms``
        (while the context lives)."""
        if self._closed:
            return
        self._closed = True
        if self.on_message is not None:
            try:
                self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
            except Exception:
                pass
        self.sock.close(linger=linger_ms)


def run_loop(main_coro) -> object:
    """Run the process's main coroutine on uvloop when it is installed (30-40% less CPU)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main_coro)
    return uvloop.run(main_coro)


def tune_link(sock: zmq.Socket, timeout_ms: int = LINK_TIMEOUT_MS) -> None:
    """Heartbeats, TCP keepalive and TCP_USER_TIMEOUT (ZMQ_TCP_MAXRT) on one bus socket, so a
    connection that carries nothing for ``timeout_ms`` is closed (and, on the connecting side,
    reconnected every 0.1..0.5 s until the link is back).  Set before bind/connect.
    The values are bus/timing.py's LINK_*."""
    sock.setsockopt(zmq.HEARTBEAT_IVL, LINK_HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout_ms)
    sock.setsockopt(zmq.TCP_MAXRT, timeout_ms)
    # Keepalive covers a peer that does not speak ZMTP 3.1 heartbeats; ours never idle that long.
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, timeout_ms // 2000))
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 2)
    sock.setsockopt(zmq.RECONNECT_IVL, LINK_RECONNECT_MIN_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, LINK_RECONNECT_MAX_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, LINK_CONNECT_TIMEOUT_MS)
    sock.setsockopt(zmq.HANDSHAKE_IVL, LINK_HANDSHAKE_MS)
