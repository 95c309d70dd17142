"""The edge's inbound WebSocket hot path, in-process: ``WebSocketProtocol._process`` over
10,000 small masked V2 frames (Phoenix heartbeats) with a dummy transport.

    .venv/bin/python bench/ws_hotpath.py [--root CHECKOUT] [--repeat 30]

Four figures, best of ``--repeat`` runs, in ns a frame: the frames in one read batch or one
frame per read batch (an interactive client), each with decoding and the reply (the full
path) and framing alone (``_deliver`` a no-op).  ``--root`` measures another checkout's edge
with the same script, for a before/after; the machine's noise is a few percent, so alternate.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import timeit
from pathlib import Path

N = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(Path(__file__).resolve().parent.parent),
                        help="checkout whose edge is measured (default: this one)")
    parser.add_argument("--repeat", type=int, default=30, help="runs of each (default 30)")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    asyncio.run(measure(args.repeat))


async def measure(repeat: int) -> None:
    from tornado.util import _websocket_mask as mask

    from zchannels.edge import wsproto
    from zchannels.edge.connection import Connection
    from zchannels.edge.hub import EdgeHub, Limits
    from zchannels.edge.serializer import V2

    class Bus:
        def send(self, frames): pass
        def subscribe(self, key): pass
        def unsubscribe(self, key): pass

    class Transport:
        def set_write_buffer_limits(self, high, low): pass
        def write(self, data): pass
        def pause_reading(self): pass
        def resume_reading(self): pass
        def is_closing(self): return False
        def close(self): pass
        def get_write_buffer_size(self): return 0

    class FramingOnly(wsproto.WebSocketProtocol):
        __slots__ = ()

        def _deliver(self, opcode, payload):
            pass

    def frame(payload: bytes) -> bytes:
        key = os.urandom(4)
        return bytes((0x81, 0x80 | len(payload))) + key + mask(key, payload)

    wsproto.YIELD_EVERY = 1 << 30      # one _process call reads the whole batch
    frames = [frame(b'[null,"%d","phoenix","heartbeat",{}]' % (i % 100)) for i in range(N)]
    batch = b"".join(frames)
    hub = EdgeHub("tcp://127.0.0.1:1", Limits(max_rate=0), edge_id=b"Ebench")
    hub.bus = Bus()
    hub.bus_send = hub.bus.send
    print(f"edge of {os.path.abspath(sys.path[0])}, best of {repeat} runs, ns a frame:")
    for cls, label in ((wsproto.WebSocketProtocol, "with decoding"), (FramingOnly, "framing alone")):
        proto = cls(hub, lambda t: Connection(hub, V2, t, b'{"assigns":{},"id":null}', "bench"), b"")
        proto.connection_made(Transport())

        def one_batch():
            proto.buf += batch
            proto._process()

        def one_by_one():
            for f in frames:
                proto.buf += f
                proto._process()

        for run, how in ((one_batch, f"{N} frames in one batch"), (one_by_one, "one frame a batch")):
            best = min(timeit.repeat(run, number=1, repeat=repeat))
            print(f"  {label:14} {how:26} {best / N * 1e9:7.0f}")


if __name__ == "__main__":
    main()
