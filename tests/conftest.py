"""Shared fixtures: real broker, edge and worker processes on loopback, started and stopped per
module (or per test, for the tests that kill things).

- `Proc` runs `python -m <module> ...` from the repository root, collects stdout lines on a reader
  thread, keeps stderr in a temp file, and parses `READY key=value ...` lines.
- `Cluster` = broker + K edges + one workers supervisor with N workers for an APP.
- `cluster` is the module-scoped default (2 edges, 2 workers, tests/apps/e2e_app.py);
  `cluster_factory` makes private clusters (edge options, worker kills), stopped after the test.
- `js_client` makes phoenix.js clients (tests/jsclient.py) closed after the test.

When a test fails, the stderr of every child process still running is attached to its report
(section "child stderr"), so the server side of a failure is visible without re-running.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parent.parent
E2E_APP = "tests/apps/e2e_app.py"
LOG_LEVEL = os.environ.get("ZCH_TEST_LOG", "info")   # ZCH_TEST_LOG=debug for chatty children
STDERR_TAIL = 12_000                                   # characters of each child's stderr in reports

_live_procs: "weakref.WeakSet[Proc]" = weakref.WeakSet()


def _all_live_procs() -> list["Proc"]:
    # Test modules that `from tests.conftest import ...` load a second copy of this file next to
    # pytest's "conftest"; processes started through either copy belong in failure reports.
    procs: set = set()
    for name, mod in list(sys.modules.items()):
        if name.endswith("conftest") and isinstance(getattr(mod, "_live_procs", None), weakref.WeakSet):
            procs.update(mod._live_procs)
    return sorted(procs, key=lambda p: (p.name, p.pid))


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02,
               message: str | Callable[[], str] | None = None):
    """Poll `predicate` until it returns something truthy (returned) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"condition not met within {timeout}s" + (f": {text}" if text else ""))
        time.sleep(interval)


def parse_ready(line: str) -> dict[str, str] | None:
    """`READY a=1 b=x` -> {"a": "1", "b": "x"}; None for any other line."""
    if not line.startswith("READY"):
        return None
    fields: dict[str, str] = {}
    for part in line.split()[1:]:
        key, sep, value = part.partition("=")
        if sep:
            fields[key] = value
    return fields


class Proc:
    """One child process: `python -m module *args` with cwd = repository root."""

    def __init__(self, module: str, *args: str, name: str | None = None, env: dict | None = None,
                 max_open_files: int | None = None):
        self.module = module
        self.args = [str(a) for a in args]
        self.name = name or module
        self.lines: list[str] = []
        self.ready: list[dict[str, str]] = []
        self._cond = threading.Condition()
        fd, self.stderr_path = tempfile.mkstemp(prefix=f"zch-{self.name}-", suffix=".stderr")
        os.close(fd)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # The child gets its own O_APPEND handle; we read through another one, so reading never
        # disturbs where the child writes.
        with open(self.stderr_path, "ab") as err:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", module, *self.args], cwd=str(ROOT), env=full_env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                preexec_fn=None if max_open_files is None else
                lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_open_files, max_open_files)))
        self.pid = self.popen.pid
        self._reader = threading.Thread(target=self._read, name=f"proc-{self.name}", daemon=True)
        self._reader.start()
        _live_procs.add(self)

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            fields = parse_ready(line)
            with self._cond:
                self.lines.append(line)
                if fields is not None:
                    self.ready.append(fields)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str):
        """Wait (under the lock) until predicate() is truthy; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"{self.name} exited with {self.popen.returncode} before {what}; "
                        f"stdout: {self.lines[-10:]}\nstderr:\n{self.stderr_text()[-STDERR_TAIL:]}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: no {what} within {timeout}s; stdout: {self.lines[-10:]}\n"
                        f"stderr:\n{self.stderr_text()[-STDERR_TAIL:]}")
                self._cond.wait(min(left, 0.1))

    def wait_ready(self, count: int = 1, timeout: float = 10.0) -> list[dict[str, str]]:
        """Wait for `count` READY lines in total; return the first `count`, parsed."""
        return self.wait_for(lambda: len(self.ready) >= count and self.ready[:count],
                             timeout, f"{count} READY line(s)")

    def wait_ready_where(self, pred: Callable[[dict], bool], timeout: float = 10.0) -> dict[str, str]:
        """Wait for a READY line whose fields satisfy `pred` (e.g. a new worker pid)."""
        def find():
            for fields in self.ready:
                if pred(fields):
                    return fields
            return None
        return self.wait_for(find, timeout, "matching READY line")

    def stderr_text(self) -> str:
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code."""
        if self.popen.poll() is None:
            try:
                self.popen.send_signal(signal.SIGTERM)
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._reader.join(2)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        _live_procs.discard(self)
        return self.popen.returncode

    def cleanup(self) -> None:
        try:
            os.unlink(self.stderr_path)
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid}>"


class Cluster:
    """Broker + `edges` edges + a supervisor with `workers` workers running `app`.

    `env` is added to the environment of every child (e.g. the app's secrets)."""

    def __init__(self, app: str = E2E_APP, edges: int = 2, workers: int = 2,
                 edge_args: tuple[str, ...] | list[str] = (), worker_args: tuple[str, ...] | list[str] = (),
                 broker_args: tuple[str, ...] | list[str] = (),
                 log_level: str = LOG_LEVEL, timeout: float = 10.0, env: dict[str, str] | None = None):
        self.app = app
        self.procs: list[Proc] = []
        self.edge_procs: list[Proc] = []
        self.edge_ready: list[dict[str, str]] = []
        self.n_workers = workers
        self.stopped_codes: dict[str, int] = {}
        log = ("--log-level", log_level)
        try:
            self.broker = self._add(Proc("zchannels.broker", "--bus", "tcp://127.0.0.1:0", *broker_args, *log,
                                           name="broker", env=env))
            self.bus = self.broker.wait_ready(1, timeout)[0]["bus"]
            for i in range(edges):
                self.edge_procs.append(self._add(Proc(
                    "edge", "--bus", self.bus, "--port", "0", "--host", "127.0.0.1", *edge_args, *log,
                    name=f"edge{i}", env=env)))
            self.supervisor = self._add(Proc(
                "workers", "--bus", self.bus, "-n", str(workers), *worker_args, *log, app,
                name="workers", env=env))
            for proc in self.edge_procs:
                self.edge_ready.append(proc.wait_ready(1, timeout)[0])
            self.worker_ready = self.supervisor.wait_ready(workers, timeout)
        except BaseException:
            self.stop()
            raise
        self.http_urls = [r["http"] for r in self.edge_ready]
        self.ws_urls = [("wss://" + u[len("https://"):] if u.startswith("https://") else
                         u.replace("http://", "ws://", 1)) + "/socket" for u in self.http_urls]
        self.edge_ids = [r.get("edge") for r in self.edge_ready]

    def _add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def restart_broker(self, *, while_down: Callable[[], None] | None = None, down_s: float = 0.0,
                       frozen: bool = False, timeout: float = 10.0) -> None:
        """Kill the broker (``frozen``: stop it first, so what ``while_down`` makes the peers send
        lands in its unread buffers and dies with it), wait ``down_s``, start a new one on the
        same bus."""
        old = self.broker
        if frozen:
            os.kill(old.pid, signal.SIGSTOP)
        else:
            old.popen.send_signal(signal.SIGKILL)
            old.popen.wait(5)
        if while_down is not None:
            while_down()
        time.sleep(down_s)
        if frozen:
            old.popen.send_signal(signal.SIGKILL)
            old.popen.wait(5)
        restarts = sum(p.name.startswith("broker") for p in self.procs)
        self.broker = self._add(Proc("zchannels.broker", "--bus", self.bus, name=f"broker{restarts + 1}"))
        assert self.broker.wait_ready(1, timeout)[0]["bus"] == self.bus

    @property
    def worker_pids(self) -> list[int]:
        """Pids of the workers announced so far that are still running."""
        pids = []
        for fields in self.supervisor.ready:
            pid = int(fields["pid"])
            if pid_alive(pid) and pid not in pids:
                pids.append(pid)
        return pids

    def wait_new_worker(self, known_pids, timeout: float = 15.0) -> dict[str, str]:
        """Wait for a worker READY line whose pid is not in `known_pids`; return its fields."""
        known = {int(p) for p in known_pids}
        return self.supervisor.wait_ready_where(
            lambda f: "pid" in f and int(f["pid"]) not in known, timeout)

    def raw_url(self, edge: int = 0, vsn: str | None = "2.0.0", **params: str) -> str:
        """ws://.../socket/websocket?...&vsn=... for raw WebSocket clients."""
        from urllib.parse import urlencode
        query = dict(params)
        if vsn is not None:
            query["vsn"] = vsn
        return f"{self.ws_urls[edge]}/websocket" + (f"?{urlencode(query)}" if query else "")

    def stderr(self) -> str:
        return "\n".join(f"----- {p.name} (pid {p.pid}) stderr -----\n{p.stderr_text()[-STDERR_TAIL:]}"
                         for p in self.procs)

    def stop(self) -> dict[str, int]:
        """Stop children in reverse start order (workers, edges, broker); return exit codes."""
        for proc in reversed(self.procs):
            if proc.name not in self.stopped_codes:
                self.stopped_codes[proc.name] = proc.stop()
        return self.stopped_codes

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.cleanup()


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


# ---- reporting ---------------------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed:
        for proc in _all_live_procs():
            text = proc.stderr_text()[-STDERR_TAIL:]
            rep.sections.append((f"child stderr: {proc.name} pid {proc.pid} ({rep.when})", text or "(empty)"))
        clients = item.funcargs.get("js_client") if hasattr(item, "funcargs") else None
        for client in getattr(clients, "clients", []):
            text = client.stderr_text()
            events = "\n".join(map(str, client.events[-40:]))
            rep.sections.append((f"phoenix.js client {client.name}", f"events (last 40):\n{events}\n"
                                 f"stderr:\n{text or '(empty)'}"))


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    """The shared default system for one test module: broker + 2 edges + 2 workers (e2e app)."""
    c = Cluster()
    yield c
    c.stop()
    c.cleanup()


class ClusterFactory:
    def __init__(self) -> None:
        self.clusters: list[Cluster] = []

    def __call__(self, **kwargs) -> Cluster:
        c = Cluster(**kwargs)
        self.clusters.append(c)
        return c


def _factory():
    factory = ClusterFactory()
    yield factory
    for c in factory.clusters:
        c.stop()
    for c in factory.clusters:
        c.cleanup()


@pytest.fixture
def cluster_factory():
    """Private clusters for one test: `cluster_factory(edges=1, workers=1, edge_args=[...])`."""
    yield from _factory()


@pytest.fixture(scope="module")
def module_cluster_factory():
    """Clusters shared by one module, e.g. with special edge options (see test_e2e_badinput)."""
    yield from _factory()


class JsClients:
    def __init__(self) -> None:
        self.clients = []

    def __call__(self, name: str | None = None, env: dict[str, str] | None = None):
        from tests.jsclient import JsClient
        client = JsClient(name or f"js{len(self.clients)}", env=env)
        self.clients.append(client)
        return client

    def close_all(self) -> None:
        for client in self.clients:
            client.close()


@pytest.fixture
def js_client():
    """Factory of phoenix.js clients (`js_client("a")`), all closed after the test."""
    from tests.jsclient import node_available
    if not node_available():
        pytest.skip("node, tests/js/driver.js or node_modules (phoenix, ws) missing")
    clients = JsClients()
    yield clients
    clients.close_all()
