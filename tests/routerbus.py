"""The broker's ROUTER on an in-process ZeroMQ socket, with DEALER peers, for tests that drive
``broker.router.Router`` message by message (``pump``)."""
from __future__ import annotations

import itertools

import zmq

from zchannels.bus import wire
from zchannels.broker.router import Router

_names = itertools.count()


class RouterBus:
    def __init__(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.endpoint = f"inproc://router-bus-{next(_names)}"
        self.sock.bind(self.endpoint)
        self.peers: list[zmq.Socket] = []

    def peer(self, peer_id: bytes, role: bytes | None = None) -> zmq.Socket:
        """A DEALER with this routing id; with `role`, its first heartbeat already sent."""
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, peer_id)
        dealer.connect(self.endpoint)
        self.peers.append(dealer)
        if role is not None:
            dealer.send(wire.pack(wire.heartbeat(role, b"0")))
        return dealer

    def close(self) -> None:
        for s in (*self.peers, self.sock):
            s.close(0)
        self.ctx.term()


def pump(router: Router, sock: zmq.Socket, count: int) -> None:
    """Let the router handle the next `count` messages."""
    for _ in range(count):
        assert sock.poll(2000), "the router got nothing"
        router.handle(sock.recv_multipart())
