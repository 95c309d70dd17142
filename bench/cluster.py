"""The system under test: a broker, the edges and a worker supervisor started as real processes
on free loopback ports (`python -m broker|edge|workers`), each found ready by its `READY ...`
line, and stopped in turn at the end (SIGTERM, then SIGKILL after 5 s).

Every process's stdout and stderr go to files in one temporary directory; the stderr files are
scanned for WARNING/ERROR/Traceback lines for the summary.
"""
from __future__ import annotations

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

from procstats import Sample, alive, proc_tree

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def log(msg: str) -> None:
    """One progress line on stdout, time-stamped, flushed at once (the run takes minutes)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Proc:
    """One child process in a session of its own; its stdout lines are copied to a file and
    queued for wait_line(), its stderr goes straight to a file."""

    def __init__(self, name: str, argv: list[str], tmpdir: str, stdin=None, cwd: Path = ROOT):
        self.name = name
        self.finished = False   # set when it was asked to exit: its end is no failure
        self.err_path = os.path.join(tmpdir, f"{name}.stderr")
        self.out_path = os.path.join(tmpdir, f"{name}.stdout")
        self.err = open(self.err_path, "wb")
        self.lines: queue.Queue[str] = queue.Queue()
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=self.err,
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


class Cluster:
    """The server processes of one benchmark run, plus any client process added to `procs`."""

    def __init__(self, tree: Path = ROOT):
        # The server processes run `python -m zchannels.<part>` in `tree` (its own code comes
        # first on sys.path) with its .venv's Python when it has one: another checkout can be
        # measured with this benchmark and load generator (bench/compare.py).
        self.tree = tree
        venv_py = tree / ".venv" / "bin" / "python"
        self.py = str(venv_py) if tree != ROOT and venv_py.exists() else PY
        self.tmpdir = tempfile.mkdtemp(prefix="zchannels-bench-")
        self.procs: list[Proc] = []
        self.server: dict[str, subprocess.Popen] = {}
        self.urls: list[str] = []

    def start(self, edges: int, workers: int, app: str, edge_processes: int = 0,
              broker_args: list[str] | tuple[str, ...] = ()) -> None:
        """Broker first (the others need its bus endpoint), then the supervisor and the edges;
        returns once every edge and every worker has printed READY. With edge_processes N > 0
        there is one edge instead, started with `--processes N` (N children sharing one port
        with SO_REUSEPORT; its parent prints one READY line for all of them)."""
        log(f"process logs in {self.tmpdir}" + (f"; servers run from {self.tree}" if self.tree != ROOT else ""))
        broker = Proc("broker", [self.py, "-m", "zchannels.broker", "--bus", "tcp://127.0.0.1:0", *broker_args],
                      self.tmpdir, cwd=self.tree)
        self.procs.append(broker)
        bus = broker.wait_line("READY", 30).split("bus=", 1)[1].split()[0]
        self.server["broker"] = broker.p
        sup = Proc("workers", [self.py, "-m", "zchannels.workers", "--bus", bus, "-n", str(workers), app],
                   self.tmpdir, cwd=self.tree)
        self.procs.append(sup)
        self.server["workers"] = sup.p
        # The per-client rate limit (a policy, 200/s by default) would throttle the load
        # generator's pipelined clients; the benchmark measures capacity, so it is off.  All its
        # clients come from 127.0.0.1 and connect hundreds at a time, which the per-address cap
        # on connections still in their upgrade (64) would refuse with 503: it is raised.
        edge_argv = [self.py, "-m", "zchannels.edge", "--bus", bus, "--port", "0", "--max-rate", "0",
                     "--max-pending-per-peer", "100000", "--max-pending", "100000"]
        if edge_processes > 0:
            edges, edge_argv = 1, edge_argv + ["--processes", str(edge_processes)]
        self.edge_argv = edge_argv
        for i in range(edges):
            e = Proc(f"edge{i + 1}", edge_argv, self.tmpdir, cwd=self.tree)
            self.procs.append(e)
            self.server[f"edge{i + 1}"] = e.p
        for pr in self.procs[2:]:
            line = pr.wait_line("READY", 30)
            http = line.split("http=", 1)[1].split()[0]
            self.urls.append(http.replace("http://", "ws://") + "/socket/websocket")
        for _ in range(workers):
            sup.wait_line("READY", 30)
        layout = f"one edge of {edge_processes} processes" if edge_processes > 0 else f"{edges} edges"
        log(f"system up: bus {bus}, {layout} at {', '.join(self.urls)}, {workers} workers")

    def rate_limit_note(self) -> str:
        """What the edges were told (`--max-rate` on their command line) and what each one says
        it enforces (its "rate limit: ..." start-up log line), e.g. "edges run with --max-rate 0
        (per-connection rate limit off: edge1 off, edge2 off)"."""
        argv = self.edge_argv
        flag = argv[argv.index("--max-rate") + 1] if "--max-rate" in argv else "(default)"
        said = {}
        for pr in self.procs:
            if pr.name.startswith("edge"):
                try:
                    text = Path(pr.err_path).read_text(errors="replace")
                except OSError:
                    text = ""
                found = [ln.split("rate limit: ", 1)[1].split(";", 1)[0]
                         for ln in text.splitlines() if "rate limit: " in ln]
                said[pr.name] = "/".join(sorted(set(found))) or "not logged"
        state = "off" if all(v == "off" for v in said.values()) else "ON"
        return (f"edges run with --max-rate {flag} (per-connection rate limit {state}: "
                + ", ".join(f"{k} {v}" for k, v in said.items()) + ")")

    def pin(self, name: str, cpus: set[int]) -> dict[int, set[int]]:
        """Restrict every thread of server process `name` (libzmq's I/O and proxy threads
        included; affinity is per thread) to `cpus`; returns each thread's previous mask."""
        pid = self.server[name].pid
        before = {}
        for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
            try:
                before[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass
        return before

    def affinity(self, name: str) -> dict[int, set[int]]:
        """The CPU mask of every thread of server process `name`."""
        pid = self.server[name].pid
        out = {}
        for tid in (int(t) for t in os.listdir(f"/proc/{pid}/task")):
            try:
                out[tid] = os.sched_getaffinity(tid)
            except ProcessLookupError:
                pass
        return out

    def unpin(self, before: dict[int, set[int]]) -> None:
        for tid, cpus in before.items():
            try:
                os.sched_setaffinity(tid, cpus)
            except ProcessLookupError:
                pass

    def sample(self) -> Sample:
        return Sample(self.server)

    def check_alive(self) -> None:
        for pr in self.procs:
            if pr.p.poll() is not None and not pr.finished:
                raise RuntimeError(f"{pr.name} exited with code {pr.p.returncode}:\n{pr.stderr_tail()}")

    def stop(self) -> None:
        """Stop everything; what the processes log from here on counts as shutdown noise."""
        for pr in self.procs:
            pr.mark_shutdown()
        # clients first, then edges, workers, broker: fewer shutdown-only warnings
        def rank(pr: Proc) -> int:
            for i, prefix in enumerate(("loadgen", "edge", "workers", "broker")):
                if pr.name.startswith(prefix):
                    return i
            return 0
        order = sorted(self.procs, key=rank)
        stop_all(order)


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
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.05)
    for pid in pids:
        if alive(pid):
            log(f"pid {pid} still alive after its parent stopped: SIGKILL")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass



def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit, before anything starts, so every process inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))   # inherited by the children
    return resource.getrlimit(resource.RLIMIT_NOFILE)
