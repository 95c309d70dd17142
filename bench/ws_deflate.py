"""permessage-deflate on and off: the edge's CPU per delivery and the bytes on the wire, for
broadcasts of a JSON payload of about 1 KB to many WebSocket subscribers.

    .venv/bin/python bench/ws_deflate.py [--subscribers 200] [--broadcasts 200] [--rounds 3]

For each mode a broker, one worker and one edge (``--max-rate 0``, plus ``--compress`` when
on) are started; the subscribers are raw WebSocket clients in this process that all offer
permessage-deflate (as browsers and Node's ``ws`` do), so the edge's flag alone decides.  The
broadcasts come from a ``Publisher`` straight onto the bus, so no worker runs per message.
Each round publishes the broadcasts in one burst and waits until every subscriber has every
frame.  Figures per round: the edge process's CPU time (``/proc/PID/schedstat``, ns on the
CPU) divided by the deliveries, and the bytes the subscribers read (frame headers and
payloads; TCP/IP headers not counted).  The median round is printed.  The machine is shared:
compare the two modes of one run, not runs on different days.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import tempfile
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from cluster import PY, Proc, stop_all  # noqa: E402
from wsraw import Sockets, frame, upgrade_request  # noqa: E402

from zchannels.publisher import Publisher  # noqa: E402

TOPIC = "probe:deflate"
OFFER = "permessage-deflate; client_max_window_bits"
WORDS = ("the deploy of build finished green on staging and production after review by the "
         "team while alice bob carol dave asked about metrics latency errors users rooms").split()


def payload(i: int, rng: random.Random) -> dict:
    """About 1 KB of chat-like JSON: a few messages of random words, ids and timestamps."""
    msgs = []
    while len(json.dumps(msgs, separators=(",", ":"))) < 1000:
        msgs.append({"id": i * 100 + len(msgs), "user": rng.choice(WORDS[20:]),
                     "body": " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))),
                     "ts": 1796600000 + rng.randint(0, 99999)})
    return {"seq": i, "messages": msgs}


def cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


class Subscriber:
    """A raw client: counts the bytes and the text/binary frames it reads after its join."""

    def __init__(self, sock, rest: bytes, deflate: bool):
        self.sock, self.buf, self.deflate = sock, bytearray(rest), deflate
        self.frames = 0
        self.bytes = 0
        self.joined = False
        self.first: bytes | None = None   # the first broadcast frame, to check it inflates

    async def join(self) -> None:
        msg = json.dumps(["1", "1", TOPIC, "phx_join", {}]).encode()
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, frame(0x1, msg))
        while self.frames < 1:            # the join reply
            await self._read_some()
        self.frames = self.bytes = 0
        self.joined = True

    async def _read_some(self) -> None:
        chunk = await asyncio.get_running_loop().sock_recv(self.sock, 262144)
        if not chunk:
            raise ConnectionError("the edge closed a subscriber")
        self.bytes += len(chunk)
        self.buf += chunk
        buf, pos = self.buf, 0
        while len(buf) - pos >= 2:
            n, head = buf[pos + 1] & 0x7F, 2
            if n == 126:
                if len(buf) - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                if len(buf) - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if len(buf) - pos < head + n:
                break
            if buf[pos] & 0x0F in (0x1, 0x2):
                self.frames += 1
                if self.first is None and self.joined:
                    self.first = bytes(buf[pos:pos + head + n])
            pos += head + n
        del buf[:pos]

    async def read_until(self, frames: int) -> None:
        while self.frames < frames:
            await self._read_some()


async def open_subscribers(socks: Sockets, host: str, port: int, n: int) -> list[Subscriber]:
    loop = asyncio.get_running_loop()
    subs = []
    for i in range(n):
        sock = socket.socket()
        socks.add(sock)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        await loop.sock_sendall(sock, upgrade_request(
            host, port, f"/socket/websocket?vsn=2.0.0&user=s{i}", {"Sec-WebSocket-Extensions": OFFER}))
        head = bytearray()
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 65536)
            if not chunk:
                raise ConnectionError("upgrade refused")
            head += chunk
        text, _, rest = bytes(head).partition(b"\r\n\r\n")
        assert text.startswith(b"HTTP/1.1 101"), text[:200]
        sub = Subscriber(sock, rest, b"permessage-deflate" in text)
        await sub.join()
        subs.append(sub)
    return subs


def start(tmpdir: str, compress: bool) -> tuple[list[Proc], str, str, int]:
    broker = Proc("broker", [PY, "-m", "zchannels.broker", "--bus", "tcp://127.0.0.1:0"], tmpdir)
    bus = broker.wait_line("READY", 30).split("bus=", 1)[1].split()[0]
    procs = [broker]
    try:
        workers = Proc("workers", [PY, "-m", "zchannels.workers", "--bus", bus, "-n", "1",
                                   str(HERE / "attack_app.py")], tmpdir)
        procs.append(workers)
        edge = Proc("edge", [PY, "-m", "zchannels.edge", "--bus", bus, "--port", "0", "--max-rate", "0",
                             *(["--compress"] if compress else [])], tmpdir)
        procs.append(edge)
        http = edge.wait_line("READY", 30).split("http=", 1)[1].split()[0]
        workers.wait_line("READY", 30)
    except BaseException:
        stop_all(procs[::-1])
        raise
    return procs, bus, http, edge.p.pid


async def run_mode(compress: bool, args, tmpdir: str) -> dict:
    procs, bus, http, edge_pid = start(tmpdir, compress)
    socks = Sockets()
    try:
        host, port = http.split("//", 1)[1].rsplit(":", 1)
        subs = await open_subscribers(socks, host, int(port), args.subscribers)
        agreed = sum(s.deflate for s in subs)
        rng = random.Random(7)
        bodies = [payload(i, rng) for i in range(args.broadcasts)]
        plain_size = len(json.dumps(bodies[0], separators=(",", ":")))
        pub = Publisher(bus)
        pub.wait_connected(10)
        rounds = []
        try:
            for r in range(args.rounds):
                for s in subs:
                    s.frames = s.bytes = 0
                before, t0 = cpu_ns(edge_pid), time.monotonic()
                for body in bodies:
                    pub.broadcast(TOPIC, "new_msg", body)
                await asyncio.wait_for(asyncio.gather(*(s.read_until(args.broadcasts) for s in subs)), 60)
                spent, wall = cpu_ns(edge_pid) - before, time.monotonic() - t0
                deliveries = sum(s.frames for s in subs)
                rounds.append({"cpu_us_per_delivery": spent / deliveries / 1000,
                               "edge_cpu_ms": spent / 1e6, "wall_ms": wall * 1000,
                               "wire_bytes": sum(s.bytes for s in subs),
                               "bytes_per_delivery": sum(s.bytes for s in subs) / deliveries})
        finally:
            pub.close()
        if compress and subs[0].first is not None:
            f = subs[0].first
            head = 4 if f[1] == 126 else 2
            inflated = zlib.decompressobj(-15).decompress(f[head:] + b"\x00\x00\xff\xff") \
                if f[0] & 0x40 else f[head:]
            assert json.loads(inflated)[3] == "new_msg"
        mid = sorted(rounds, key=lambda x: x["cpu_us_per_delivery"])[len(rounds) // 2]
        return {"compress": compress, "agreed": agreed, "payload_bytes": plain_size, **mid,
                "cpu_us_per_delivery_all": [round(x["cpu_us_per_delivery"], 2) for x in rounds]}
    finally:
        socks.close_all()
        stop_all(procs[::-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=200)
    parser.add_argument("--broadcasts", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmpdir = tempfile.mkdtemp(prefix="zchannels-deflate-")
    print(f"{args.subscribers} subscribers x {args.broadcasts} broadcasts, {args.rounds} rounds "
          f"(median shown); logs in {tmpdir}")
    results = [asyncio.run(run_mode(c, args, tmpdir)) for c in (False, True)]
    for res in results:
        print(f"  compress {'on ' if res['compress'] else 'off'}: {res['agreed']} of {args.subscribers} "
              f"agreed deflate; payload {res['payload_bytes']} B; edge CPU "
              f"{res['cpu_us_per_delivery']:.2f} us/delivery (rounds {res['cpu_us_per_delivery_all']}), "
              f"{res['edge_cpu_ms']:.0f} ms a round, wall {res['wall_ms']:.0f} ms; on the wire "
              f"{res['bytes_per_delivery']:.0f} B/delivery, {res['wire_bytes'] / 1e6:.2f} MB a round")
    off, on = results
    print(f"  with compression: {on['bytes_per_delivery'] / off['bytes_per_delivery']:.0%} of the bytes, "
          f"{on['cpu_us_per_delivery'] / off['cpu_us_per_delivery']:.0%} of the CPU per delivery")


if __name__ == "__main__":
    main()
