"""Broadcast fan-out: libzmq's XSUB -> XPUB proxy, in a thread of the broker.

Publishers (workers, publisher clients) connect PUB sockets to the XSUB side;
edges and intercepting workers connect SUB sockets to the XPUB side.  The
proxy forwards subscriptions upstream and messages downstream entirely in C,
so no Python runs per broadcast.  Subscription filtering (exact topic keys,
see ``wire.topic_key``) happens in libzmq too.
"""
from __future__ import annotations

import logging
import threading

import zmq

log = logging.getLogger(__name__)


class Fanout:
    def __init__(self, ctx: zmq.Context, xsub: zmq.Socket, xpub: zmq.Socket):
        self.ctx = ctx
        self.xsub = xsub
        self.xpub = xpub
        self._control_addr = f"inproc://fanout-control-{id(self)}"
        self._control = ctx.socket(zmq.PAIR)
        self._control.bind(self._control_addr)
        self._thread = threading.Thread(target=self._run, name="fanout", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        control = self.ctx.socket(zmq.PAIR)
        control.connect(self._control_addr)
        try:
            zmq.proxy_steerable(self.xsub, self.xpub, None, control)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as exc:
            log.error("fan-out proxy stopped: %s", exc)
        finally:
            control.close(linger=0)

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread.is_alive():
            self._control.send(b"TERMINATE")
            self._thread.join(timeout)
        self._control.close(linger=0)
        self.xsub.close(linger=0)
        self.xpub.close(linger=0)
