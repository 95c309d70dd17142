"""A TCP proxy for tests: puts a link that can be delayed or cut between two processes.

``TcpProxy(targets)`` listens on a free loopback port and forwards each accepted connection to
the next of ``targets`` in turn (one target: a plain link; several: a round-robin load balancer
without health checks, like a bare TCP balancer in front of edges).  ``BusLink(bus)`` fronts a
broker's three consecutive bus ports (bus/wire.py ``bus_endpoints``) with three proxies on
three consecutive ports, so a peer given ``link.bus`` reaches the broker only through it.

Controls, callable from the test's thread:

- ``delay = seconds``: every chunk is forwarded that much later (in both directions), without
  limiting throughput.
- ``freeze()``: a cut cable.  Nothing is forwarded in either direction and nothing more is read,
  but every TCP connection stays open; connections accepted meanwhile are held unconnected.
  Loopback TCP still acknowledges what the kernel buffers, so a frozen link is noticed by
  application-level heartbeats (ZeroMQ's PING/PONG), not by TCP retransmission timeouts.
- ``unfreeze()``: forwarding resumes where it stopped; held connections are connected.
- ``sever()``: every connection open now is reset, both ways, and what it held is discarded
  (a dead link that never comes back); later connections are served as usual.

All proxies run on one event loop in a daemon thread.
"""
from __future__ import annotations

import asyncio
import itertools
import threading
import time
from typing import Iterable

CHUNK = 65536


class _Loop:
    """The one event loop thread every proxy of the test process runs on."""
    _instance: "_Loop | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="tcpproxy", daemon=True).start()

    @classmethod
    def get(cls) -> "_Loop":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *args) -> None:
        self.loop.call_soon_threadsafe(fn, *args)


class TcpProxy:
    """Listen on ``127.0.0.1:port`` (0 = any free port); forward connections to ``targets``."""

    def __init__(self, targets: Iterable[tuple[str, int]], port: int = 0):
        self.targets = list(targets)
        self._next = itertools.count()
        self.delay = 0.0
        self.accepted = 0
        self.upstream_of: list[int] = []   # target index of each accepted connection, in order
        self._lt = _Loop.get()
        self._thawed: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._server = self._lt.run(self._start(port))
        self.port = self._server.sockets[0].getsockname()[1]

    async def _start(self, port: int) -> asyncio.base_events.Server:
        self._thawed = asyncio.Event()
        self._thawed.set()
        return await asyncio.start_server(self._serve, "127.0.0.1", port, reuse_address=True)

    # --- controls (any thread) -----------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    def freeze(self) -> None:
        self._lt.call(self._thawed.clear)

    def unfreeze(self) -> None:
        self._lt.call(self._thawed.set)

    def sever(self) -> None:
        async def reset():
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()
        self._lt.run(reset())

    def close(self) -> None:
        async def stop():
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            self._thawed.set()
        self._lt.run(stop())

    # --- forwarding ------------------------------------------------------------------------------
    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        index = next(self._next) % len(self.targets)
        self.accepted += 1
        self.upstream_of.append(index)
        self._writers.add(client_w)
        await self._thawed.wait()   # a cut cable: the connection reaches nobody yet
        host, port = self.targets[index]
        try:
            up_r, up_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            self._writers.discard(client_w)
            return
        self._writers.add(up_w)
        await asyncio.gather(self._pipe(client_r, up_w), self._pipe(up_r, client_w))
        self._writers.discard(client_w)
        self._writers.discard(up_w)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read chunks into a queue stamped with their due time; a second task writes them."""
        queue: asyncio.Queue = asyncio.Queue()
        sender = asyncio.ensure_future(self._send(queue, writer))
        try:
            while True:
                await self._thawed.wait()
                try:
                    data = await reader.read(CHUNK)
                except (ConnectionError, OSError):
                    data = b""
                queue.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await sender
        finally:
            sender.cancel()

    async def _send(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._thawed.wait()
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


class BusLink:
    """Three proxies on consecutive ports in front of a broker's bus ``tcp://HOST:PORT``."""

    def __init__(self, bus: str):
        host_port = bus.partition("://")[2]
        host, _, port = host_port.rpartition(":")
        base = int(port)
        for _ in range(50):
            proxies = [TcpProxy([(host, base)])]
            try:
                for i in (1, 2):
                    proxies.append(TcpProxy([(host, base + i)], port=proxies[0].port + i))
                self.proxies = proxies
                break
            except OSError:
                for proxy in proxies:
                    proxy.close()
        else:
            raise RuntimeError("no three consecutive free ports for the bus link")
        self.bus = f"tcp://127.0.0.1:{self.proxies[0].port}"

    @property
    def delay(self) -> float:
        return self.proxies[0].delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        for proxy in self.proxies:
            proxy.delay = seconds

    def freeze(self) -> None:
        for proxy in self.proxies:
            proxy.freeze()

    def unfreeze(self) -> None:
        for proxy in self.proxies:
            proxy.unfreeze()

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()
