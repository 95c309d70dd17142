"""Fuzz a live edge: thousands of random and mutated frames over real connections, while
other clients chat on the same edge and must not lose a message.

    .venv/bin/python bench/fuzz.py [--frames 20000] [--seconds 120] [--seed N]

It starts broker + one edge + 2 workers (the chat example), opens fuzzing connections that
each send a burst of hostile frames (mutated Phoenix V2/V1 messages, random JSON, random
binary kinds, broken WebSocket framing: unmasked, reserved bits, bad opcodes, oversize,
fragments out of order, garbage bytes) and reconnect when the edge closes them, and at the
same time 4 chat clients exchange sequence-numbered messages.  It reports frames sent,
connections, close codes seen, server crashes (a process that exited or logged a
traceback: must be 0) and what the chat clients lost (must be 0).  Bounded by --frames and
--seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import logging
import os
import random
import struct
import sys
import time
from urllib.parse import urlsplit

from cluster import Cluster, log, raise_nofile

CHAT_CLIENTS = 4
CHAT_INTERVAL = 0.02


def client_frame(payload: bytes, opcode: int = 1, fin: bool = True, mask: bool = True,
                 rsv: int = 0, length: int | None = None) -> bytes:
    """A client->server WebSocket frame; every field may be made wrong on purpose."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += struct.pack("!BH", mbit | 126, n)
    else:
        head += struct.pack("!BQ", mbit | 127, n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class Mutator:
    """Hostile frames, most of them close to valid so they reach deep into the edge."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def valid_message(self) -> bytes:
        r = self.rng
        topic = r.choice(["room:lobby", "room:x", "phoenix", "", "room:" + "z" * r.randint(0, 300)])
        event = r.choice(["phx_join", "phx_leave", "heartbeat", "new_msg", "ping", "x" * 40])
        payload = r.choice([{}, {"body": "hi"}, [], None, 1, "s", {"body": {"deep": [1, 2]}}])
        refs = [r.choice([None, "1", str(r.randint(0, 10**6)), 7, ""]) for _ in range(2)]
        return json.dumps([*refs, topic, event, payload]).encode()

    def mutate(self, data: bytes) -> bytes:
        r = self.rng
        data = bytearray(data)
        for _ in range(r.randint(1, 4)):
            choice = r.random()
            if choice < 0.3 and data:
                data[r.randrange(len(data))] = r.randrange(256)
            elif choice < 0.5 and data:
                del data[r.randrange(len(data)):]
            elif choice < 0.7:
                data[r.randrange(len(data) + 1):0] = bytes(r.randrange(256) for _ in range(r.randint(1, 8)))
            elif choice < 0.85:
                data += data[: r.randint(0, len(data))]
            else:
                data = bytearray(r.choice([b"[", b"]", b"{}", b"null", b"\xff\xfe", b"[[[[[[[[", b"\x00"]))
        return bytes(data)

    def binary_message(self) -> bytes:
        r = self.rng
        kind = r.choice([0, 0, 0, 1, 2, 3, 255])
        lens = [r.randint(0, 12) for _ in range(4)]
        body = bytes(r.randrange(256) for _ in range(sum(lens) + r.randint(0, 20)))
        return bytes([kind, *lens]) + body[: r.randint(0, len(body))]

    def frame(self) -> bytes:
        r = self.rng
        pick = r.random()
        if pick < 0.35:
            return client_frame(self.mutate(self.valid_message()))
        if pick < 0.5:
            return client_frame(self.valid_message())
        if pick < 0.65:
            return client_frame(self.binary_message(), opcode=2)
        if pick < 0.72:
            return client_frame(self.valid_message(), mask=False)
        if pick < 0.78:
            return client_frame(self.valid_message(), rsv=r.randint(1, 7))
        if pick < 0.84:
            return client_frame(b"x" * r.randint(0, 200), opcode=r.choice([3, 4, 5, 6, 7, 11, 15]))
        if pick < 0.88:
            return client_frame(b"", length=r.choice([2**20, 2**31, 2**62]))
        if pick < 0.93:
            return client_frame(self.valid_message(), opcode=r.choice([0, 1]), fin=r.random() < 0.5)
        if pick < 0.96:
            return client_frame(os.urandom(r.randint(0, 140)), opcode=r.choice([8, 9, 10]))
        return os.urandom(r.randint(1, 64))


async def handshake(host: str, port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    status = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if b" 101 " not in status.split(b"\r\n", 1)[0]:
        writer.close()
        raise ConnectionError(status.split(b"\r\n", 1)[0].decode(errors="replace"))
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


class Stats:
    def __init__(self) -> None:
        self.frames = 0
        self.connections = 0
        self.refused = 0
        self.closes: collections.Counter = collections.Counter()


async def fuzzer(url: str, mutator: Mutator, stats: Stats, budget: list[int], deadline: float) -> None:
    u = urlsplit(url)
    path = f"{u.path}?vsn={mutator.rng.choice(['2.0.0', '2.0.0', '1.0.0'])}"
    while budget[0] > 0 and time.monotonic() < deadline:
        try:
            reader, writer = await handshake(u.hostname, u.port, path)
        except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            stats.refused += 1
            await asyncio.sleep(0.05)
            continue
        stats.connections += 1
        burst = min(budget[0], mutator.rng.randint(1, 60))
        budget[0] -= burst
        try:
            for _ in range(burst):
                writer.write(mutator.frame())
                stats.frames += 1
            await writer.drain()
            code = await asyncio.wait_for(_until_close(reader), 2)
            stats.closes[code] += 1
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, OSError):
            stats.closes["no close frame within 2 s (still open, or reset)"] += 1
        finally:
            writer.close()


async def _until_close(reader: asyncio.StreamReader) -> int | str:
    while True:
        opcode, payload = await read_frame(reader)
        if opcode == 8:
            return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else "no code"


class Chatter:
    """A well-behaved client on room:lobby that sends numbered messages and records all it gets."""

    def __init__(self, name: str):
        self.name = name
        self.sent = 0
        self.received: dict[str, set[int]] = collections.defaultdict(set)

    async def run(self, url: str, stop: asyncio.Event) -> None:
        u = urlsplit(url)
        reader, writer = await handshake(u.hostname, u.port, f"{u.path}?vsn=2.0.0&user={self.name}")
        writer.write(client_frame(json.dumps(["1", "1", "room:lobby", "phx_join", {}]).encode()))
        recv = asyncio.create_task(self._receive(reader))
        await asyncio.sleep(0.5)
        ref = 1
        while not stop.is_set():
            ref += 1
            body = f"{self.name}:{self.sent}"
            writer.write(client_frame(json.dumps(["1", str(ref), "room:lobby", "new_msg", {"body": body}]).encode()))
            self.sent += 1
            await asyncio.sleep(CHAT_INTERVAL)
        await asyncio.sleep(2.0)   # let the last broadcasts arrive
        recv.cancel()
        writer.close()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        while True:
            _opcode, payload = await read_frame(reader)
            msg = json.loads(payload)
            if msg[3] == "new_msg":
                sender, seq = msg[4]["body"].rsplit(":", 1)
                self.received[sender].add(int(seq))


async def campaign(url: str, args) -> tuple[Stats, list[Chatter]]:
    rng = random.Random(args.seed)
    stats = Stats()
    budget = [args.frames]
    deadline = time.monotonic() + args.seconds
    chatters = [Chatter(f"chat{i}") for i in range(CHAT_CLIENTS)]
    stop = asyncio.Event()
    chat_tasks = [asyncio.create_task(c.run(url, stop)) for c in chatters]
    await asyncio.sleep(1.0)
    fuzzers = [fuzzer(url, Mutator(random.Random(rng.random())), stats, budget, deadline)
               for _ in range(args.connections)]
    await asyncio.gather(*fuzzers)
    stop.set()
    await asyncio.gather(*chat_tasks)
    return stats, chatters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--connections", type=int, default=8, help="concurrent fuzzing connections")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    args.seed = args.seed if args.seed is not None else random.randrange(2**32)
    raise_nofile()
    logging.getLogger("asyncio").setLevel(logging.ERROR)   # writes after the edge hung up
    cluster = Cluster()
    try:
        cluster.start(edges=1, workers=2, app="examples/chat/channels.py")
        url = cluster.urls[0]
        log(f"fuzzing {url} with seed {args.seed}: up to {args.frames} frames, {args.seconds:.0f} s")
        started = time.monotonic()
        stats, chatters = asyncio.run(campaign(url, args))
        elapsed = time.monotonic() - started
        exited = [pr.name for pr in cluster.procs if pr.p.poll() is not None]
        tracebacks = sum(open(pr.err_path, errors="replace").read().count("Traceback")
                         for pr in cluster.procs)
    finally:
        cluster.stop()
    lost = 0
    for receiver in chatters:
        for sender in chatters:
            got = receiver.received.get(sender.name, set())
            lost += sender.sent - len(got & set(range(sender.sent)))
    print(f"\nseed {args.seed}: {stats.frames} hostile frames over {stats.connections} connections "
          f"in {elapsed:.1f} s ({stats.refused} handshakes refused)")
    print("close codes seen: " + ", ".join(f"{k}: {v}" for k, v in stats.closes.most_common()))
    print(f"server processes exited: {len(exited)} {exited or ''}; tracebacks logged: {tracebacks}")
    sent = sum(c.sent for c in chatters)
    print(f"chat: {len(chatters)} clients sent {sent} messages, each to {len(chatters)} receivers; "
          f"lost deliveries: {lost}")
    crashes = len(exited) + tracebacks
    print(f"RESULT crashes={crashes} lost={lost}")
    return 0 if crashes == 0 and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
