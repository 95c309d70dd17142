"""The broker's watcher of its three bus sockets' ZeroMQ events, in one thread.

libzmq gives a socket one monitor, so everything the broker wants to hear about its
connections goes through this one: closed connections, counted per endpoint, and (with
CURVE) the failed handshakes the gatekeeper logs (``curve.Gatekeeper.watch``).

A closed connection is a peer that left, or one libzmq cut off: a peer announcing a
message over ``--max-bus-message`` loses its connection before the body is read (ZeroMQ
MAXMSGSIZE), and libzmq reports that as an ordinary disconnect, so the count is the
visible trace of such a message.  ZeroMQ peers reconnect by themselves.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger("broker.bus")

Handler = Callable[[str, dict], None]


class BusMonitor:
    def __init__(self, ctx: zmq.Context, sockets: dict[str, zmq.Socket], max_message: int):
        self.sockets = sockets
        self.max_message = max_message
        self.disconnects = {name: 0 for name in sockets}
        self._handlers: list[tuple[int, Handler]] = [(zmq.EVENT_DISCONNECTED, self._disconnected)]
        self._monitors: dict[zmq.Socket, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bus-monitor", daemon=True)

    def add(self, events: int, handler: Handler) -> None:
        """Call ``handler(endpoint_name, event)`` for these events (before ``start``)."""
        self._handlers.append((events, handler))

    def start(self) -> None:
        """Attach the monitors; call it before any other thread uses the sockets."""
        mask = 0
        for events, _ in self._handlers:
            mask |= events
        for name, sock in self.sockets.items():
            mon = sock.get_monitor_socket(mask, addr=f"inproc://bus-monitor-{name}-{id(self)}")
            self._monitors[mon] = name
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for mon, _ in poller.poll(200):
                    event = recv_monitor_message(mon, zmq.NOBLOCK)
                    kind = event.get("event", 0)
                    for events, handler in self._handlers:
                        if kind & events:
                            handler(self._monitors[mon], event)
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                log.error("bus monitor stopped: %s", exc)
        finally:
            for mon in self._monitors:
                mon.close(linger=0)

    def _disconnected(self, name: str, event: dict) -> None:
        n = self.disconnects[name] = self.disconnects[name] + 1
        if n in (1, 10, 100, 1000) or n % 10_000 == 0:
            log.info("bus connection closed on %s: a peer left, or sent a message over "
                     "--max-bus-message %d bytes and was cut off (%d closed so far)",
                     name, self.max_message, n)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
