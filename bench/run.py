#!/usr/bin/env python3
"""zchannels benchmark: one command, real processes, figures on stdout.

    .venv/bin/python bench/run.py [--quick] [--conns N] [--subs N] [--msgs N] [--json FILE] ...

Starts a broker, two edges and a worker supervisor (-n 2) running examples/chat/channels.py
on free loopback ports, drives them with bench/loadgen.js (raw Phoenix V2 JSON clients on the
npm `ws` package, one Node process, clients spread evenly over both edges) and measures:

  a. connections  N clients connect + join room:lobby: join time, RSS per joined connection
  b. fan-out      one client publishes "new_msg"; every joined client records the
                  publish -> receive latency. At S subscribers (M messages) and at the large
                  count (10k by default). "blast" publishes all messages back to back
                  (throughput); "paced" keeps one broadcast in flight (latency of a single
                  broadcast at that fan-out).
  c. round trips  C clients doing sequential "ping" pushes for T seconds
  d. fairness     a few clients pipelining pings (many in flight each) while probe clients
                  do sequential pings; p99 of both

Server CPU is utime+stime from /proc/PID/stat summed over every zchannels process (broker,
edges, supervisor and its worker children, found by walking /proc/PID/task/*/children),
sampled right before and after each phase; RSS is VmRSS from /proc/PID/status.
Benchmarks print figures; they are not tests (no pass/fail exit code for missed targets).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")
APP = "examples/chat/channels.py"

TARGETS = {
    "rss_kb_per_conn": 30.0,          # <= 30 KB RSS per connection (all processes)
    "cpu_us_per_delivery": 10.0,      # <= 10 us server CPU per fan-out delivery
    "p99_ms_10k": 200.0,              # p99 < 200 ms at 10k subscribers
    "cpu_us_per_round_trip": 60.0,    # <= 60 us server CPU per round trip
}
PEERS = {
    "rss_kb_per_conn": "Phoenix 1.7: 31 KB",
    "cpu_us_per_delivery": "Phoenix 1.7: 21-26 us",
    "p99_ms_10k": "Phoenix 1.7: ~400 ms",
    "cpu_us_per_round_trip": "Phoenix 1.7: 36-47 us",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# /proc sampling

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        text = _read(f"/proc/{pid}/task/{tid}/children")
        if text:
            out.extend(int(x) for x in text.split())
    return out


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (bounded walk)."""
    seen, todo = [], [pid]
    while todo and len(seen) < 1000:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children_of(p))
    return seen


def cpu_ticks(pid: int) -> int | None:
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2:].split()   # fields from #3 (state) on
    return int(fields[11]) + int(fields[12])       # utime (#14) + stime (#15)


def pss_kb(pid: int) -> int | None:
    """Proportional set size: shared pages (the forked workers share their parent's) split
    between the processes that map them, so a sum over processes counts them once."""
    text = _read(f"/proc/{pid}/smaps_rollup")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def machine_busy_s() -> tuple[float, float]:
    """Non-idle CPU seconds of the whole machine since boot (all cores), and the part of it
    spent in interrupt/softirq context (loopback TCP processing lands there), from /proc/stat."""
    text = _read("/proc/stat") or ""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)   # idle + iowait
            return (sum(v[:8]) - idle) / CLK_TCK, (v[5] + v[6]) / CLK_TCK
    return 0.0, 0.0


def all_proc_ticks() -> dict[int, tuple[str, int]]:
    """utime+stime of every process on the machine: {pid: (comm, ticks)}."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        text = _read(f"/proc/{name}/stat")
        if not text:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        f = text[text.rindex(")") + 2:].split()
        out[int(name)] = (comm, int(f[11]) + int(f[12]))
    return out


def rss_kb(pid: int) -> int | None:
    text = _read(f"/proc/{pid}/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sample:
    """CPU ticks and RSS of every server process, keyed by pid, with role names."""

    def __init__(self, procs: dict[str, subprocess.Popen]):
        self.t = time.monotonic()
        self.machine_s, self.irq_s = machine_busy_s()
        self.cpu: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self.role: dict[int, str] = {}
        for name, p in procs.items():
            for pid in proc_tree(p.pid):
                c, r = cpu_ticks(pid), rss_kb(pid)
                if c is None or r is None:
                    continue
                self.cpu[pid], self.rss[pid] = c, r
                self.role[pid] = name if pid == p.pid else f"{name}.child{pid}"

    @property
    def total_rss_kb(self) -> int:
        return sum(self.rss.values())

    def total_pss_kb(self) -> int | None:
        vals = [pss_kb(pid) for pid in self.rss]
        return None if any(v is None for v in vals) else sum(vals)

    def rss_by_role(self) -> dict[str, int]:
        return {self.role[p]: v for p, v in self.rss.items()}


def cpu_delta(a: Sample, b: Sample) -> dict:
    """Server CPU between two samples, in seconds, total and per process role."""
    per = {}
    for pid, c in b.cpu.items():
        per[b.role[pid]] = (c - a.cpu.get(pid, 0)) / CLK_TCK
    gone = sorted(set(a.cpu) - set(b.cpu))
    new = sorted(set(b.cpu) - set(a.cpu))
    return {"total_s": sum(per.values()), "per_process_s": per, "wall_s": b.t - a.t,
            "machine_busy_s": b.machine_s - a.machine_s, "irq_s": b.irq_s - a.irq_s,
            "pids_gone": [a.role[p] for p in gone], "pids_new": [b.role[p] for p in new]}


# ---------------------------------------------------------------------------------------------
# processes

class Proc:
    def __init__(self, name: str, argv: list[str], tmpdir: str, stdin=None):
        self.name = name
        self.err_path = os.path.join(tmpdir, f"{name}.stderr")
        self.out_path = os.path.join(tmpdir, f"{name}.stdout")
        self.err = open(self.err_path, "wb")
        self.lines: queue.Queue[str] = queue.Queue()
        self.p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.err,
                                  stdin=stdin, start_new_session=True, bufsize=0)
        self._out = open(self.out_path, "w")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in iter(self.p.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self._out.write(line + "\n")
            self._out.flush()
            self.lines.put(line)
        self.lines.put(None)  # EOF marker

    def wait_line(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name}: no line starting {prefix!r} within {timeout:.0f} s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.name}: exited (code {self.p.poll()}) before {prefix!r}")
            if line.startswith(prefix):
                return line

    def stderr_tail(self, n: int = 25) -> str:
        try:
            with open(self.err_path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                f.seek(max(0, size - 64_000))
                return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def mark_shutdown(self) -> None:
        try:
            self.shutdown_offset = os.path.getsize(self.err_path)
        except OSError:
            self.shutdown_offset = None

    def stderr_problems(self, limit: int = 8, during_shutdown: bool = False) -> tuple[int, list[str]]:
        """Count WARNING/ERROR/Traceback lines in the stderr file, before the shutdown began
        (or after it, with during_shutdown); return the count and the first few."""
        count, first = 0, []
        off = getattr(self, "shutdown_offset", None)
        try:
            with open(self.err_path, "rb") as f:
                data = f.read()
                if off is not None:
                    data = data[off:] if during_shutdown else data[:off]
                elif during_shutdown:
                    data = b""
                for raw in data.splitlines():
                    line = raw.decode(errors="replace").rstrip()
                    if " WARNING " in line or " ERROR " in line or " CRITICAL " in line \
                            or line.startswith("Traceback") or "Error:" in line:
                        count += 1
                        if len(first) < limit:
                            first.append(line[:300])
        except OSError:
            pass
        return count, first


def stop_all(procs: list[Proc]) -> None:
    """Stop every process we started, one at a time in the given order: SIGTERM, SIGKILL
    after 5 s; then any descendant (worker) still alive, by its pid."""
    pids: list[int] = []
    for pr in procs:
        if pr.p.poll() is None:
            pids.extend(proc_tree(pr.p.pid))
    for pr in procs:
        if pr.p.poll() is not None:
            continue
        kids = proc_tree(pr.p.pid)
        try:
            pr.p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            pr.p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log(f"{pr.name} (pid {pr.p.pid}) ignored SIGTERM for 5 s: SIGKILL")
            try:
                os.killpg(pr.p.pid, signal.SIGKILL)   # the session/group we created for it
            except ProcessLookupError:
                pass
            try:
                pr.p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(k) for k in kids):
            time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            log(f"pid {pid} still alive after its parent stopped: SIGKILL")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _alive(pid: int) -> bool:
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return False
    return text[text.rindex(")") + 2] != "Z"


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # inherited by the children
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---------------------------------------------------------------------------------------------
# load generator

class LoadGen:
    def __init__(self, tmpdir: str):
        self.proc = Proc("loadgen", ["node", str(ROOT / "bench" / "loadgen.js")], tmpdir,
                         stdin=subprocess.PIPE)
        self.n = 0

    def call(self, cmd: dict, timeout: float) -> dict:
        self.n += 1
        cmd = dict(cmd, id=self.n)
        self.proc.p.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.p.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"loadgen: no answer to {cmd['cmd']} within {timeout:.0f} s")
            try:
                line = self.proc.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"loadgen exited (code {self.proc.p.poll()}):\n{self.proc.stderr_tail()}")
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("id") != self.n:
                continue
            if not msg.get("ok"):
                raise RuntimeError(f"loadgen {cmd['cmd']} failed: {msg.get('error')}")
            return msg["result"]

    def cpu_s(self) -> float:
        c = cpu_ticks(self.proc.p.pid)
        return (c or 0) / CLK_TCK


# ---------------------------------------------------------------------------------------------
# the benchmark

class Bench:
    def __init__(self, args):
        self.args = args
        self.tmpdir = tempfile.mkdtemp(prefix="zchannels-bench-")
        self.procs: list[Proc] = []
        self.server: dict[str, subprocess.Popen] = {}
        self.urls: list[str] = []
        self.lg: LoadGen | None = None
        self.results: dict = {"phases": {}, "errors": []}

    # -- system --------------------------------------------------------------------------
    def start(self) -> None:
        a = self.args
        log(f"process logs in {self.tmpdir}")
        broker = Proc("broker", [PY, "-m", "broker", "--bus", "tcp://127.0.0.1:0"], self.tmpdir)
        self.procs.append(broker)
        bus = broker.wait_line("READY", 30).split("bus=", 1)[1].split()[0]
        self.server["broker"] = broker.p
        workers = Proc("workers", [PY, "-m", "workers", "--bus", bus, "-n", str(a.workers),
                                   a.app], self.tmpdir)
        self.procs.append(workers)
        self.server["workers"] = workers.p
        for i in range(a.edges):
            e = Proc(f"edge{i + 1}", [PY, "-m", "edge", "--bus", bus, "--port", "0"], self.tmpdir)
            self.procs.append(e)
            self.server[f"edge{i + 1}"] = e.p
        for pr in self.procs[2:]:
            line = pr.wait_line("READY", 30)
            http = line.split("http=", 1)[1].split()[0]
            self.urls.append(http.replace("http://", "ws://") + "/socket/websocket")
        for _ in range(a.workers):
            workers.wait_line("READY", 30)
        log(f"system up: bus {bus}, edges {', '.join(self.urls)}, {a.workers} workers")
        self.lg = LoadGen(self.tmpdir)
        self.procs.append(self.lg.proc)

    def sample(self) -> Sample:
        return Sample(self.server)

    def check_alive(self) -> None:
        for pr in self.procs:
            if pr.p.poll() is not None:
                raise RuntimeError(f"{pr.name} exited with code {pr.p.returncode}:\n{pr.stderr_tail()}")

    def settle(self, label: str, max_s: float) -> dict:
        """Wait until the server is idle (< 5% of a core over 1 s); the work done after the last
        client answer (e.g. intercepted broadcasts queued in workers) shows up here."""
        t0 = time.monotonic()
        first = prev = self.sample()
        while time.monotonic() - t0 < max_s:
            time.sleep(1.0)
            cur = self.sample()
            d = cpu_delta(prev, cur)
            prev = cur
            if d["total_s"] < 0.05 * d["wall_s"]:
                break
        tot = cpu_delta(first, prev)
        res = {"settle_s": round(time.monotonic() - t0, 2), "cpu_s": round(tot["total_s"], 3),
               "timed_out": time.monotonic() - t0 >= max_s}
        if res["settle_s"] > 1.5:
            log(f"  {label}: server busy for {res['settle_s']} s after the clients got their "
                f"answers ({res['cpu_s']} s CPU)")
        return res

    def wait_quiet(self) -> None:
        """Other processes on this machine (tests, other benchmarks) distort latencies: wait,
        bounded, until they use less than 10% of one core over a second."""
        if self.args.quiet_wait <= 0:
            return
        ours = {pid for p in self.server.values() for pid in proc_tree(p.pid)} | {self.lg.proc.p.pid}
        t0 = time.monotonic()
        waited = False
        while True:
            a = all_proc_ticks()
            time.sleep(1.0)
            b = all_proc_ticks()
            busy = sorted((((t - a.get(pid, (c, 0))[1]) / CLK_TCK, f"{c}[{pid}]")
                           for pid, (c, t) in b.items() if pid not in ours), reverse=True)
            other = sum(x for x, _ in busy)
            if other < 0.10:
                if waited:
                    log(f"  machine quiet after {time.monotonic() - t0:.0f} s")
                return
            if time.monotonic() - t0 > self.args.quiet_wait:
                msg = (f"machine not quiet after {self.args.quiet_wait:.0f} s (others use {other:.2f} "
                       f"core: {', '.join(f'{n} {x:.2f}' for x, n in busy[:3])}); measuring anyway")
                log("  WARNING " + msg)
                self.results["errors"].append(msg)
                return
            if not waited:
                log(f"  waiting for other processes to go quiet ({other:.2f} core: "
                    f"{', '.join(f'{n} {x:.2f}' for x, n in busy[:3])})")
                waited = True

    def measured(self, cmd: dict, timeout: float) -> tuple[dict, dict, Sample, Sample]:
        """Run one loadgen command between two samples of server CPU and RSS."""
        self.check_alive()
        self.wait_quiet()
        c0 = self.lg.cpu_s()
        all0 = all_proc_ticks()
        s0 = self.sample()
        res = self.lg.call(cmd, timeout)
        s1 = self.sample()
        all1 = all_proc_ticks()
        c1 = self.lg.cpu_s()
        d = cpu_delta(s0, s1)
        d["client_cpu_s"] = c1 - c0
        # CPU used on this machine by other processes (the project's other engineers may run
        # tests at the same time) and in interrupt context (loopback TCP), shown, not subtracted
        ours = set(s0.cpu) | set(s1.cpu) | {self.lg.proc.p.pid}
        others = []
        for pid, (comm, t1) in all1.items():
            if pid in ours:
                continue
            dt = (t1 - all0.get(pid, (comm, 0))[1]) / CLK_TCK
            if dt > 0:
                others.append((dt, f"{comm}[{pid}]"))
        others.sort(reverse=True)
        d["other_cpu_s"] = sum(x for x, _ in others)
        d["other_top"] = [f"{n} {x:.2f} s" for x, n in others[:4]]
        d["irq_cpu_s"] = d["irq_s"]
        if d["other_cpu_s"] > 0.1 * d["wall_s"] and d["other_cpu_s"] > 0.2:
            msg = (f"other processes used {d['other_cpu_s']:.2f} s CPU during {cmd['cmd']} "
                   f"({d['wall_s']:.1f} s wall): {', '.join(d['other_top'])}; latencies may be distorted")
            log("  WARNING " + msg)
            self.results["errors"].append(msg)
        if d["pids_gone"] or d["pids_new"]:
            msg = f"server processes changed during {cmd['cmd']}: gone {d['pids_gone']}, new {d['pids_new']}"
            log("  WARNING " + msg)
            self.results["errors"].append(msg)
        return res, d, s0, s1

    def joined(self) -> int:
        return self.lg.call({"cmd": "stats"}, 30)["joined"]

    def ensure_joined(self, n: int) -> dict | None:
        """Open more clients, or close the newest ones, until exactly n are joined."""
        have = self.joined()
        if have < n:
            res = self.lg.call({"cmd": "open", "n": n - have, "urls": self.urls,
                                "join_payload": self.args.join_payload,
                                "concurrency": self.args.concurrency}, self.args.join_timeout)
            self.settle("extra joins", self.args.settle_timeout)
            return res
        if have > n:
            self.lg.call({"cmd": "close", "keep": n}, 600)
            self.settle("closing clients", self.args.settle_timeout)
        return None

    def heartbeat_all(self) -> None:
        hb = self.lg.call({"cmd": "heartbeat_all"}, 120)
        if hb["replied_ok"] != hb["sent"]:
            msg = f"heartbeat: {hb['replied_ok']}/{hb['sent']} answered"
            log("  WARNING " + msg)
            self.results["errors"].append(msg)

    # -- phases --------------------------------------------------------------------------
    def phase_connections(self) -> None:
        a = self.args
        log(f"== a. connections: {a.conns} clients join room:lobby over {len(self.urls)} edges")
        time.sleep(1.0)
        base = self.sample()
        base_pss = base.total_pss_kb()
        res, d, s0, s1 = self.measured({"cmd": "open", "n": a.conns, "urls": self.urls,
                                        "join_payload": a.join_payload, "concurrency": a.concurrency},
                                       a.join_timeout)
        st = self.settle("joins", a.settle_timeout)
        time.sleep(1.0)
        after = self.sample()
        after_pss = after.total_pss_kb()
        joined = res["joined"]
        delta_kb = after.total_rss_kb - base.total_rss_kb
        per = delta_kb / joined if joined else None
        out = {
            "requested": a.conns, "opened": res["opened"], "joined": joined,
            "open_failed": res["open_failed"], "join_failed": res["join_failed"],
            "join_elapsed_s": res["elapsed_ms"] / 1000, "joins_per_s": res["joins_per_s"],
            "connect_latency_ms": res["connect_latency"], "join_latency_ms": res["join_latency"],
            "settle_after_joins_s": st["settle_s"], "settle_cpu_s": st["cpu_s"],
            "server_cpu_s": round(d["total_s"] + st["cpu_s"], 3),
            "server_cpu_by_process_s": {k: round(v, 3) for k, v in d["per_process_s"].items()},
            "server_cpu_us_per_join": round((d["total_s"] + st["cpu_s"]) / joined * 1e6, 1) if joined else None,
            "client_cpu_s": round(d["client_cpu_s"], 3), "other_cpu_s": round(d["other_cpu_s"], 3),
            "rss_kb_before": base.total_rss_kb, "rss_kb_after": after.total_rss_kb,
            "rss_kb_by_process_before": base.rss_by_role(), "rss_kb_by_process_after": after.rss_by_role(),
            "rss_kb_per_conn": round(per, 2) if per is not None else None,
            "pss_kb_before": base_pss, "pss_kb_after": after_pss,
            "pss_kb_per_conn": round((after_pss - base_pss) / joined, 2)
            if joined and base_pss is not None and after_pss is not None else None,
        }
        self.results["phases"]["connections"] = out
        log(f"  opened {out['opened']}/{a.conns}, joined {joined}, failed opens {out['open_failed']}, "
            f"failed joins {out['join_failed']}")
        log(f"  joining took {out['join_elapsed_s']:.2f} s ({out['joins_per_s']} joins/s; join reply "
            f"p50 {res['join_latency']['p50_ms']} ms p99 {res['join_latency']['p99_ms']} ms) "
            f"+ {st['settle_s']} s until the server was idle")
        log(f"  server CPU for connect+join: {out['server_cpu_s']} s = {out['server_cpu_us_per_join']} us per joined client; "
            "by process (until the last join reply): "
            + ", ".join(f"{k} {v:.2f}" for k, v in d["per_process_s"].items()))
        log(f"  RSS all server processes: {base.total_rss_kb} KB -> {after.total_rss_kb} KB "
            f"(+{delta_kb} KB) = {out['rss_kb_per_conn']} KB per joined connection "
            f"[target <= {TARGETS['rss_kb_per_conn']:.0f} KB; {PEERS['rss_kb_per_conn']}]")
        log("  RSS by process after: " + ", ".join(f"{k} {v} KB" for k, v in after.rss_by_role().items()))
        if out["pss_kb_per_conn"] is not None:
            log(f"  PSS (shared pages counted once) all server processes: {base_pss} KB -> {after_pss} KB "
                f"= {out['pss_kb_per_conn']} KB per joined connection")

    def phase_fanout(self, key: str, subs: int, msgs: int) -> None:
        a = self.args
        log(f"== b. fan-out: {subs} subscribers x {msgs} messages")
        op = self.ensure_joined(subs)
        if op is not None:
            log(f"  opened {op['opened']} more clients, joined {op['joined']} in {op['elapsed_ms'] / 1000:.2f} s")
        have = self.joined()
        if have != subs:
            log(f"  WARNING only {have} of {subs} subscribers joined")
        out = {}
        for mode in a.fanout_modes:
            self.heartbeat_all()
            time.sleep(0.5)
            res, d, _, s1 = self.measured({"cmd": "fanout", "msgs": msgs, "mode": mode,
                                           "gap_ms": a.gap_ms, "quiet_ms": a.quiet_ms},
                                          a.fanout_timeout)
            rec = res["received"]
            cpu_us = d["total_s"] / rec * 1e6 if rec else None
            r = dict(res)
            r["server_cpu_s"] = round(d["total_s"], 3)
            r["server_cpu_by_process_s"] = {k: round(v, 3) for k, v in d["per_process_s"].items()}
            r["server_cpu_us_per_delivery"] = round(cpu_us, 2) if cpu_us is not None else None
            r["client_cpu_s"] = round(d["client_cpu_s"], 3)
            r["server_rss_kb_after"] = s1.total_rss_kb
            r["other_cpu_s"] = round(d["other_cpu_s"], 3)
            r["irq_cpu_s"] = round(d["irq_cpu_s"], 3)
            out[mode] = r
            lat = res["latency"]
            log(f"  [{mode}] {res['subscribers']} subs x {msgs} msgs: received {rec}/{res['expected']} "
                f"(lost {res['lost']}, dup {res['duplicates']}) in {res['span_ms'] / 1000:.3f} s = "
                f"{res['deliveries_per_s']} deliveries/s")
            tgt = ""
            if subs >= 10000:
                tgt = f" [target p99 < {TARGETS['p99_ms_10k']:.0f} ms; {PEERS['p99_ms_10k']}]"
            log(f"  [{mode}] latency publish->receive p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, "
                f"max {lat['max_ms']} ms{tgt}")
            log(f"  [{mode}] server CPU {d['total_s']:.3f} s = {r['server_cpu_us_per_delivery']} us per delivery "
                f"[target <= {TARGETS['cpu_us_per_delivery']:.0f} us; {PEERS['cpu_us_per_delivery']}]; "
                "by process: " + ", ".join(f"{k} {v:.3f}" for k, v in d["per_process_s"].items())
                + f"; client CPU {d['client_cpu_s']:.3f} s")
            log(f"  [{mode}] RSS of all server processes after: {s1.total_rss_kb} KB")
            if mode == "paced" and "per_broadcast_complete_ms" in res:
                pb = res["per_broadcast_complete_ms"]
                log(f"  [paced] one broadcast reaches all subscribers in p50 {pb['p50']} ms, max {pb['max']} ms")
            if res["lost"] or res["duplicates"] or res["publish_errors"]:
                msg = (f"fan-out {subs}x{msgs} {mode}: lost {res['lost']}, duplicates {res['duplicates']}, "
                       f"publish errors {res['publish_errors']}, messages incomplete {res['msgs_incomplete']}")
                log("  WARNING " + msg)
                self.results["errors"].append(msg)
            self.settle(f"fan-out {mode}", a.settle_timeout)
        self.results["phases"][key] = out

    def phase_round_trips(self) -> None:
        a = self.args
        log(f"== c. round trips: {a.rt_clients} clients, sequential pings, "
            + (f"{a.rt_count} each" if a.rt_count else f"{a.rt_seconds} s"))
        self.ensure_joined(max(self.joined(), a.rt_clients))
        self.heartbeat_all()
        time.sleep(0.5)
        res, d, _, _ = self.measured({"cmd": "pings", "clients": a.rt_clients, "depth": 1,
                                      "duration_ms": int(a.rt_seconds * 1000), "count": a.rt_count},
                                     a.rt_seconds + 180)
        n = res["round_trips"]
        out = dict(res)
        out["server_cpu_s"] = round(d["total_s"], 3)
        out["server_cpu_by_process_s"] = {k: round(v, 3) for k, v in d["per_process_s"].items()}
        out["server_cpu_us_per_round_trip"] = round(d["total_s"] / n * 1e6, 2) if n else None
        out["client_cpu_s"] = round(d["client_cpu_s"], 3)
        out["other_cpu_s"] = round(d["other_cpu_s"], 3)
        out["irq_cpu_s"] = round(d["irq_cpu_s"], 3)
        self.results["phases"]["round_trips"] = out
        lat = res["latency"]
        log(f"  {n} round trips in {res['elapsed_ms'] / 1000:.2f} s = {res['round_trips_per_s']} round trips/s; "
            f"error replies {res['errors']}, channel errors {res['channel_errors']}, "
            f"push timeouts {res['push_timeouts']}, closed {res['closed']}")
        log(f"  latency p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
        log(f"  server CPU {d['total_s']:.3f} s = {out['server_cpu_us_per_round_trip']} us per round trip "
            f"[target <= {TARGETS['cpu_us_per_round_trip']:.0f} us; {PEERS['cpu_us_per_round_trip']}]; by process: "
            + ", ".join(f"{k} {v:.3f}" for k, v in d["per_process_s"].items())
            + f"; client CPU {d['client_cpu_s']:.3f} s")
        self._note_ping_failures("round trips", res)
        self.settle("round trips", a.settle_timeout)

    def _note_ping_failures(self, phase: str, res: dict) -> None:
        if res["errors"] or res["closed"] or res["channel_errors"] or res["push_timeouts"] or res["timed_out"]:
            msg = (f"{phase}: {res['errors']} error replies, {res['channel_errors']} phx_error/phx_close, "
                   f"{res['push_timeouts']} pushes unanswered after 10 s, {res['closed']} closed, "
                   f"{res['clients_stopped_by_failure']} client(s) stopped early"
                   + (", phase hit its time bound" if res["timed_out"] else ""))
            log("  WARNING " + msg)
            self.results["errors"].append(msg)

    def phase_fairness(self) -> None:
        a = self.args
        log(f"== d. fairness: {a.fair_clients} clients pipelining {a.fair_depth} pings each + "
            f"{a.fair_probes} sequential probe clients, {a.fair_seconds} s")
        self.ensure_joined(max(self.joined(), a.fair_clients + a.fair_probes))
        self.heartbeat_all()
        time.sleep(0.5)
        res, d, _, _ = self.measured({"cmd": "pings", "clients": a.fair_clients, "depth": a.fair_depth,
                                      "probe_clients": a.fair_probes, "offset": 0,
                                      "probe_offset": a.fair_clients,
                                      "duration_ms": int(a.fair_seconds * 1000)}, a.fair_seconds + 180)
        total = res["round_trips"] + res.get("probe_round_trips", 0)
        out = dict(res)
        out["server_cpu_s"] = round(d["total_s"], 3)
        out["server_cpu_us_per_round_trip"] = round(d["total_s"] / total * 1e6, 2) if total else None
        out["client_cpu_s"] = round(d["client_cpu_s"], 3)
        out["other_cpu_s"] = round(d["other_cpu_s"], 3)
        out["irq_cpu_s"] = round(d["irq_cpu_s"], 3)
        self.results["phases"]["fairness"] = out
        lat, plat = res["latency"], res.get("probe_latency", {})
        log(f"  pipelining clients: {res['round_trips']} round trips, p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
        log(f"  sequential probes:  {res.get('probe_round_trips')} round trips, p50 {plat.get('p50_ms')} ms, "
            f"p99 {plat.get('p99_ms')} ms, max {plat.get('max_ms')} ms")
        inflight = a.fair_clients * a.fair_depth + a.fair_probes
        if res.get("total_round_trips_per_s"):
            log(f"  (queueing alone predicts ~{inflight / res['total_round_trips_per_s'] * 1000:.0f} ms: "
                f"{inflight} pings in flight / throughput; probes far above that would mean starvation)")
        log(f"  total {res.get('total_round_trips_per_s')} round trips/s; server CPU "
            f"{out['server_cpu_us_per_round_trip']} us per round trip; error replies {res['errors']}, "
            f"channel errors {res['channel_errors']}, push timeouts {res['push_timeouts']}, closed {res['closed']}")
        self._note_ping_failures("fairness", res)
        self.settle("fairness", a.settle_timeout)

    # -- run -----------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        failed = False
        try:
            self.results["machine"] = machine()
            self.start()
            self.results["args"] = vars(a)
            self.results["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
            self.results["server_rss_kb_idle"] = self.sample().rss_by_role()
            phases = a.phases
            if "connections" in phases:
                self.phase_connections()
            if "fanout" in phases:
                # the large fan-out first: it reuses the connections phase's clients
                self.phase_fanout("fanout_big", a.subs_big, a.msgs_big)
                self.phase_fanout("fanout", a.subs, a.msgs)
            if "rt" in phases:
                self.phase_round_trips()
            if "fairness" in phases:
                self.phase_fairness()
            self.check_alive()
            stats = self.lg.call({"cmd": "stats"}, 30)
            self.results["client_counters"] = stats["counters"]
            self.results["client_error_reasons"] = stats["error_reasons"]
            self.results["client_first_errors"] = stats["first_errors"]
        except KeyboardInterrupt:
            log("interrupted")
            failed = True
        except Exception as exc:   # report, then stop everything
            log(f"FAILED: {exc}")
            self.results["errors"].append(f"FAILED: {exc}")
            failed = True
        finally:
            try:
                if self.lg and self.lg.proc.p.poll() is None:
                    try:
                        self.lg.call({"cmd": "exit"}, 20)
                    except Exception:
                        pass
            finally:
                for pr in self.procs:
                    pr.mark_shutdown()
                # clients first, then edges, workers, broker: fewer shutdown-only warnings
                order = sorted(self.procs, key=lambda pr: ["loadgen", "edge", "workers", "broker"].index(
                    "edge" if pr.name.startswith("edge") else pr.name))
                stop_all(order)
        self.report(failed)
        return 1 if failed else 0

    def report(self, failed: bool) -> None:
        a = self.args
        print()
        print("=" * 100)
        print("zchannels benchmark summary" + ("  (INCOMPLETE: a phase failed)" if failed else ""))
        m = self.results.get("machine", {})
        print(f"machine: {m.get('nproc')} cores, {m.get('cpu_model')}, {m.get('mem_gib')} GiB; "
              f"RLIMIT_NOFILE {self.results.get('nofile')}; python {m.get('python')}, node {m.get('node')}")
        print(f"code: git {m.get('git_head')}" + (f" + uncommitted changes in {', '.join(m['git_modified_files'])}"
                                                  if m.get("git_modified_files") else ""))
        print(f"system: broker + {a.edges} edge(s) + {a.workers} worker(s) running {a.app}")
        rows = []
        ph = self.results["phases"]
        c = ph.get("connections")
        if c:
            rows.append((f"a. connections: RSS per joined conn ({c['joined']} joined)",
                         f"{c['rss_kb_per_conn']} KB", "<= 30 KB", PEERS["rss_kb_per_conn"]))
            rows.append((f"a. connections: time to join {c['joined']} (+ settle)",
                         f"{c['join_elapsed_s']:.2f} s (+{c['settle_after_joins_s']} s)", "", ""))
            rows.append(("a. connections: server CPU per connect+join",
                         f"{c['server_cpu_us_per_join']} us", "", ""))
        for key in ("fanout", "fanout_big"):
            f = ph.get(key) or {}
            for mode, r in f.items():
                tag = f"b. fan-out {r['subscribers']}x{r['msgs']} {mode}"
                if mode == "blast":   # paced runs idle between broadcasts by design
                    rows.append((f"{tag}: deliveries/s", f"{r['deliveries_per_s']}", "", ""))
                rows.append((f"{tag}: p50 / p99 / max latency",
                             f"{r['latency']['p50_ms']} / {r['latency']['p99_ms']} / {r['latency']['max_ms']} ms",
                             "p99 < 200 ms" if r["subscribers"] >= 10000 else "",
                             PEERS["p99_ms_10k"] if r["subscribers"] >= 10000 else ""))
                rows.append((f"{tag}: server CPU per delivery", f"{r['server_cpu_us_per_delivery']} us",
                             "<= 10 us", PEERS["cpu_us_per_delivery"]))
                rows.append((f"{tag}: lost / duplicated", f"{r['lost']} / {r['duplicates']}", "0", ""))
        r = ph.get("round_trips")
        if r:
            rows.append((f"c. round trips ({r['clients']} clients): round trips/s", f"{r['round_trips_per_s']}", "", ""))
            rows.append(("c. round trips: p50 / p99 latency",
                         f"{r['latency']['p50_ms']} / {r['latency']['p99_ms']} ms", "", ""))
            rows.append(("c. round trips: server CPU per round trip", f"{r['server_cpu_us_per_round_trip']} us",
                         "<= 60 us", PEERS["cpu_us_per_round_trip"]))
        r = ph.get("fairness")
        if r:
            rows.append((f"d. fairness: pipelining ({r['clients']}x depth {r['depth']}) p99",
                         f"{r['latency']['p99_ms']} ms", "", ""))
            rows.append((f"d. fairness: sequential probes ({r.get('probe_clients')}) p99",
                         f"{r.get('probe_latency', {}).get('p99_ms')} ms", "", ""))
        w0 = max([len(x[0]) for x in rows] + [10])
        print(f"{'figure':<{w0}}  {'measured':<26} {'target':<14} peer on this machine")
        print("-" * 100)
        for name, val, tgt, peer in rows:
            print(f"{name:<{w0}}  {val:<26} {tgt:<14} {peer}")
        print("-" * 100)
        cc = self.results.get("client_counters")
        if cc:
            print("client counters: " + json.dumps({k: v for k, v in cc.items() if v}))
        if self.results.get("client_error_reasons"):
            print("client error replies by reason: " + json.dumps(self.results["client_error_reasons"]))
        seen: dict[str, int] = {}
        for e in self.results.get("client_first_errors") or []:
            seen[e] = seen.get(e, 0) + 1
        for e, n in seen.items():
            print(f"  client saw: {e}" + (f"  (x{n} among the first 20 recorded)" if n > 1 else ""))
        for when, flag in (("during the run", False), ("during shutdown", True)):
            problems = {}
            for pr in self.procs:
                n, first = pr.stderr_problems(during_shutdown=flag)
                if n:
                    problems[pr.name] = {"count": n, "first": first}
            self.results["stderr_problems_" + when.split()[-1]] = problems
            if problems:
                print(f"WARNING/ERROR/Traceback lines in process stderr {when}:")
                for name, p in problems.items():
                    print(f"  {name}: {p['count']} line(s)")
                    for line in p["first"]:
                        print(f"    {line}")
            else:
                print(f"no WARNING/ERROR/Traceback lines in any process's stderr {when}")
        for e in self.results["errors"]:
            print(f"problem: {e}")
        if failed:
            for pr in self.procs:
                print(f"--- tail of {pr.name} stderr ({pr.err_path}) ---")
                print(pr.stderr_tail())
        print(f"process logs: {self.tmpdir}")
        if a.json:
            Path(a.json).write_text(json.dumps(self.results, indent=2, default=str) + "\n")
            print(f"figures written to {a.json}")


def machine() -> dict:
    model = ""
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1])
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True).stdout.rstrip()
    head = git("rev-parse", "--short", "HEAD")
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"git_head": head, "git_modified_files": dirty, "nproc": os.cpu_count(), "cpu_model": model,
            "mem_gib": round(mem / 1048576, 1), "kernel": os.uname().release,
            "python": sys.version.split()[0], "node": node}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small run: 1,000 connections, 200 subscribers x 50 msgs, 1,000 x 10, 3 s pings")
    ap.add_argument("--conns", type=int, help="a. clients to connect and join (default 10000; quick 1000)")
    ap.add_argument("--subs", type=int, help="b. subscribers (default 1000; quick 200)")
    ap.add_argument("--msgs", type=int, help="b. messages (default 200; quick 50)")
    ap.add_argument("--subs-big", type=int, help="b. large fan-out subscribers (default 10000; quick 1000)")
    ap.add_argument("--msgs-big", type=int, help="b. large fan-out messages (default 20; quick 10)")
    ap.add_argument("--fanout-modes", default="blast,paced",
                    help="comma list of blast (all messages back to back) and paced (one in flight)")
    ap.add_argument("--gap-ms", type=int, default=20, help="paced fan-out: pause between broadcasts")
    ap.add_argument("--quiet-ms", type=int, default=5000,
                    help="fan-out: stop waiting after this long without a delivery (counts the rest as lost)")
    ap.add_argument("--rt-clients", type=int, default=50, help="c. clients doing sequential pings")
    ap.add_argument("--rt-seconds", type=float, help="c. duration (default 10; quick 3)")
    ap.add_argument("--rt-count", type=int, default=0, help="c. pings per client instead of a duration")
    ap.add_argument("--fair-clients", type=int, default=20, help="d. pipelining clients")
    ap.add_argument("--fair-depth", type=int, default=100, help="d. pings in flight per pipelining client")
    ap.add_argument("--fair-probes", type=int, default=20, help="d. sequential probe clients")
    ap.add_argument("--fair-seconds", type=float, help="d. duration (default 10; quick 3)")
    ap.add_argument("--phases", default="connections,fanout,rt,fairness",
                    help="comma list of connections, fanout, rt, fairness")
    ap.add_argument("--join-payload", default="{}", type=json.loads,
                    help='JSON join payload (default {}). The chat app announces a join when it is '
                         '{"announce": true}: a "user_joined" broadcast that passes through handle_out '
                         'of every member (N joins cost O(N^2) handle_out calls and pushes; add '
                         '"ignore": ["bench"] to filter them in handle_out)')
    ap.add_argument("--concurrency", type=int, default=200, help="connects+joins in flight")
    ap.add_argument("--join-timeout", type=float, default=1800, help="bound for opening clients (s)")
    ap.add_argument("--settle-timeout", type=float, default=600,
                    help="bound for waiting until the server is idle after a phase (s)")
    ap.add_argument("--fanout-timeout", type=float, default=600, help="bound for one fan-out run (s)")
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help="before each measured phase wait up to this long (s) for other processes "
                         "to use < 10%% of a core (0: do not wait)")
    ap.add_argument("--edges", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--app", default=APP)
    ap.add_argument("--json", help="write all figures to this JSON file")
    a = ap.parse_args()
    q = a.quick
    a.conns = a.conns if a.conns is not None else (1000 if q else 10000)
    a.subs = a.subs if a.subs is not None else (200 if q else 1000)
    a.msgs = a.msgs if a.msgs is not None else (50 if q else 200)
    a.subs_big = a.subs_big if a.subs_big is not None else (1000 if q else 10000)
    a.msgs_big = a.msgs_big if a.msgs_big is not None else (10 if q else 20)
    a.rt_seconds = a.rt_seconds if a.rt_seconds is not None else (3 if q else 10)
    a.fair_seconds = a.fair_seconds if a.fair_seconds is not None else (3 if q else 10)
    a.fanout_modes = [m for m in a.fanout_modes.split(",") if m]
    a.phases = [p for p in a.phases.split(",") if p]
    nofile = raise_nofile()
    need = max(a.conns, a.subs_big, a.subs) + 500   # per process: the loadgen holds one fd per client
    if nofile[0] < need:
        log(f"WARNING RLIMIT_NOFILE {nofile[0]} may be too low for {max(a.conns, a.subs_big)} clients")
    log(f"RLIMIT_NOFILE soft/hard {nofile[0]}/{nofile[1]} (inherited by all processes)")
    # Ctrl-C and SIGTERM: KeyboardInterrupt in the main thread, then everything is stopped.
    # (SIGINT explicitly: a shell starting us in the background would have it ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return Bench(a).run()


if __name__ == "__main__":
    sys.exit(main())
