"""The Python side of bench/loadgen.js: one Node process holding every client WebSocket,
driven with one JSON command per line on its stdin and answering with one JSON result per line
on its stdout (matched to the command by id).
"""
from __future__ import annotations

import json
import queue
import subprocess
import time

from cluster import ROOT, Proc
from procstats import CLK_TCK, cpu_ticks


class LoadGen:
    def __init__(self, tmpdir: str, name: str = "loadgen"):
        self.proc = Proc(name, ["node", str(ROOT / "bench" / "loadgen.js")], tmpdir,
                         stdin=subprocess.PIPE)
        self.n = 0

    def call(self, cmd: dict, timeout: float) -> dict:
        """Send one command and return its result; raise if it fails, if the load generator
        exits, or after timeout seconds without an answer."""
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
        """CPU seconds (user + system) the load generator has used so far."""
        c = cpu_ticks(self.proc.p.pid)
        return (c or 0) / CLK_TCK

    def exit(self, wait: float = 0) -> None:
        """Ask the load generator to close its clients and exit, if it is still running; a
        failure here must not keep the servers from being stopped."""
        if self.proc.p.poll() is None:
            self.proc.finished = True
            try:
                self.call({"cmd": "exit"}, 20)
            except Exception:
                pass
            try:
                if wait:
                    self.proc.p.wait(wait)
            except subprocess.TimeoutExpired:
                pass
