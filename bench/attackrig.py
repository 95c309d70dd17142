"""The test rig of bench/attack.py: a fresh system per attack, RSS sampled from /proc, and the
canary (bench/canary.js, phoenix.js in Node) whose experience is the verdict.

- `System`: broker + workers supervisor (2 workers) + one edge, default flags, on free loopback
  ports, started and stopped like bench/cluster.py does it (READY lines, SIGTERM then SIGKILL).
- `RssSampler`: VmRSS of the edge and the broker every 100 ms on a thread of its own.
- `Canary`: the Node process, its JSON lines collected on a thread; `stats(t0, t1)` summarises
  the pings sent and the fresh connections started in a time window.
"""
from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from cluster import PY, ROOT, Proc, log, stop_all
from procstats import rss_kb

CANARY_JS = Path(__file__).resolve().parent / "canary.js"
NODE = shutil.which("node") or "node"


class ServerProc(Proc):
    """cluster.Proc (stdout lines queued for wait_line, stderr to a file, a session of its own)
    started from `root`, a checkout of the servers, so the same benchmark can attack another
    version of the code; a checkout other than ours gets no bytecode files written into it."""

    def __init__(self, name: str, argv: list[str], tmpdir: str, root: Path = ROOT):
        self.name = name
        self.finished = False
        self.err_path = os.path.join(tmpdir, f"{name}.stderr")
        self.out_path = os.path.join(tmpdir, f"{name}.stdout")
        self.err = open(self.err_path, "wb")
        self.lines: queue.Queue[str] = queue.Queue()
        env = dict(os.environ)
        if Path(root).resolve() != ROOT:
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.p = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=self.err,
                                  start_new_session=True, bufsize=0)
        self._out = open(self.out_path, "w")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


class System:
    """One fresh system: `bus` (base endpoint), `http` (http://127.0.0.1:PORT), the edge's
    and the broker's pids; `stop()` ends every process it started. `root` is the checkout whose
    servers run (ours by default)."""

    def __init__(self, app: str, workers: int, tmpdir: str, edge_args: list[str] | None = None,
                 root: Path = ROOT):
        self.tmpdir = tmpdir
        self.procs: list[Proc] = []
        try:
            broker = self._add(ServerProc("broker", [PY, "-m", "zchannels.broker", "--bus", "tcp://127.0.0.1:0"],
                                          tmpdir, root))
            self.bus = broker.wait_line("READY", 30).split("bus=", 1)[1].split()[0]
            sup = self._add(ServerProc("workers", [PY, "-m", "zchannels.workers", "--bus", self.bus, "-n", str(workers),
                                                   app], tmpdir, root))
            edge = self._add(ServerProc("edge", [PY, "-m", "zchannels.edge", "--bus", self.bus, "--port", "0",
                                                 *(edge_args or [])], tmpdir, root))
            self.http = edge.wait_line("READY", 30).split("http=", 1)[1].split()[0]
            for _ in range(workers):
                sup.wait_line("READY", 30)
        except BaseException:
            self.stop()
            raise
        self.broker_pid, self.edge_pid = broker.p.pid, edge.p.pid
        hostport = self.http.split("://", 1)[1]
        self.host, self.port = hostport.rsplit(":", 1)[0], int(hostport.rsplit(":", 1)[1])
        self.ws_url = "ws://" + hostport + "/socket"

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def alive(self) -> dict[str, bool]:
        return {p.name: p.p.poll() is None for p in self.procs}

    def tracebacks(self) -> int:
        """Tracebacks in the stderr of every process so far (an attack should cause none)."""
        n = 0
        for p in self.procs:
            try:
                with open(p.err_path, "rb") as f:
                    n += f.read().count(b"Traceback (most recent call last)")
            except OSError:
                pass
        return n

    def stop(self) -> None:
        order = sorted(self.procs, key=lambda p: ("edge", "workers", "broker").index(p.name))
        stop_all(order)


class RssSampler:
    """VmRSS (kB) of named pids every `interval` s, kept as (time.time(), {name: kB})."""

    def __init__(self, pids: dict[str, int], interval: float = 0.1):
        self.pids, self.interval = pids, interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), {n: rss_kb(p) or 0 for n, p in self.pids.items()}))
            self._stop.wait(self.interval)

    def window(self, name: str, t0: float, t1: float) -> list[int]:
        return [s[name] for t, s in list(self.samples) if t0 <= t <= t1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


class Canary:
    """bench/canary.js on the edge at `ws_url`; `events` holds its JSON lines as they come."""

    def __init__(self, ws_url: str, tmpdir: str, ping_ms: int = 200, ping_timeout_ms: int = 5000,
                 fresh_ms: int = 2000, fresh_timeout_ms: int = 10000):
        self.ping_timeout_s = ping_timeout_ms / 1000
        self.fresh_timeout_s = fresh_timeout_ms / 1000
        cfg = {"url": ws_url, "topic": "room:lobby", "ping_ms": ping_ms, "ping_timeout_ms": ping_timeout_ms,
               "fresh_ms": fresh_ms, "fresh_timeout_ms": fresh_timeout_ms}
        self.events: list[dict] = []
        self._cond = threading.Condition()
        self.err = open(os.path.join(tmpdir, "canary.stderr"), "wb")
        self.p = subprocess.Popen([NODE, str(CANARY_JS), json.dumps(cfg)], cwd=ROOT, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="canary-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in iter(self.p.stdout.readline, b""):
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            with self._cond:
                self.events.append(ev)
                self._cond.notify_all()

    def wait_joined(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(e.get("type") == "joined" for e in self.events):
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise RuntimeError(f"canary did not join within {timeout:.0f} s "
                                       f"(exit code {self.p.poll()}, events {self.events[-5:]})")
                self._cond.wait(min(left, 0.2))

    def settle(self, t1: float) -> None:
        """Wait until every ping sent and every fresh connect started by t1 (time.time()) has
        its outcome; bounded by their timeouts."""
        deadline = time.monotonic() + max(self.ping_timeout_s, self.fresh_timeout_s) + 2
        ms1 = t1 * 1000
        while time.monotonic() < deadline:
            with self._cond:
                evs = list(self.events)
            sent = {e["seq"] for e in evs if e["type"] == "sent" and e["sent"] <= ms1}
            done = {e["seq"] for e in evs if e["type"] in ("ping", "ping_lost")}
            started = sum(1 for e in evs if e["type"] == "fresh_start" and e["started"] <= ms1)
            finished = sum(1 for e in evs if e["type"] == "fresh" and e["started"] <= ms1)
            if sent <= done and finished >= started:
                return
            time.sleep(0.1)

    def stats(self, t0: float, t1: float) -> dict:
        """What the canary saw for pings sent and fresh connects started in [t0, t1] (time.time())."""
        with self._cond:
            evs = list(self.events)
        ms0, ms1 = t0 * 1000, t1 * 1000
        rtts = sorted(e["rtt"] for e in evs if e["type"] == "ping" and ms0 <= e["sent"] <= ms1)
        sent = sum(1 for e in evs if e["type"] == "sent" and ms0 <= e["sent"] <= ms1)
        lost = sent - len(rtts)   # error, timeout, or no outcome at all (the canary died)
        fresh = [e for e in evs if e["type"] == "fresh" and ms0 <= e["started"] <= ms1]
        fresh_started = sum(1 for e in evs if e["type"] == "fresh_start" and ms0 <= e["started"] <= ms1)
        ok = [e for e in fresh if e["ok"]]
        failed_why: dict[str, int] = {}
        for e in fresh:
            if not e["ok"]:
                key = (e.get("why") or "?") + (f" ({e['errors'][0]})" if e.get("errors") else "")
                failed_why[key] = failed_why.get(key, 0) + 1
        closes = [e for e in evs if e["type"] in ("sock_close", "chan_error") and ms0 <= e["t"] <= ms1]
        if fresh_started > len(fresh):
            failed_why["no outcome"] = fresh_started - len(fresh)
        return {"pings_sent": sent, "pings_lost": lost,
                "p50_ms": pct(rtts, 50), "p99_ms": pct(rtts, 99), "max_ms": rtts[-1] if rtts else None,
                "fresh_attempted": fresh_started, "fresh_joined": len(ok),
                "fresh_slowest_ms": max((e["ms"] for e in fresh), default=None),
                "fresh_failed": failed_why, "main_socket_drops": len(closes)}

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
                self.p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._reader.join(2)
        self.err.close()


def pct(sorted_values: list, q: float):
    """The q-th percentile (nearest rank) of sorted values, or None when there are none."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


__all__ = ["System", "RssSampler", "Canary", "log", "pct"]
