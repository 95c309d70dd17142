"""`zchannels dev`: broker, one edge and a workers supervisor on this machine.

Each runs as its own process, exactly as in production; this command only
starts them in order, forwards their output, and stops them together.

Starting is all or nothing.  Until the broker, the edge and a first worker are all up, the
children's output is held back; if one of them fails first, every child is stopped at once,
the held output (their READY lines among it) is dropped, and the failing child's error is
printed as one line (``zchannels dev: error: ...``), exit code 2 for a configuration mistake.
Only a start that worked prints the children's output and "zchannels dev running: open ...".

The status page is on here (it is off by default on a production edge): with a
token from ``--status-token`` or env ZCHANNELS_STATUS_TOKEN, else a random one, which
is printed with the page's URL and handed to the edge through its environment (not
its command line, which other users of the machine can read).  ``--status-token off``
turns the page off.

With ``--reload`` the app's source files are watched (zchannels/reload.py) and a change
rolls the workers onto the new code.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from zchannels.bus.logsetup import setup_logging
from zchannels.bus.startup import STARTUP_ERROR_EXIT
from zchannels.edge.origin import OriginCheck
from zchannels.reload import SourceWatcher, watched_root

log = logging.getLogger("dev")

START_TIMEOUT = 20.0    # seconds for the broker, the edge and a first worker to come up
STOP_TIMEOUT = 10.0     # after SIGTERM, before SIGKILL

# How a child states the mistake it stopped for: the command line's one line, or a log line.
_CLI_ERROR = re.compile(r"^zchannels [\w-]+: error: (.*)$")
_LOG_ERROR = re.compile(r"^\S+ \S+ (?:ERROR|CRITICAL) \S+\[\d+\] \S+: (.*)$")


def status_token_of(args) -> str | None:
    """The status page's token: --status-token, env ZCHANNELS_STATUS_TOKEN, else a fresh one;
    None for 'off'."""
    token = getattr(args, "status_token", None) or os.environ.get("ZCHANNELS_STATUS_TOKEN")
    if token == "off":
        return None
    return token or secrets.token_urlsafe(16)


def _watcher(app: str) -> SourceWatcher | None:
    root = watched_root(app)
    if root is None:
        log.warning("--reload: cannot find the source of %s; not watching", app)
        return None
    watcher = SourceWatcher(root)
    log.info("--reload: watching %d Python file(s) under %s", len(watcher.seen), root)
    return watcher


class Console:
    """The children's output, held back while they start, then written through: stdout
    lines prefixed with the child's name, stderr lines (log lines naming their process) as
    they are."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: list[tuple[str, str, str]] | None = []   # (child, stream, line)
        self.changed = threading.Event()                     # a READY line or a child's exit

    def write(self, child: str, stream: str, line: str) -> None:
        with self.lock:
            if self.held is not None:
                self.held.append((child, stream, line))
            else:
                _emit(child, stream, line)

    def release(self) -> None:
        """The start worked: write what was held, and everything from now on."""
        with self.lock:
            for child, stream, line in self.held or []:
                _emit(child, stream, line)
            self.held = None

    def error_of(self, child: str) -> str | None:
        """The mistake ``child`` stated on stderr while starting, if it did."""
        with self.lock:
            lines = [line for name, stream, line in self.held or [] if name == child and stream == "stderr"]
        for line in lines:
            found = _CLI_ERROR.match(line) or _LOG_ERROR.match(line)
            if found:
                return found.group(1)
            try:
                entry = json.loads(line)   # --log-format json
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("level") in ("ERROR", "CRITICAL"):
                return str(entry.get("message"))
        return None

    def output_of(self, child: str) -> list[str]:
        with self.lock:
            return [line for name, stream, line in self.held or [] if name == child and stream == "stderr"]


def _emit(child: str, stream: str, line: str) -> None:
    out = sys.stdout if stream == "stdout" else sys.stderr
    out.write(f"[{child}] {line}\n" if stream == "stdout" else f"{line}\n")
    out.flush()


class Child:
    def __init__(self, name: str, argv: list[str], console: Console, env: dict[str, str]):
        self.name = name
        self.console = console
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.ready = threading.Event()
        self.fields: dict[str, str] = {}
        self.pumps = [threading.Thread(target=self._pump, args=(pipe, stream), daemon=True)
                      for pipe, stream in ((self.proc.stdout, "stdout"), (self.proc.stderr, "stderr"))]
        for pump in self.pumps:
            pump.start()

    def _pump(self, pipe, stream: str) -> None:
        for line in pipe:
            line = line.rstrip("\n")
            if stream == "stdout" and line.startswith("READY ") and not self.ready.is_set():
                self.fields.update(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                self.ready.set()
                self.console.changed.set()
            self.console.write(self.name, stream, line)
        self.console.changed.set()   # the pipe closed: the child is exiting

    def exited(self) -> int | None:
        """The exit code once the child has exited (and its output is read), else None."""
        code = self.proc.poll()
        if code is not None:
            for pump in self.pumps:
                pump.join(2)   # the rest of its output, its error line among it
        return code


def stop_all(children: list[Child], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every child at once, wait for them together, SIGKILL those still there."""
    for child in children:
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
    for child in children:
        for pump in child.pumps:
            pump.join(1)


def _edge_argv(args, bus: str, static: str | None, flags: list[str]) -> list[str]:
    edge = ["zchannels.edge", "--bus", bus, "--host", args.host, "--port", str(args.port),
            "--heartbeat-timeout", str(args.heartbeat_timeout),
            "--max-frame-size", str(args.max_frame_size),
            "--max-channels", str(args.max_channels),
            "--max-outbound", str(args.max_outbound),
            "--max-inbound-buffered", str(args.max_inbound_buffered),
            "--max-rate", str(args.max_rate), "--max-burst", str(args.max_burst),
            "--check-origin", args.check_origin,
            "--longpoll-window", str(args.longpoll_window), *flags]
    if args.allowed_origins:
        edge += ["--allowed-origins", args.allowed_origins]
    if getattr(args, "compress", False):
        edge.append("--compress")
    if args.longpoll_inactivity is not None:
        edge += ["--longpoll-inactivity", str(args.longpoll_inactivity)]
    for flag in ("no_websocket", "no_longpoll"):
        if getattr(args, flag):
            edge.append("--" + flag.replace("_", "-"))
    if static:
        edge += ["--static", static]
    for flag in ("certfile", "keyfile"):
        if getattr(args, flag, None):
            edge += ["--" + flag, getattr(args, flag)]
    return edge


class StartFailed(Exception):
    """A child failed before everything was up; ``code`` is dev's exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def _wait_for(children: list[Child], wanted: list[Child], console: Console,
              stopping: threading.Event, deadline: float) -> bool:
    """Wait until every child in ``wanted`` said READY; False if stopped by a signal.
    Raises StartFailed when a child exits first or time runs out."""
    while True:
        console.changed.clear()   # before looking, so that nothing that happens next is missed
        if all(child.ready.is_set() for child in wanted):
            return True
        if stopping.is_set():
            return False
        for child in children:
            code = child.exited()
            if code is not None:
                raise _failure(child, code, console)
        left = deadline - time.monotonic()
        if left <= 0:
            late = [c.name for c in wanted if not c.ready.is_set()]
            output = "\n".join(line for name in late for line in console.output_of(name)[-20:])
            raise StartFailed(f"the {' and the '.join(late)} did not start within "
                              f"{START_TIMEOUT:.0f}s" + (f"; its output:\n{output}" if output else ""), 1)
        console.changed.wait(min(left, 0.5))


def _failure(child: Child, code: int, console: Console) -> StartFailed:
    error = console.error_of(child.name)
    if error is not None:
        return StartFailed(error, STARTUP_ERROR_EXIT if code == STARTUP_ERROR_EXIT else 1)
    output = "\n".join(console.output_of(child.name)[-40:])   # a crash: its traceback helps
    return StartFailed(f"the {child.name} exited with code {code} while starting" +
                       (f"; its output:\n{output}" if output else ""), 1)


def main(args) -> int:
    log_format = getattr(args, "log_format", "text")
    setup_logging(args.log_level, "dev", log_format)
    try:
        OriginCheck.from_options(args.check_origin, args.allowed_origins)
    except ValueError as exc:       # checked before anything starts, not when the edge exits
        print(f"zchannels dev: error: {exc}", file=sys.stderr)
        return STARTUP_ERROR_EXIT
    level = ["--log-level", args.log_level, "--log-format", log_format]
    bus_limit = ["--max-bus-message", str(args.max_bus_message)]
    status_token = status_token_of(args)
    static = args.static
    app_path = Path(args.app.split(":")[0])
    if static is None and app_path.suffix == ".py" and (app_path.parent / "static").is_dir():
        static = str(app_path.parent / "static")
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())

    # --curve-keys DIR (checked by the CLI) -> the broker's and the clients' key flags
    broker_curve, client_curve = getattr(args, "curve", None) or ([], [])
    # Every option on the children's command lines; secrets (--api-key) in their environment.
    env = dict(getattr(args, "process_env", None) or os.environ)
    console = Console()
    children: list[Child] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        broker = Child("broker", ["zchannels.broker", "--bus", args.bus, *bus_limit, *broker_curve, *level],
                       console, env)
        children.append(broker)
        if not _wait_for(children, [broker], console, stopping, deadline):
            return 0
        bus = broker.fields["bus"]
        workers = Child("workers", ["zchannels.workers", "--bus", bus, "-n", str(args.workers),
                                    "--stuck-timeout", str(args.stuck_timeout), *bus_limit,
                                    *client_curve, *level, args.app], console, env)
        children.append(workers)
        edge = Child("edge", _edge_argv(args, bus, static, [*bus_limit, *client_curve, *level]),
                     console, {**env, "ZCHANNELS_STATUS_TOKEN": status_token or ""})
        children.append(edge)
        if not _wait_for(children, [workers, edge], console, stopping, deadline):
            return 0
        console.release()
        http = edge.fields.get("http")
        log.info("zchannels dev running: open %s", http)
        if status_token:
            log.info("status page: %s/status?status_token=%s", http, status_token)
        return _run(args, children, workers, stopping)
    except StartFailed as exc:
        stop_all(children)   # every child at once; their held output (READY lines) is dropped
        print(f"zchannels dev: error: {exc}", file=sys.stderr)
        return exc.code
    finally:
        stop_all(children)


def _run(args, children: list[Child], workers: Child, stopping: threading.Event) -> int:
    watcher = _watcher(args.app) if getattr(args, "reload", False) else None
    while not stopping.is_set():
        if watcher is not None and (changed := watcher.changed()):
            log.info("reloading the workers: %s changed", ", ".join(changed[:5]) +
                     (f" and {len(changed) - 5} more" if len(changed) > 5 else ""))
            workers.proc.send_signal(signal.SIGHUP)
        for child in children:
            code = child.proc.poll()
            if code is not None:
                log.error("%s exited with code %s; stopping everything", child.name, code)
                return 1
        stopping.wait(0.5)
    return 0
