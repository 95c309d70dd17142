"""WebSocket control-frame attacks and abandoned big frames against one edge: figures for
docs/security.md.

    .venv/bin/python bench/ws_control.py [--rate default|off] [--only deaf,readers,big]

Each scenario starts its own broker + edge + 1 worker (the e2e test app) and prints one line:

- deaf: one connection floods 131-byte pings and never reads (15 s at most): how long until
  the edge stops taking them or cuts the connection, the close code, the edge's peak VmRSS.
- readers: 4 connections flood pings and read what comes back, for 10 s, while a canary sends
  a Phoenix heartbeat every 200 ms: canary round trips (p50/p99/max) and heartbeats lost
  (no answer within 3 s).
- big: 300 connections each send 1 MB of a frame announced as 1,040,000 bytes, then hang up;
  7 rounds: the edge's VmRSS with them and 2 s after they closed, then 10 s after the last.

``--rate off`` starts the edge with ``--max-rate 0``, so the floods meet the read yield and
``--max-outbound`` instead of being closed 1008 by the rate limit.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import Cluster  # noqa: E402
from tests.test_e2e_ws_control import MB, RawSock, drain, edge_rss, flood, frame  # noqa: E402


def deaf(c: Cluster) -> str:
    base = edge_rss(c)
    s = RawSock(c, "deaf", rcvbuf=4096)
    stop, out = threading.Event(), {}
    chunk = b"".join(frame(0x9, b"x" * 125) for _ in range(2000))
    sender = threading.Thread(target=flood, args=(s.sock, chunk, stop, out), daemon=True)
    sender.start()
    peak, t0 = base, time.monotonic()
    while sender.is_alive() and time.monotonic() - t0 < 15:
        peak = max(peak, edge_rss(c))
        time.sleep(0.05)
    stop.set()
    sender.join(3)
    flood_s = time.monotonic() - t0
    s.sock.settimeout(20)
    try:
        code = s.read_until_cut()
    except TimeoutError:
        code = "none, still open 20 s later"
    cut_s = time.monotonic() - t0
    peak = max(peak, edge_rss(c))
    s.close()
    return (f"deaf ping flood: {out['sent'] / MB:.0f} MB of pings taken in {flood_s:.1f} s "
            f"({out['end']}), connection ended {cut_s:.1f} s after the start, close code {code}; "
            f"edge RSS {base / MB:.0f} -> peak {peak / MB:.0f} MB")


def readers(c: Cluster) -> str:
    canary = RawSock(c, "canary")
    canary.sock.settimeout(3)
    flooders = [RawSock(c, f"flooder{i}") for i in range(4)]
    stop, outs, threads = threading.Event(), [{} for _ in flooders], []
    chunk = b"".join(frame(0x9, b"f" * 16) for _ in range(5000))
    for f, out in zip(flooders, outs):
        threads += [threading.Thread(target=flood, args=(f.sock, chunk, stop, out, True), daemon=True),
                    threading.Thread(target=drain, args=(f.sock, stop), daemon=True)]
    for t in threads:
        t.start()
    rtts, lost, t0 = [], 0, time.monotonic()
    while time.monotonic() - t0 < 10:
        try:
            rtts.append(canary.heartbeat(f"c{len(rtts) + lost}"))
        except (TimeoutError, OSError):
            lost += 1
            canary.buf.clear()
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(3)
    for f in flooders:
        f.close()
    canary.close()
    rtts.sort()
    pct = (lambda q: f"{rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1e3:.1f}") if rtts else (lambda q: "-")
    sent = sum(o.get("sent", 0) for o in outs) / MB
    ends = sorted({o.get("end", "?") for o in outs})
    return (f"4 reading ping flooders, 10 s ({sent:.0f} MB of pings sent; {', '.join(ends)}): canary "
            f"{len(rtts)} heartbeats answered, {lost} lost, p50 {pct(0.5)} ms, p99 {pct(0.99)} ms, "
            f"max {rtts[-1] * 1e3 if rtts else 0:.1f} ms")


def big(c: Cluster) -> str:
    base = edge_rss(c)
    lines = []
    body = frame(0x2, os.urandom(1_000_000), length=1_040_000)
    for rnd in range(7):
        clients = [RawSock(c, f"big{i}") for i in range(300)]
        for x in clients:
            x.sock.sendall(body)
        time.sleep(1.0)
        with_them = edge_rss(c)
        for x in clients:
            x.close()
        time.sleep(2.0)
        lines.append(f"{with_them / MB:.0f}/{edge_rss(c) / MB:.0f}")
    time.sleep(8)
    return (f"300 x 1 MB unfinished frames, 7 rounds: edge RSS baseline {base / MB:.0f} MB; "
            f"with them / 2 s after closing, per round: {' '.join(lines)} MB; "
            f"10 s after the last: {edge_rss(c) / MB:.0f} MB")


SCENARIOS = {"deaf": deaf, "readers": readers, "big": big}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", choices=["default", "off"], default="default")
    p.add_argument("--only", default=",".join(SCENARIOS))
    args = p.parse_args()
    edge_args = ["--max-rate", "0"] if args.rate == "off" else []
    for name in args.only.split(","):
        c = Cluster(edges=1, workers=1, edge_args=edge_args, log_level="warning")
        try:
            time.sleep(0.5)
            print(f"[rate {args.rate}] {SCENARIOS[name](c)}", flush=True)
        finally:
            c.stop()
            c.cleanup()


if __name__ == "__main__":
    main()
