"""`zchannels edge --processes N`: N edge processes sharing one port on one host.

One Python process uses one core and, here, at most ~20,000 open files; a machine's
cores are all used by starting one edge per core on the same port with SO_REUSEPORT,
the kernel spreading new connections over them.  This parent only starts the
children, restarts one that dies, and stops them together; each child is an
ordinary edge with its own bus identity.
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

from zchannels.bus.logsetup import announce_ready

log = logging.getLogger("edge")

RESTART_BACKOFF_MAX = 10.0


def child_argv(args: argparse.Namespace, port: int) -> list[str]:
    """The `edge` command line of one child: every option as given (``args.process_options``,
    from zchannels/cli.py), one process, on ``port``."""
    return [sys.executable, "-m", "zchannels.edge", *args.process_options, "--port", str(port), "--reuse-port"]


class Child:
    def __init__(self, slot: int, argv: list[str], env: dict[str, str] | None = None):
        self.slot = slot
        self.argv = argv
        self.env = env
        self.failures = 0
        self.ready = threading.Event()
        self.fields: dict[str, str] = {}
        self.started = 0.0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.ready.clear()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True, env=self.env)
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        log.info("edge process started slot=%d pid=%d", self.slot, self.proc.pid)

    def _pump(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if line.startswith("READY "):
                self.fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
                self.ready.set()


def run_many(args: argparse.Namespace, reserved: socket.socket) -> int:
    """Run ``args.processes`` edges on the port of ``reserved`` (edge/listen.py's
    ``reserve_port``: bound before anything starts, so a port in use is one line, and port 0
    is one free port all the children share), which is closed once they all listen."""
    port = reserved.getsockname()[1]
    # Secrets (--status-token, --api-key) travel in the environment, not on command lines.
    env = getattr(args, "process_env", None)
    children = [Child(i, child_argv(args, port), env) for i in range(args.processes)]
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    for child in children:
        child.start()
    try:
        deadline = time.monotonic() + 15
        for child in children:
            if not child.ready.wait(max(0.1, deadline - time.monotonic())):
                log.error("edge process slot=%d did not become ready; stopping", child.slot)
                return 1
        if reserved is not None:
            reserved.close()
        scheme = "https" if getattr(args, "certfile", None) else "http"
        log.info("%d edge processes up on %s://%s:%d", len(children), scheme, args.host, port)
        announce_ready(http=f"{scheme}://{args.host}:{port}", processes=len(children),
                       edges=",".join(c.fields.get("edge", "?") for c in children))
        while not stopping.wait(0.5):
            for child in children:
                _restart_if_dead(child)
        return 0
    finally:
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        for child in children:
            if child.proc is not None:
                try:
                    child.proc.wait(10)
                except subprocess.TimeoutExpired:
                    child.proc.kill()


def _restart_if_dead(child: Child) -> None:
    code = child.proc.poll()
    if code is None:
        return
    lived = time.monotonic() - child.started
    child.failures = 0 if lived > 30 else child.failures + 1
    delay = min(RESTART_BACKOFF_MAX, 0.1 * 2 ** child.failures) if child.failures else 0
    log.warning("edge process slot=%d pid=%d exited with code %s after %.0fs; restarting in %.1fs",
                child.slot, child.proc.pid, code, lived, delay)
    time.sleep(delay)
    child.start()
