"""The worker supervisor: keeps N worker processes alive (gunicorn's arbiter, made smaller).

`zchannels workers` runs this process.  It forks one child per *slot* (0..N-1); each child
runs `workers.runner.run_worker` and talks to the broker on its own.  The supervisor holds no
ZeroMQ context and no event loop, which is what makes plain `fork()` safe here.

Everything happens in one thread, in one loop::

    wait for a signal (or 1 s) -> handle queued signals -> reap() -> kill_stuck() -> maintain()

Signal handlers only enqueue; `signal.set_wakeup_fd` wakes the wait.  Liveness uses the
gunicorn WorkerTmp trick: each child gets an (unlinked) temp file whose mtime its event loop
bumps about once a second through `alive()`; a file older than `stuck_timeout` means the loop
is stuck, and the child gets SIGABRT (the runner's faulthandler prints every thread's stack to
the log), then SIGKILL if it is still there `ABORT_GRACE` seconds later.

A worker is *ready* once its loop has beaten (the file's mtime moved past its value at fork).
When to replace a dead worker is workers/restarts.py's call: a ready one at once, one that
crashed while starting after a backoff.  A configuration that can never work (the handler
module cannot be imported, a malformed bus address) stops the supervisor with one log line and
exit code 2.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from zchannels.workers.configerror import HANDLER_LOAD_ERROR, ConfigError
from zchannels.workers.restarts import RestartPolicy

# The supervisor's own exit code when a worker exits with HANDLER_LOAD_ERROR.
CONFIG_ERROR_EXIT = 2

ABORT_GRACE = 2.0       # SIGABRT (stack dump) -> SIGKILL, for a stuck worker
CONFIG_ERROR_BYTES = 2000

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP,
           signal.SIGTTIN, signal.SIGTTOU)

log = logging.getLogger("zchannels.supervisor")

Target = Callable[[int, Callable[[], None]], int]   # (slot, alive) -> exit code


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class Worker:
    slot: int
    pid: int
    alive_fd: int
    started: float                # time.monotonic() at fork
    born_mtime: float             # alive file mtime at fork; a later mtime means "has beaten"
    stop_at: float | None = None  # monotonic time we sent SIGTERM
    expected: bool = False        # a planned stop: respawn at once, no backoff
    killed: str = ""              # why we sent SIGKILL, for the death log line
    aborted_at: float | None = None   # monotonic time we sent SIGABRT to a stuck worker

    def heartbeat(self) -> float:
        return os.fstat(self.alive_fd).st_mtime

    def ready(self) -> bool:
        """Its event loop has beaten at least once since the fork."""
        return self.heartbeat() > self.born_mtime

    def config_error(self) -> str:
        """What a child that raised ConfigError wrote into its alive file."""
        return os.pread(self.alive_fd, CONFIG_ERROR_BYTES, 0).decode("utf-8", "replace").strip()


class Supervisor:
    """Fork `n` children running `target(slot, alive)` and keep them alive until stopped."""

    def __init__(self, target: Target, n: int, stuck_timeout: float, graceful_timeout: float = 10.0,
                 metrics=None):
        from zchannels.workers.metrics import NoSupervisorMetrics
        self.metrics = metrics or NoSupervisorMetrics()   # workers/metrics.py
        self.target = target
        self.n = n
        self.stuck_timeout = stuck_timeout
        self.graceful_timeout = graceful_timeout
        self.workers: dict[int, Worker] = {}     # pid -> worker
        self.restarts = RestartPolicy()          # workers/restarts.py
        self.restart_queue: list[int] = []       # slots still to restart after SIGHUP
        self.signals: list[int] = []
        self.exit_code: int | None = None
        self.saved_handlers: dict[int, object] = {}
        self.pipe: tuple[int, int] | None = None

    # --- main loop ------------------------------------------------------------

    def run(self) -> int:
        """Supervise until SIGTERM/SIGINT (returns 0) or a configuration error (returns 2)."""
        self.install_signals()
        log.info("supervisor started pid=%d workers=%d stuck_timeout=%.1fs",
                 os.getpid(), self.n, self.stuck_timeout)
        try:
            while self.exit_code is None:
                self.sleep(self.next_timeout())
                self.handle_signals()
                self.reap()
                self.kill_stuck()
                if self.exit_code is None:
                    self.maintain()
        finally:
            self.stop()
            self.restore_signals()
        log.info("supervisor stopped exit_code=%d", self.exit_code)
        return self.exit_code

    def install_signals(self) -> None:
        r, w = os.pipe()
        for fd in (r, w):
            os.set_blocking(fd, False)
        self.pipe = (r, w)
        signal.set_wakeup_fd(w)
        for signum in HANDLED:
            self.saved_handlers[signum] = signal.signal(signum, self.enqueue)

    def restore_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self.saved_handlers.items():
            signal.signal(signum, handler)
        for fd in self.pipe or ():
            os.close(fd)
        self.pipe = None

    def enqueue(self, signum: int, frame: object) -> None:
        self.signals.append(signum)   # nothing else: all work happens in the loop

    def sleep(self, timeout: float) -> None:
        if select.select([self.pipe[0]], [], [], timeout)[0]:
            os.read(self.pipe[0], 4096)   # only a wake-up: the handlers queued the signals

    def next_timeout(self) -> float:
        # Wake early when a slot's backoff or a stuck worker's abort grace ends before the 1 s tick.
        busy = {w.slot for w in self.workers.values()}
        due = [self.restarts.due(s) for s in range(self.n) if s not in busy]
        due += [w.aborted_at + ABORT_GRACE for w in self.workers.values()
                if w.aborted_at is not None and not w.killed]
        return max(0.0, min([1.0] + [t - time.monotonic() for t in due]))

    # --- signals ------------------------------------------------------------------

    def handle_signals(self) -> None:
        while self.signals:
            name = _signame(self.signals.pop(0))
            getattr(self, "handle_" + name[3:].lower())()

    def handle_term(self) -> None:
        log.info("stop signal received, stopping workers")
        self.exit_code = 0

    handle_int = handle_term

    def handle_chld(self) -> None:
        pass    # reap() runs on every pass anyway; the signal only cuts the wait short

    def handle_hup(self) -> None:
        log.info("SIGHUP received, restarting %d workers one by one", self.n)
        self.restart_queue = list(range(self.n))

    def handle_ttin(self) -> None:
        self.n += 1
        log.info("SIGTTIN received, workers=%d", self.n)

    def handle_ttou(self) -> None:
        if self.n > 1:
            self.n -= 1
        log.info("SIGTTOU received, workers=%d", self.n)

    # --- reaping ---------------------------------------------------------------

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:   # no children at all
                return
            if pid == 0:                # children, but none has exited
                return
            worker = self.workers.pop(pid, None)
            if worker is not None:
                self.on_death(worker, status)

    def on_death(self, w: Worker, status: int) -> None:
        ready = w.ready()
        code = None if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status)
        problem = w.config_error() if code == HANDLER_LOAD_ERROR else ""
        os.close(w.alive_fd)
        self.metrics.reaped(w.pid)
        lived = time.monotonic() - w.started
        if code is None:
            sig = os.WTERMSIG(status)
            how = f"killed by {_signame(sig)}"
            if sig == signal.SIGKILL:
                how += w.killed or " (perhaps out of memory)"
            elif sig == signal.SIGABRT and w.aborted_at is not None:
                how += " (stuck; its threads' stacks are above)"
        else:
            how = f"exited with code {code}"
        if code == HANDLER_LOAD_ERROR and self.exit_code is None:
            log.error("worker slot=%d pid=%d cannot start: %s; stopping the supervisor (exit code %d), "
                      "a restart cannot fix this", w.slot, w.pid,
                      problem or f"it exited with code {code} (its configuration cannot work)",
                      CONFIG_ERROR_EXIT)
            self.exit_code = CONFIG_ERROR_EXIT
            return
        if self.exit_code is not None or w.slot >= self.n:
            log.info("worker stopped slot=%d pid=%d %s", w.slot, w.pid, how)
            return
        delay = self.schedule_respawn(w, ready)
        if not w.expected:
            self.metrics.restarted()
        level = logging.INFO if w.expected else logging.WARNING
        if w.expected or not delay:
            why = ""
        else:
            why = " (it died before it was ready)" if not ready else " (its workers keep dying)"
        log.log(level, "worker died slot=%d pid=%d %s after %.1fs; restart in %.2fs%s",
                w.slot, w.pid, how, lived, delay, why)

    def schedule_respawn(self, w: Worker, ready: bool) -> float:
        busy = {other.slot for other in self.workers.values()}
        return self.restarts.after_death(w.slot, ready, w.expected, busy, self.n, time.monotonic())

    # --- liveness -----------------------------------------------------------------

    def kill_stuck(self) -> None:
        now = time.monotonic()
        for w in list(self.workers.values()):
            if w.killed:
                continue
            if w.aborted_at is not None:
                if now - w.aborted_at >= ABORT_GRACE:
                    self.kill(w, f" (stuck, still there {ABORT_GRACE:.0f}s after SIGABRT)")
                continue
            if w.stop_at is not None:
                if now - w.stop_at > self.graceful_timeout:
                    self.kill(w, " (did not stop within the graceful timeout)")
                continue
            age = time.time() - w.heartbeat()
            if age > self.stuck_timeout:
                log.error("worker stuck slot=%d pid=%d: no heartbeat for %.1fs (limit %.1fs); SIGABRT "
                          "for its stacks, SIGKILL %.0fs later if it is still there",
                          w.slot, w.pid, age, self.stuck_timeout, ABORT_GRACE)
                w.aborted_at = now
                os.kill(w.pid, signal.SIGABRT)   # safe: an unreaped child's pid cannot be reused

    def kill(self, w: Worker, why: str) -> None:
        w.killed = why
        os.kill(w.pid, signal.SIGKILL)   # safe: an unreaped child's pid cannot be reused

    def terminate(self, w: Worker, expected: bool) -> None:
        w.stop_at, w.expected = time.monotonic(), expected
        os.kill(w.pid, signal.SIGTERM)

    # --- spawning ---------------------------------------------------------------------

    def maintain(self) -> None:
        for w in list(self.workers.values()):
            if w.slot >= self.n and w.stop_at is None:     # after SIGTTOU
                self.terminate(w, expected=True)
        busy = {w.slot for w in self.workers.values()}
        now = time.monotonic()
        for slot in range(self.n):
            if slot not in busy and now >= self.restarts.due(slot):
                self.spawn(slot)
        self.roll_restart()

    def roll_restart(self) -> None:
        # One slot at a time, and only once every slot's worker is running and has beaten,
        # so a SIGHUP never takes more than one worker out of service.
        live = list(self.workers.values())
        if not self.restart_queue or len(live) < self.n or any(w.stop_at is not None for w in live):
            return
        if any(w.heartbeat() <= w.born_mtime for w in live):
            return
        slot = self.restart_queue.pop(0)
        for w in live:
            if w.slot == slot:
                log.info("restarting worker slot=%d pid=%d", w.slot, w.pid)
                self.terminate(w, expected=True)

    def spawn(self, slot: int) -> None:
        fd, path = tempfile.mkstemp(prefix=f"zchannels-worker{slot}-")
        os.unlink(path)   # nothing to clean up, even if the supervisor is SIGKILLed
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(fd)
            log.error("cannot fork worker slot=%d: %s; retrying in 1s", slot, exc)
            self.restarts.hold(slot, time.monotonic() + 1.0)
            return
        if pid == 0:
            self.child(slot, fd)   # never returns
        self.workers[pid] = Worker(slot, pid, fd, time.monotonic(), os.fstat(fd).st_mtime)
        log.info("worker started slot=%d pid=%d", slot, pid)

    def child(self, slot: int, alive_fd: int) -> None:
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for signum, handler in self.saved_handlers.items():
                signal.signal(signum, handler)
            for fd in [*self.pipe, *(w.alive_fd for w in self.workers.values())]:
                os.close(fd)
            self.metrics.forked()
            result = self.target(slot, lambda: os.utime(alive_fd))
            code = result if isinstance(result, int) else 0
        except ConfigError as exc:   # the message travels in the alive file: one line, by the supervisor
            os.pwrite(alive_fd, str(exc).encode("utf-8", "replace")[:CONFIG_ERROR_BYTES], 0)
            code = HANDLER_LOAD_ERROR
        except SystemExit as exc:   # mirror the interpreter: int -> code, None -> 0, text -> 1
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if code and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)   # never run the supervisor's atexit hooks or finally blocks

    # --- stopping -------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every worker, wait up to graceful_timeout, then SIGKILL the rest."""
        if self.exit_code is None:
            self.exit_code = 1    # only reached through an unexpected exception in run()
        for w in self.workers.values():
            if w.stop_at is None:
                self.terminate(w, expected=True)
        deadline = time.monotonic() + self.graceful_timeout
        why = " (did not stop within the graceful timeout)"
        while self.workers and time.monotonic() < deadline:
            self.sleep(0.1)
            self.reap()
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.signals):
                why = " (second stop signal)"   # an impatient operator: do not wait any longer
                break
            self.signals.clear()
        for w in self.workers.values():
            if not w.killed:
                self.kill(w, why)
        for pid, w in list(self.workers.items()):
            _, status = os.waitpid(pid, 0)
            del self.workers[pid]
            self.on_death(w, status)


def main(args) -> int:
    """`zchannels workers`: supervise `args.workers` runners for `args.app`."""
    from zchannels.bus.logsetup import setup_logging
    from zchannels.bus.startup import StartupError
    from zchannels.workers.appcheck import app_problem
    log_format = getattr(args, "log_format", "text")
    setup_logging(args.log_level, "workers", log_format)
    if args.workers < 1:
        raise StartupError(f"--workers must be at least 1, got {args.workers}")
    problem = app_problem(args.app)   # before anything starts: one line, exit code 2
    if problem:
        raise StartupError(problem)

    metrics = None
    if getattr(args, "metrics_port", None) is not None:
        from zchannels.workers.metrics import SupervisorMetrics
        try:
            metrics = SupervisorMetrics(args.metrics_port)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on 127.0.0.1 port {args.metrics_port} "
                               f"(--metrics-port): {exc.strerror or exc}") from None
        log.info("metrics at %s (directory %s)", metrics.url, metrics.dir)
        print(f"METRICS {metrics.url}", flush=True)   # for tooling, like the READY lines

    def target(slot: int, alive: Callable[[], None]) -> int:
        from zchannels.workers.runner import run_worker
        if metrics is not None:
            from zchannels.workers.metrics import init_worker
            init_worker()
        return run_worker(args.app, args.bus, slot, args.log_level, alive, log_format)

    graceful = getattr(args, "graceful_timeout", 10.0)
    try:
        return Supervisor(target, args.workers, args.stuck_timeout, graceful, metrics).run()
    finally:
        if metrics is not None:
            metrics.close()
