"""The worker supervisor (workers/supervisor.py) with real forks, real signals, fake targets.

Each test writes a small script that runs a `Supervisor` around a fake worker target, starts
it as a subprocess and watches its log lines on stderr.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from zchannels.workers.supervisor import HANDLER_LOAD_ERROR

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from zchannels.bus.logsetup import setup_logging
    from zchannels.workers.supervisor import HANDLER_LOAD_ERROR, ConfigError, Supervisor

    mode, n, stuck, graceful, state = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \\
        float(sys.argv[4]), sys.argv[5]

    def beat_forever(alive):
        while True:
            alive()
            time.sleep(0.05)

    def target(slot, alive):
        if mode == "sleep":
            beat_forever(alive)
        if mode == "crash":
            return 1
        if mode == "load_error":
            return HANDLER_LOAD_ERROR
        if mode == "config_error":
            raise ConfigError("cannot load app 'x.py': no such file x.py")
        if mode == "hang_ignore_abort":   # the first worker of slot 0 is stuck and survives SIGABRT
            marker = os.path.join(state, "hung-%d" % slot)
            if slot == 0 and not os.path.exists(marker):
                open(marker, "w").close()
                signal.signal(signal.SIGABRT, signal.SIG_IGN)
                alive()
                time.sleep(3600)
            beat_forever(alive)
        if mode == "hang_once":   # the first worker of slot 0 beats once, then its loop is stuck
            marker = os.path.join(state, "hung-%d" % slot)
            if slot == 0 and not os.path.exists(marker):
                open(marker, "w").close()
                alive()
                time.sleep(3600)
            beat_forever(alive)
        if mode == "ignore_term":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            beat_forever(alive)
        if mode == "handlers":    # report what the child inherited, then idle
            with open(os.path.join(state, "handlers-%d" % os.getpid()), "w") as f:
                f.write(repr([signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGCHLD,
                                                              signal.SIGHUP)]))
            beat_forever(alive)
        raise SystemExit("unknown mode " + mode)

    setup_logging("debug", "workers")
    sys.exit(Supervisor(target, n, stuck, graceful).run())
""")

STARTED = re.compile(r"worker started slot=(\d+) pid=(\d+)")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def pid_alive(pid: int) -> bool:
    # A zombie counts as dead: read the state from /proc rather than os.kill(pid, 0).
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status


class Sup:
    """A supervisor subprocess whose stderr log lines are collected by a thread."""

    def __init__(self, tmp_path: Path, mode: str, n: int = 1, stuck: float = 30.0, graceful: float = 5.0):
        script = tmp_path / "sup.py"
        script.write_text(SCRIPT)
        self.state = tmp_path
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), mode, str(n), str(stuck), str(graceful), str(tmp_path)],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log(self) -> str:
        return "\n".join(self.lines)

    def starts(self) -> list[tuple[int, int]]:
        """(slot, pid) of every spawn, in order."""
        return [(int(m[1]), int(m[2])) for m in map(STARTED.search, list(self.lines)) if m]

    def current(self) -> dict[int, int]:
        """slot -> pid of the latest spawn in that slot."""
        return dict(self.starts())

    def wait_log(self, pattern: str, timeout: float = 10.0, count: int = 1) -> list[str]:
        rx = re.compile(pattern)
        return wait_until(lambda: len(hits := [l for l in list(self.lines) if rx.search(l)]) >= count
                          and hits, timeout)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for _, pid in self.starts():   # never leave a worker behind, even when a test failed
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.reader.join(5)


@pytest.fixture
def start(tmp_path):
    sups: list[Sup] = []

    def _start(mode: str, **kw) -> Sup:
        sup = Sup(tmp_path, mode, **kw)
        sups.append(sup)
        return sup

    yield _start
    for sup in sups:
        sup.cleanup()
        print(sup.log(), file=sys.stderr)   # pytest shows it only when the test failed


@pytest.mark.timeout(30)
def test_spawns_n_workers_in_stable_slots_and_sigterm_stops_them_with_exit_code_0(start):
    sup = start("sleep", n=3)
    wait_until(lambda: len(sup.current()) == 3)
    assert sorted(sup.current()) == [0, 1, 2]
    pids = list(sup.current().values())
    assert all(pid_alive(p) for p in pids)
    assert sup.stop() == 0
    assert not any(pid_alive(p) for p in pids)
    assert len(sup.starts()) == 3, sup.log()      # nobody was respawned during the stop
    assert "killed by SIGTERM" in sup.log()      # children run with the default SIGTERM action


@pytest.mark.timeout(30)
def test_sigint_also_stops_with_exit_code_0(start):
    sup = start("sleep", n=1)
    wait_until(sup.current)
    sup.signal(signal.SIGINT)
    assert sup.proc.wait(15) == 0


@pytest.mark.timeout(30)
def test_sigkilled_worker_is_replaced_in_the_same_slot(start):
    sup = start("sleep", n=2)
    wait_until(lambda: len(sup.current()) == 2)
    old = sup.current()
    os.kill(old[0], signal.SIGKILL)
    wait_until(lambda: sup.current()[0] != old[0])
    assert sup.current()[1] == old[1]
    assert pid_alive(sup.current()[0])
    died = sup.wait_log(rf"worker died slot=0 pid={old[0]} killed by SIGKILL")[0]
    assert "perhaps out of memory" in died


@pytest.mark.timeout(30)
def test_crashing_worker_is_restarted_with_exponential_backoff(start):
    sup = start("crash", n=1)
    began = time.monotonic()
    wait_until(lambda: len(sup.starts()) >= 5, timeout=15)
    # four quick deaths wait at least 0.1 + 0.2 + 0.4 + 0.8 s: no hot loop
    assert time.monotonic() - began >= 1.5
    assert all(slot == 0 for slot, _ in sup.starts())
    delays = [float(d) for d in re.findall(r"exited with code 1 after [\d.]+s; restart in ([\d.]+)s",
                                           sup.log())]
    assert len(delays) >= 4, sup.log()
    for i, base in enumerate([0.1, 0.2, 0.4, 0.8]):
        assert base <= delays[i] <= base * 1.2 + 0.01, delays


@pytest.mark.timeout(30)
def test_handler_load_error_stops_the_supervisor_with_exit_code_2(start):
    sup = start("load_error", n=2)
    assert sup.proc.wait(15) == 2
    sup.reader.join(5)
    assert f"exited with code {HANDLER_LOAD_ERROR} (its configuration cannot work)" in sup.log()
    assert len(sup.starts()) <= 2, sup.log()     # no restarts at all
    assert not any(pid_alive(p) for _, p in sup.starts())


@pytest.mark.timeout(30)
def test_config_error_stops_the_supervisor_with_one_error_line_and_exit_code_2(start):
    sup = start("config_error", n=2)
    assert sup.proc.wait(15) == 2
    sup.reader.join(5)
    errors = [line for line in sup.lines if " ERROR " in line]
    assert len(errors) == 1, sup.log()
    assert "cannot start: cannot load app 'x.py': no such file x.py; stopping the supervisor" in errors[0]
    assert "Traceback" not in sup.log()
    assert len(sup.starts()) <= 2, sup.log()


@pytest.mark.timeout(30)
def test_a_ready_worker_killed_again_and_again_is_replaced_at_once_every_time(start):
    sup = start("sleep", n=2)
    wait_until(lambda: len(sup.current()) == 2)
    for i in range(5):
        victim = sup.current()[0]
        wait_until(lambda: sup.wait_log(rf"started slot=0 pid={victim}"))
        time.sleep(0.1)   # let it beat: that is what makes it ready
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: sup.current()[0] != victim)
    delays = re.findall(r"worker died slot=0 pid=\d+ killed by SIGKILL.* restart in ([\d.]+)s(.*)", sup.log())
    assert delays == [("0.00", "")] * 5, sup.log()


@pytest.mark.timeout(40)
def test_crash_loops_in_every_slot_back_off_but_some_slot_always_retries_within_a_second(start):
    sup = start("crash", n=2)
    died = re.compile(r"restart in ([\d.]+)s \(it died before it was ready\)")
    wait_until(lambda: len([l for l in list(sup.lines) if died.search(l)]) >= 12, timeout=30)
    lines = list(sup.lines)
    delays = [float(m[1]) for m in map(died.search, lines) if m]
    assert max(delays) > 1.5, delays        # the slots do back off ...
    starts = [datetime.strptime(l[:23], "%Y-%m-%d %H:%M:%S,%f") for l in lines if STARTED.search(l)]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:])]
    assert max(gaps) < 1.0 + 0.4, (gaps, delays)   # ... but never both for longer than LAST_SLOT_MAX


@pytest.mark.timeout(30)
def test_stuck_worker_is_killed_and_restarted_after_stuck_timeout(start):
    sup = start("hang_once", n=2, stuck=1.0)
    wait_until(lambda: len(sup.current()) == 2)
    first = sup.current()
    began = time.monotonic()
    line = sup.wait_log(rf"worker stuck slot=0 pid={first[0]}")[0]
    assert time.monotonic() - began >= 0.5      # it was given its stuck_timeout
    assert "limit 1.0s" in line
    wait_until(lambda: sup.current()[0] != first[0])
    assert sup.wait_log(rf"pid={first[0]} killed by SIGABRT \(stuck")   # the runner's faulthandler dumps stacks
    assert not pid_alive(first[0])
    # The replacement beats, so it must survive well past stuck_timeout (a window, not a wait),
    # and the healthy slot was never touched.
    time.sleep(1.5)
    assert pid_alive(sup.current()[0]) and sup.current()[1] == first[1]
    assert len(sup.starts()) == 3, sup.log()


@pytest.mark.timeout(30)
def test_stuck_worker_that_survives_sigabrt_is_killed_after_the_grace(start):
    sup = start("hang_ignore_abort", n=1, stuck=1.0)
    wait_until(sup.current)
    first = sup.current()[0]
    sup.wait_log(rf"worker stuck slot=0 pid={first}")
    aborted = time.monotonic()
    sup.wait_log(rf"pid={first} killed by SIGKILL \(stuck, still there 2s after SIGABRT\)")
    assert time.monotonic() - aborted >= 1.5
    wait_until(lambda: sup.current()[0] != first)


@pytest.mark.timeout(30)
def test_sighup_restarts_every_worker_one_at_a_time(start):
    sup = start("sleep", n=2)
    wait_until(lambda: len(sup.current()) == 2)
    old = sup.current()
    sup.signal(signal.SIGHUP)
    wait_until(lambda: all(sup.current()[s] != old[s] for s in (0, 1)))
    lines = list(sup.lines)

    def index(pattern):
        return next(i for i, l in enumerate(lines) if re.search(pattern, l))
    new0 = sup.current()[0]
    # slot 1 is asked to stop only after slot 0's replacement is running
    assert index(rf"started slot=0 pid={new0}") < index(rf"restarting worker slot=1 pid={old[1]}")
    assert "WARNING" not in "\n".join(l for l in lines if "worker died" in l)   # planned, not crashes
    assert sup.stop() == 0


@pytest.mark.timeout(30)
def test_sigttin_adds_a_worker_and_sigttou_removes_it(start):
    sup = start("sleep", n=1)
    wait_until(sup.current)
    sup.signal(signal.SIGTTIN)
    wait_until(lambda: 1 in sup.current())
    extra = sup.current()[1]
    sup.signal(signal.SIGTTOU)
    sup.wait_log(rf"worker stopped slot=1 pid={extra}")
    wait_until(lambda: not pid_alive(extra))
    # A negative check needs a window: a second of maintain() passes must leave slot 1 empty.
    time.sleep(1.2)
    assert [slot for slot, _ in sup.starts()].count(1) == 1, sup.log()
    assert pid_alive(sup.current()[0])


@pytest.mark.timeout(30)
def test_graceful_stop_kills_workers_that_ignore_sigterm(start):
    sup = start("ignore_term", n=2, graceful=1.0)
    wait_until(lambda: len(sup.current()) == 2)
    pids = list(sup.current().values())
    time.sleep(0.3)   # let the children install SIG_IGN
    began = time.monotonic()
    assert sup.stop() == 0
    assert time.monotonic() - began >= 0.9
    assert not any(pid_alive(p) for p in pids)
    assert "did not stop within the graceful timeout" in sup.log()


@pytest.mark.timeout(30)
def test_children_run_with_the_default_signal_handlers(start, tmp_path):
    sup = start("handlers", n=1)
    # The child creates the file, then writes it: wait for the content, not the name.
    wait_until(lambda: any(p.read_text() for p in tmp_path.glob("handlers-*")))
    reported = next(tmp_path.glob("handlers-*")).read_text()
    assert reported == repr([signal.SIG_DFL] * 3)
    assert sup.stop() == 0
