"""Faults without outages (issue 10): how fast the system is whole again after a worker dies,
the broker restarts or the workers' configuration is wrong, with real processes.

- A join the broker cannot place gets {"reason": "no worker available"} at once, not after
  phoenix.js's 10 s join timeout.
- A worker that was ready and is killed is replaced at once, every time; backoff is for
  workers that crash while starting.
- Joins and connects that reach a restarted broker before any worker has heartbeated wait for
  one instead of being bounced.
- A configuration that can never work stops the supervisor with one line and exit code 2.
- A worker whose loop is stuck dumps every thread's stack (SIGABRT) before it is replaced.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.conftest import ROOT, wait_until
from tests.rawws import HandshakeRefused, RawWS

APP = "tests/apps/restart_app.py"


def uid() -> str:
    return uuid.uuid4().hex[:10]


def join_frame(join_ref: str, topic: str) -> list:
    return [join_ref, join_ref, topic, "phx_join", {}]


def join(ws: RawWS, join_ref: str, topic: str, timeout: float = 5.0) -> list:
    ws.send_json(join_frame(join_ref, topic))
    return ws.recv_until(lambda m: m[1] == join_ref, timeout)


def latest_pid(cluster, slot: int) -> int:
    return int([f for f in cluster.supervisor.ready if f.get("worker") == str(slot)][-1]["pid"])


@pytest.mark.timeout(60)
def test_a_join_with_no_worker_running_gets_no_worker_available_fast(cluster_factory):
    cluster = cluster_factory(app=APP, edges=1, workers=1)
    ws = RawWS.connect(cluster.raw_url(0))
    try:
        assert join(ws, "1", f"echo:{uid()}")[4]["status"] == "ok"
        assert cluster.supervisor.stop() == 0
        wait_until(lambda: "worker down" in cluster.broker.stderr_text(), timeout=10)
        began = time.monotonic()
        answer = join(ws, "2", f"echo:{uid()}", timeout=8)
        took = time.monotonic() - began
        assert answer[3:] == ["phx_reply", {"status": "error", "response": {"reason": "no worker available"}}]
        assert took < 5.0, f"the bounced join took {took:.1f}s"
        print(f"\njoin with no worker: error reply after {took:.2f}s")
        assert "Traceback" not in cluster.stderr()
    finally:
        ws.close()


@pytest.mark.timeout(90)
def test_a_ready_worker_killed_five_times_is_replaced_at_once_every_time(cluster_factory):
    cluster = cluster_factory(app=APP, edges=0, workers=2)
    times = []
    for _ in range(5):
        victim = latest_pid(cluster, 0)
        seen = {int(f["pid"]) for f in cluster.supervisor.ready}
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        cluster.supervisor.wait_ready_where(
            lambda f: f.get("worker") == "0" and int(f["pid"]) not in seen, timeout=20)
        times.append(time.monotonic() - killed)
    print("\nkill -9 -> replacement READY (s):", " ".join(f"{t:.2f}" for t in times))
    delays = [float(d) for d in re.findall(r"worker died slot=0 pid=\d+ killed by SIGKILL.*restart in ([\d.]+)s",
                                           cluster.supervisor.stderr_text())]
    assert delays == [0.0] * 5, delays
    assert max(times) < 2.0, times   # fork, import the app, connect, first heartbeat answered


@pytest.mark.timeout(60)
def test_joins_and_connects_reaching_a_restarted_broker_before_any_worker_wait_for_one(cluster_factory):
    cluster = cluster_factory(app=APP, edges=1, workers=2)
    ws = RawWS.connect(cluster.raw_url(0))
    workers = cluster.worker_pids
    opened: list = []
    try:
        assert join(ws, "1", f"echo:{uid()}")[4]["status"] == "ok"
        for pid in workers:                  # the workers come back only after the joins arrive
            os.kill(pid, signal.SIGSTOP)
        topic = f"echo:{uid()}"
        cluster.restart_broker(while_down=lambda: ws.send_json(join_frame("2", topic)))

        def connect() -> None:
            try:
                opened.append(RawWS.connect(cluster.raw_url(0), timeout=8))
            except (HandshakeRefused, OSError, TimeoutError) as exc:
                opened.append(exc)
        connecting = threading.Thread(target=connect)
        connecting.start()
        with pytest.raises(TimeoutError):    # neither bounced nor answered: waiting for a worker
            ws.recv(0.5)
        assert not opened, opened
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        answer = ws.recv_until(lambda m: m[1] == "2", timeout=5)
        assert answer[3:] == ["phx_reply", {"status": "ok", "response": {"joined": topic}}]
        connecting.join(10)
        assert isinstance(opened[0], RawWS), opened
        assert join(opened[0], "1", f"echo:{uid()}")[4]["status"] == "ok"
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        ws.close()
        for other in opened:
            if isinstance(other, RawWS):
                other.close()


def run_workers(*args: str, env: dict | None = None, timeout: float = 20.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zchannels.workers", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bus", ["tcp://127.0.0.1", "127.0.0.1:5570", "tcp://:5570", "tcp://*:5570",
                                 "tcp://bad host:5570"])
def test_a_malformed_bus_stops_the_workers_command_with_one_line_and_exit_code_2(bus):
    done = run_workers("--bus", bus, "-n", "2", APP)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("zchannels workers: error: --bus must ") and repr(bus) in done.stderr
    assert "worker started" not in done.stderr   # checked before forking


@pytest.mark.timeout(30)
def test_an_app_that_cannot_be_imported_stops_the_workers_command_with_one_line_and_exit_code_2():
    done = run_workers("--bus", "tcp://127.0.0.1:9", "-n", "2", APP, env={"RESTART_APP_RAISE": "1"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("zchannels workers: error: cannot load app "), done.stderr
    raising = next(n for n, line in enumerate((ROOT / APP).read_text().splitlines(), 1)
                   if "raise RuntimeError" in line)
    assert "RESTART_APP_RAISE is set" in done.stderr and f"restart_app.py:{raising})" in done.stderr
    assert "worker started" not in done.stderr   # the module is tried before forking any


@pytest.mark.timeout(30)
def test_an_app_crashing_at_start_is_restarted_with_growing_delays(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "zchannels.workers", "--bus", "tcp://127.0.0.1:9", "-n", "1", APP],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err", "w"),
                            env={**os.environ, "RESTART_APP_CRASH": "1"})
    try:
        rx = re.compile(r"exited with code 3 after [\d.]+s; restart in ([\d.]+)s")
        delays = wait_until(lambda: len(d := rx.findall((tmp_path / "err").read_text())) >= 4 and d, timeout=15)
        delays = [float(d) for d in delays]
        assert delays[:4] == sorted(delays[:4]) and delays[3] >= 0.7, delays
        assert proc.poll() is None   # a crash is not a configuration error: it keeps trying
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.timeout(60)
def test_a_stuck_worker_dumps_its_stack_to_the_log_and_is_replaced(cluster_factory):
    cluster = cluster_factory(app=APP, edges=1, workers=1, worker_args=["--stuck-timeout", "1.5"])
    (victim,) = cluster.worker_pids
    ws = RawWS.connect(cluster.raw_url(0))
    try:
        topic = f"echo:{uid()}"
        assert join(ws, "1", topic)[4]["status"] == "ok"
        ws.send_json(["1", "2", topic, "block", {"s": 60}])
        cluster.wait_new_worker({victim}, timeout=20)
        log = cluster.supervisor.stderr_text()
        assert re.search(rf"worker stuck slot=0 pid={victim}", log), log
        assert "block_the_event_loop" in log, log          # faulthandler's dump, every thread
        assert re.search(rf"pid={victim} killed by SIGABRT", log), log
    finally:
        ws.close()



@pytest.mark.timeout(30)
def test_a_worker_started_without_the_cli_check_refuses_an_address_libzmq_rejects():
    """A supervisor that spawns `python -m workers.runner` gets the reserved exit code, not a loop."""
    from zchannels.workers.supervisor import HANDLER_LOAD_ERROR
    done = subprocess.run([sys.executable, "-m", "zchannels.workers.runner", APP, "--bus", "tcp://bad host:5570"],
                          cwd=ROOT, capture_output=True, text=True, timeout=20)
    assert done.returncode == HANDLER_LOAD_ERROR
    assert done.stderr.count("\n") == 1 and "cannot connect to --bus 'tcp://bad host:5570'" in done.stderr, done.stderr
