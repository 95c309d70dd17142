"""Figures for docs/security.md: what one oversized bus message costs the broker, and what
the role check costs per routed message.

    python -m bench.bus_guard oversize [--mb 300] [--max-bus-message BYTES]
    python -m bench.bus_guard router

`oversize` starts a broker, connects a subscriber for one topic (so a publisher's message is
really sent) and a raw ZeroMQ PUB on publish-in, or a raw DEALER on the routing endpoint, sends
one message of --mb MB from each in turn, and prints the broker's RSS and peak RSS (VmHWM) and
whether the sender was disconnected.  Give --max-bus-message 1073741824 to see it without the
limit.  `router` times Router.handle on a null socket (IN, PUSH, a placed JOIN).
"""
from __future__ import annotations

import argparse
import re
import sys
import time

import zmq

from zchannels.broker import router as router_mod
from zchannels.bus import wire
from zchannels.broker.router import Router
from tests.conftest import Proc


def vm_mb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) // 1024


def oversize(mb: int, broker_args: list[str]) -> None:
    broker = Proc("zchannels.broker", "--bus", "tcp://127.0.0.1:0", *broker_args)
    ctx = zmq.Context()
    try:
        bus = broker.wait_ready(1)[0]["bus"]
        router_ep, publish_ep, subscribe_ep = wire.bus_endpoints(bus)
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"t:1\x00")
        sub.connect(subscribe_ep)
        for kind, endpoint in ((zmq.PUB, publish_ep), (zmq.DEALER, router_ep)):
            sender = ctx.socket(kind)
            sender.setsockopt(zmq.LINGER, 0)
            if kind == zmq.PUB:
                sender.setsockopt(zmq.XPUB_NODROP, 1)
            monitor = sender.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
            sender.connect(endpoint)
            monitor.poll(5000)
            monitor.recv_multipart()
            time.sleep(0.5)   # the subscription reaches the PUB
            before, peak_before = vm_mb(broker.pid, "VmRSS"), vm_mb(broker.pid, "VmHWM")
            body = bytearray(mb << 20)
            body[:5] = b"t:1\x00\x01"
            started = time.monotonic()
            sender.send(body, copy=False)
            cut = monitor.poll(20_000)
            took = time.monotonic() - started
            del body
            time.sleep(1)
            name = "PUB on publish-in" if kind == zmq.PUB else "DEALER on routing"
            print(f"{name:18s} {mb} MB: broker RSS {before} -> {vm_mb(broker.pid, 'VmRSS')} MB, "
                  f"peak {peak_before} -> {vm_mb(broker.pid, 'VmHWM')} MB, sender "
                  + (f"disconnected after {took:.2f}s" if cut else "still connected after 20 s"))
            monitor.close(0)
            sender.close(0)
        sub.close(0)
    finally:
        ctx.term()
        broker.stop()
        broker.cleanup()


class NullSocket:
    def setsockopt(self, *args) -> None:
        pass

    def send_multipart(self, frames, flags=0) -> None:
        pass


def router_cost(rounds: int = 5, n: int = 200_000) -> None:
    router_mod.PLACE_FRESH = 1e9   # the worker below never heartbeats again
    router = Router(NullSocket())
    edge, worker = b"E1-aaaa", b"Ww0-bbbb"
    router.handle([edge, wire.pack(wire.heartbeat(wire.ROLE_EDGE, b"0"))])
    router.handle([worker, wire.pack(wire.heartbeat(wire.ROLE_WORKER, b"0"))])
    messages = {
        "IN": [edge, wire.pack(wire.inbound(worker, b"12", b"room:1", b"1", b"2", b"ev", b'{"a":1}', wire.JSON))],
        "PUSH": [worker, wire.pack(wire.push(edge, b"12", b"room:1", b"1", b"ev", b'{"a":1}', wire.JSON))],
        "JOIN (placed)": [edge, wire.pack(wire.join(b"", b"12", b"room:1", b"1", b"2", b"{}", b"{}"))],
    }
    handle = router.handle
    for name, msg in messages.items():
        best = float("inf")
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(n):
                handle(msg)
            best = min(best, (time.perf_counter() - started) / n)
        print(f"{name:14s} {best * 1e9:6.0f} ns/message")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bus_guard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["oversize", "router"])
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--max-bus-message", type=int, default=None)
    args = parser.parse_args(argv)
    if args.what == "router":
        router_cost()
    else:
        extra = [] if args.max_bus_message is None else ["--max-bus-message", str(args.max_bus_message)]
        oversize(args.mb, extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
