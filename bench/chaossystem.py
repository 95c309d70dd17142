"""The processes of one chaos run (bench/chaos.py): broker, worker supervisor, edges and the Node
client processes, started on free loopback ports, faulted on command, and all stopped at the end.

Every child runs in a session of its own (a Ctrl-C in the terminal reaches only bench/chaos.py,
which then stops them in order) and gets PR_SET_PDEATHSIG, so even a `kill -9` of the benchmark
takes its broker, edges and supervisor with it (the supervisor's workers exit when their parent
goes, and the Node clients when their stdin closes). Each child's stdout is read by a thread
that stamps every line with the wall-clock time it arrived, so a READY line's time is known to
the millisecond whatever the main loop is doing; stderr goes to a file, scanned afterwards.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
NODE = "node"
CLIENT_JS = ROOT / "bench" / "chaosclient.js"
PR_SET_PDEATHSIG = 1


def now_ms() -> float:
    """Wall-clock milliseconds: the clock Node's Date.now() reads, so both sides compare."""
    return time.time() * 1000.0


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up here, not in the forked child
except (OSError, AttributeError):
    _prctl = None   # not Linux: the finally blocks of bench/chaos.py still stop everything


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not reaped yet) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def parse_ready(line: str) -> dict[str, str] | None:
    if not line.startswith("READY"):
        return None
    return dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)


class Child:
    """One child process; `ready` collects its READY lines as (arrival ms, fields)."""

    def __init__(self, name: str, argv: list[str], logdir: Path, stdin: bool = False):
        self.name = name
        self.err_path = logdir / f"{name}.stderr"
        self.ready: list[tuple[float, dict[str, str]]] = []
        self.answers: queue.Queue = queue.Queue()   # JSON lines that are not READY (Node clients)
        self._cond = threading.Condition()
        with open(self.err_path, "ab") as err:
            self.p = subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                preexec_fn=_die_with_parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.pid = self.p.pid
        self.started = now_ms()
        self.exited_at: float | None = None
        self._reader = threading.Thread(target=self._read, name=f"chaos-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.p.stdout:
            t = now_ms()
            line = raw.decode("utf-8", "replace").rstrip("\n")
            fields = parse_ready(line)
            with self._cond:
                if fields is not None:
                    self.ready.append((t, fields))
                elif line.startswith("{"):
                    try:
                        self.answers.put(json.loads(line))
                    except ValueError:
                        pass
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, count: int = 1, timeout: float = 20.0) -> list[tuple[float, dict[str, str]]]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.ready) < count:
                left = deadline - time.monotonic()
                if left <= 0 or (self.p.poll() is not None and not self._reader.is_alive()):
                    raise RuntimeError(f"{self.name}: {len(self.ready)}/{count} READY line(s) within "
                                       f"{timeout:g} s (exit code {self.p.poll()}); stderr:\n{self.tail()}")
                self._cond.wait(min(left, 0.1))
            return self.ready[:count]

    def first_ready(self) -> float | None:
        with self._cond:
            return self.ready[0][0] if self.ready else None

    def alive(self) -> bool:
        if self.p.poll() is None:
            return True
        if self.exited_at is None:
            self.exited_at = now_ms()
        return False

    def signal(self, sig: int) -> None:
        try:
            self.p.send_signal(sig)
        except ProcessLookupError:
            pass

    def kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    # ---- Node clients: one JSON command per line, one answer per command -----------------

    def command(self, cmd: str, timeout: float = 30.0) -> dict:
        self.p.stdin.write((json.dumps({"cmd": cmd}) + "\n").encode())
        self.p.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive():
                raise RuntimeError(f"{self.name}: no answer to {cmd!r} within {timeout:g} s; "
                                   f"stderr:\n{self.tail()}")
            try:
                msg = self.answers.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if msg.get("answer") == cmd:
                if "error" in msg:
                    raise RuntimeError(f"{self.name}: {cmd} failed: {msg['error']}")
                return msg

    def wait_message(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.alive():
                raise RuntimeError(f"{self.name}: no {kind!r} within {timeout:g} s; stderr:\n{self.tail()}")
            try:
                msg = self.answers.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if msg.get("type") == kind:
                return msg


class System:
    """Broker + supervisor (`-n workers`) + edges of one run, plus the Node client processes."""

    def __init__(self, app: str, workers: int, edges: int, logdir: Path,
                 edge_args: list[str] = (), worker_args: list[str] = (), broker_args: list[str] = ()):
        self.app, self.n_workers, self.n_edges, self.logdir = app, workers, edges, logdir
        self.edge_args, self.worker_args, self.broker_args = list(edge_args), list(worker_args), list(broker_args)
        self.children: list[Child] = []      # every process ever started, in start order
        self.brokers: list[Child] = []
        self.edges: list[list[Child]] = []   # per edge slot: its incarnations
        self.ports: list[int] = []
        self.clients: list[Child] = []
        self.supervisor: Child | None = None
        self.bus = ""

    def _start(self, name: str, argv: list[str], stdin: bool = False) -> Child:
        child = Child(name, argv, self.logdir, stdin)
        self.children.append(child)
        return child

    # ---- start ------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        broker = self._start("broker1", [PY, "-m", "zchannels.broker", "--bus", "tcp://127.0.0.1:0", *self.broker_args])
        self.brokers.append(broker)
        self.bus = broker.wait_ready(1, timeout)[0][1]["bus"]
        self.supervisor = self._start("workers", [PY, "-m", "zchannels.workers", "--bus", self.bus,
                                                  "-n", str(self.n_workers), *self.worker_args, self.app])
        for i in range(self.n_edges):
            self.edges.append([self._start(f"edge{i + 1}.1", self._edge_argv(0))])
        for slot in self.edges:
            port = int(slot[0].wait_ready(1, timeout)[0][1]["http"].rsplit(":", 1)[1])
            self.ports.append(port)
        self.supervisor.wait_ready(self.n_workers, timeout)

    def _edge_argv(self, port: int) -> list[str]:
        return [PY, "-m", "zchannels.edge", "--bus", self.bus, "--host", "127.0.0.1", "--port", str(port), *self.edge_args]

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/socket" for port in self.ports]

    def start_clients(self, n_procs: int, config: dict, timeout: float) -> list[dict]:
        """Spread config["clients"] over n_procs Node processes; wait until each says ready."""
        total = config["clients"]
        first = 0
        for k in range(n_procs):
            count = total // n_procs + (1 if k < total % n_procs else 0)
            if count == 0:
                continue
            cfg = {**config, "first": first, "clients": count}
            first += count
            self.clients.append(self._start(f"clients{k + 1}", [NODE, str(CLIENT_JS), json.dumps(cfg)], stdin=True))
        return [c.wait_message("ready", timeout) for c in self.clients]

    # ---- workers ----------------------------------------------------------------------

    def worker_ready_lines(self) -> list[tuple[float, dict[str, str]]]:
        with self.supervisor._cond:
            return list(self.supervisor.ready)

    def ready_workers(self) -> list[tuple[int, int]]:
        """(pid, slot) of every worker that announced READY and is still running."""
        seen: dict[int, int] = {}
        for _, fields in self.worker_ready_lines():
            if "pid" in fields:
                seen[int(fields["pid"])] = int(fields.get("worker", -1))
        return [(pid, slot) for pid, slot in seen.items() if pid_alive(pid)]

    def kill_random_worker(self, rng: random.Random) -> dict:
        live = self.ready_workers()
        t = now_ms()
        if not live:
            return {"t": t, "pid": None, "slot": None, "ready": 0}
        pid, slot = rng.choice(live)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return {"t": t, "pid": None, "slot": None, "ready": 0}
        return {"t": t, "pid": pid, "slot": slot, "ready": len(live)}

    # ---- broker -----------------------------------------------------------------------

    def kill_broker(self) -> float:
        broker = self.brokers[-1]
        t = now_ms()
        broker.signal(signal.SIGKILL)
        broker.p.wait(5)
        return t

    def start_broker(self) -> Child:
        broker = self._start(f"broker{len(self.brokers) + 1}",
                             [PY, "-m", "zchannels.broker", "--bus", self.bus, *self.broker_args])
        self.brokers.append(broker)
        return broker

    # ---- edges ------------------------------------------------------------------------

    def term_edge(self, index: int) -> float:
        t = now_ms()
        self.edges[index][-1].signal(signal.SIGTERM)
        return t

    def start_edge(self, index: int) -> Child:
        slot = self.edges[index]
        edge = self._start(f"edge{index + 1}.{len(slot) + 1}", self._edge_argv(self.ports[index]))
        slot.append(edge)
        return edge

    # ---- stop -------------------------------------------------------------------------

    def stop(self, grace: float = 5.0) -> list[str]:
        """Stop everything still running: clients, edges, supervisor, broker, each SIGTERM, then
        SIGKILL of its process group after `grace` s. Returns the names that needed the SIGKILL."""
        killed: list[str] = []
        order = (self.clients + [e for slot in self.edges for e in slot]
                 + ([self.supervisor] if self.supervisor else []) + self.brokers)
        for child in self.clients:
            try:
                child.p.stdin.close()   # the Node clients exit on EOF
            except OSError:
                pass
        for child in order:
            if child.p.poll() is None:
                child.signal(signal.SIGTERM)
            try:
                child.p.wait(grace)
            except subprocess.TimeoutExpired:
                killed.append(child.name)
            child.kill_group()   # whatever the child left behind in its group (workers)
            try:
                child.p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for child in self.children:   # anything started but not in `order`
            if child.p.poll() is None:
                child.kill_group()
        return killed
