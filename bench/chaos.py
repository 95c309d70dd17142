#!/usr/bin/env python3
"""Chaos benchmark: real phoenix.js clients in their channels while workers, the broker and an
edge are killed under them; prints what that cost the clients, per fault.

    .venv/bin/python bench/chaos.py [--quick] [--clients N] [--duration S] ... [--json FILE]

The system: a broker, one `zchannels workers -n 2` supervisor running bench/chaosapp.py, two
edges, all on free loopback ports (bench/chaossystem.py). The clients: `--clients` phoenix.js
sockets (npm phoenix + ws, bench/chaosclient.js, a few Node processes), spread over both edges,
each joined to one of `--topics` room topics and pushing "ping" every `--ping-every` s. A
Publisher (zchannels/publisher.py) sends `--rate` numbered broadcasts a second, round robin over
the topics. The schedule, in seconds from the start (every number an option):

    every 2 s from 2 to 60   kill -9 of a random ready worker (the supervisor restarts it)
    20                       kill -9 of the broker; 21: a new broker on the same bus ports
    40                       SIGTERM to edge 2; 45: a new edge 2 on the same HTTP port

then `--tail` s more of traffic; then publishing and pinging stop, the run waits (bounded) until
every ping has an outcome and every client is joined, collects the clients' reports and stops
everything. Reconnects are phoenix.js's own (default reconnectAfterMs / rejoinAfterMs); with
`--reconnect failover` (the default) each new connection attempt of a client dials the next edge
(what a load balancer in front of the edges does), with `--reconnect same` its own edge again.

It prints a markdown table per fault (worker kills, broker restart, edge restart) and overall:
time out of channel per episode (p50/p99/max), pings ok/error/timeout/without outcome,
broadcasts owed/lost/duplicated, tracebacks in the logs, and the bounds of issue 10 as pass/fail
(bench/chaosreport.py explains the fault windows). `--json FILE` writes the summary, `--raw FILE`
the whole record, which `--analyse FILE` judges again without a run. Exit code 0 whatever the
figures (a benchmark, not a test; tests/test_chaos.py asserts on a short run). Everything it
starts is stopped on exit, also after an error, Ctrl-C or SIGTERM; traffic stays on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import chaosreport
from chaossystem import ROOT, System, now_ms

sys.path.insert(1, str(ROOT))   # zchannels.publisher, when run as bench/chaos.py

APP = "bench/chaosapp.py"

# The schedule, and a short one (--quick, also what tests/test_chaos.py runs).
FULL = dict(clients=200, node_procs=2, topics=20, rate=50.0, duration=60.0, kill_every=2.0,
            broker_kill_at=20.0, broker_down=1.0, edge_term_at=40.0, edge_restart_at=45.0, tail=5.0)
QUICK = dict(clients=40, node_procs=1, topics=8, rate=20.0, duration=30.0, kill_every=2.0,
             broker_kill_at=11.0, broker_down=1.0, edge_term_at=21.0, edge_restart_at=24.0, tail=4.0)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Stop(Exception):
    """SIGTERM / SIGINT: unwind through the finally blocks, which stop every process."""


def _stop(signum, frame):
    raise Stop(signal.Signals(signum).name)


# ---- the publisher ---------------------------------------------------------------------

class Publishing:
    """`rate` numbered broadcasts a second, round robin over the topics, from a thread; every
    one recorded as [n, wall ms, accepted] per topic (n counts per topic from 1)."""

    def __init__(self, bus: str, topics: list[str], rate: float):
        from zchannels.publisher import Publisher
        # The broker is down for a while on purpose: be told (False), never raise for that.
        self.pub = Publisher(bus, unreachable_timeout=3600.0)
        if not self.pub.wait_connected(10):
            raise RuntimeError(f"publisher: bus {bus} not reachable within 10 s")
        self.topics, self.rate = topics, rate
        self.record: dict[str, list[list]] = {t: [] for t in topics}
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from zchannels.publisher import PublishError
        gap = 1.0 / self.rate
        next_at = time.monotonic()
        k = 0
        while not self._halt.is_set():
            topic = self.topics[k % len(self.topics)]
            entries = self.record[topic]
            n = len(entries) + 1
            t = now_ms()
            try:
                ok = self.pub.broadcast(topic, "bcast", {"topic": topic, "n": n, "t": t})
            except PublishError as exc:
                ok = False
                if len(self.errors) < 5:
                    self.errors.append(str(exc))
            entries.append([n, t, bool(ok)])
            k += 1
            next_at += gap
            self._halt.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.pub.close(linger=1.0)


# ---- the schedule ----------------------------------------------------------------------

class Chaos:
    """Runs the schedule against a started System and records the faults it made."""

    def __init__(self, args, system: System):
        self.args, self.system = args, system
        self.rng = random.Random(args.seed)
        self.kills: list[dict] = []
        self.broker: dict | None = None
        self.edge: dict | None = None
        self.unexpected: list[str] = []
        self.victims: set[str] = set()     # processes ended on purpose
        self._reported: set[str] = set()

    def actions(self) -> list[tuple[float, str]]:
        a = self.args
        out = []
        if a.kill_every > 0:
            t = a.kill_every
            while t <= a.duration + 1e-9:
                out.append((t, "kill_worker"))
                t += a.kill_every
        if a.broker_kill_at >= 0:
            out += [(a.broker_kill_at, "kill_broker"), (a.broker_kill_at + a.broker_down, "start_broker")]
        if a.edge_term_at >= 0:
            out += [(a.edge_term_at, "term_edge"), (a.edge_restart_at, "start_edge")]
        return sorted(out, key=self.order)

    # At the same time: a fault before its repair.
    ORDER = ("kill_worker", "kill_broker", "start_broker", "term_edge", "start_edge")

    def order(self, action: tuple[float, str]) -> tuple[float, int]:
        return action[0], self.ORDER.index(action[1])

    def run(self, t0_mono: float, t0: float) -> None:
        pending = self.actions()
        while pending:
            at, name = pending[0]
            wait = t0_mono + at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.05))
                self.watch()
                continue
            pending.pop(0)
            if getattr(self, "do_" + name)(t0) is False:   # not possible yet: try again shortly
                pending = sorted(pending + [(at + 0.05, name)], key=self.order)
        self.watch()

    def do_kill_worker(self, t0: float) -> None:
        k = self.system.kill_random_worker(self.rng)
        self.kills.append(k)
        what = f"pid {k['pid']} (slot {k['slot']})" if k["pid"] else "nothing: no ready worker"
        log(f"t={(k['t'] - t0) / 1000:5.1f} kill -9 worker: {what}")

    def do_kill_broker(self, t0: float) -> None:
        self.victims.add(self.system.brokers[-1].name)
        self.broker = {"kill": self.system.kill_broker(), "start": None, "ready": None}
        log(f"t={(self.broker['kill'] - t0) / 1000:5.1f} kill -9 broker")

    def do_start_broker(self, t0: float) -> None:
        self.broker["start"] = now_ms()
        self._new_broker = self.system.start_broker()
        log(f"t={(self.broker['start'] - t0) / 1000:5.1f} broker started again on {self.system.bus}")

    def do_term_edge(self, t0: float) -> None:
        i = self.args.edge_victim
        self.victims.add(self.system.edges[i][-1].name)
        self.edge = {"index": i, "term": self.system.term_edge(i), "exit": None, "exit_code": None,
                     "sigkilled": False, "start": None, "ready": None}
        log(f"t={(self.edge['term'] - t0) / 1000:5.1f} SIGTERM edge {i + 1} (port {self.system.ports[i]})")

    def do_start_edge(self, t0: float) -> bool:
        old = self.system.edges[self.args.edge_victim][-1]
        if old.p.poll() is None:
            if now_ms() - self.edge["term"] < self.args.edge_exit_wait * 1000:
                return False   # still draining: its port is not free yet
            old.kill_group()
            old.p.wait(5)
            self.edge["sigkilled"] = True
            log(f"edge {self.args.edge_victim + 1} still running {self.args.edge_exit_wait:g} s after SIGTERM: SIGKILL")
        self.edge["exit"] = old.exited_at or now_ms()
        self.edge["exit_code"] = old.p.returncode
        self.edge["start"] = now_ms()
        self._new_edge = self.system.start_edge(self.args.edge_victim)
        log(f"t={(self.edge['start'] - t0) / 1000:5.1f} edge {self.args.edge_victim + 1} started again "
            f"(the old one exited with code {old.p.returncode})")
        return True

    def watch(self) -> None:
        """Stamp the victims' exit times; note any other process that ended on its own."""
        s = self.system
        for child in [*s.brokers, *(e for slot in s.edges for e in slot), s.supervisor, *s.clients]:
            if child.alive() or child.name in self.victims or child.name in self._reported:
                continue
            self._reported.add(child.name)
            self.unexpected.append(f"{child.name} (code {child.p.returncode})")
            log(f"{child.name} exited on its own with code {child.p.returncode}:\n{child.tail(10)}")

    def finish(self) -> None:
        if self.broker is not None and self.broker["start"] is not None:
            self.broker["ready"] = self._new_broker.first_ready()
        if self.edge is not None and self.edge["start"] is not None:
            self.edge["ready"] = self._new_edge.first_ready()


# ---- one run ---------------------------------------------------------------------------

def run(args) -> dict:
    logdir = Path(tempfile.mkdtemp(prefix="zchannels-chaos-"))
    log(f"process logs in {logdir}")
    system = System(args.app, args.workers, args.edges, logdir, args.edge_arg, args.worker_arg, args.broker_arg)
    publishing = None
    record: dict = {}
    try:
        system.start()
        log(f"system up: bus {system.bus}, edges {', '.join(system.urls)}, {args.workers} workers")
        topics = [f"room:chaos-{k}" for k in range(args.topics)]
        end_s = max(args.duration, args.broker_kill_at + args.broker_down, args.edge_restart_at) + args.tail
        budget = end_s + args.drain_timeout + 120
        client_cfg = {"urls": system.urls, "clients": args.clients, "topics": args.topics,
                      "ping_ms": int(args.ping_every * 1000), "push_timeout_ms": int(args.push_timeout * 1000),
                      "reconnect": args.reconnect, "join_deadline_ms": 30_000, "max_runtime_s": int(budget)}
        ready = system.start_clients(args.node_procs, client_cfg, timeout=40)
        joined = sum(r["joined"] for r in ready)
        if joined < args.clients:
            raise RuntimeError(f"only {joined}/{args.clients} clients joined within 30 s")
        log(f"{args.clients} phoenix.js clients joined ({args.node_procs} Node process(es), "
            f"{args.topics} topics, reconnect {args.reconnect})")
        publishing = Publishing(system.bus, topics, args.rate)
        chaos = Chaos(args, system)
        for c in system.clients:
            c.command("start")
        publishing.start()
        t0_mono, t0 = time.monotonic(), now_ms()
        chaos.run(t0_mono, t0)
        while time.monotonic() < t0_mono + end_s:
            time.sleep(0.1)
            chaos.watch()
        publishing.stop()
        stop_t = now_ms()
        for c in system.clients:
            c.command("stop")
        log(f"t={(stop_t - t0) / 1000:5.1f} publishing and pinging stopped; waiting for every ping's "
            f"outcome and every client joined (at most {args.drain_timeout:g} s)")
        deadline = time.monotonic() + args.drain_timeout
        while True:
            states = [c.command("status") for c in system.clients]
            pending, joined = sum(s["pending"] for s in states), sum(s["joined"] for s in states)
            if (pending == 0 and joined == args.clients) or time.monotonic() >= deadline:
                break
            time.sleep(0.25)
        time.sleep(0.5)   # the last broadcasts' stragglers
        chaos.finish()
        report_t = now_ms()
        reports = [cl for c in system.clients for cl in c.command("report", timeout=60)["clients"]]
        log(f"reports in: {pending} ping(s) still without outcome, {joined}/{args.clients} joined")
        record = {
            "commit": _commit(), "config": _config(args), "t0": t0, "stop_t": stop_t, "report_t": report_t,
            "kills": chaos.kills, "broker": chaos.broker, "edge": chaos.edge,
            "worker_ready": [[t, int(f.get("worker", -1)), int(f.get("pid", 0))]
                             for t, f in system.worker_ready_lines()],
            "publications": publishing.record, "publisher_errors": publishing.errors,
            "clients": sorted(reports, key=lambda c: c["id"]), "unexpected_exits": chaos.unexpected,
        }
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)   # the clean-up below is bounded: let it finish
        if publishing is not None:
            publishing.stop()
        killed = system.stop()
        if record:
            record["sigkilled_at_stop"] = killed
            record["logs"] = {c.name: chaosreport.scan_log(c.err_path) for c in system.children}
        if args.keep_logs or not record:
            log(f"process logs kept in {logdir}")
        else:
            shutil.rmtree(logdir, ignore_errors=True)
    return record


def _config(args) -> dict:
    keys = ("clients", "node_procs", "topics", "rate", "duration", "kill_every", "broker_kill_at",
            "broker_down", "edge_term_at", "edge_restart_at", "edge_victim", "tail", "ping_every",
            "push_timeout", "reconnect", "workers", "edges", "seed", "guard", "window_tail",
            "bound_out", "bound_edge", "app", "edge_arg", "worker_arg", "broker_arg", "quick")
    return {k: getattr(args, k) for k in keys}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out + ("+changes" if dirty else "") if out else None
    except (OSError, subprocess.SubprocessError):
        return None


# ---- command line ----------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the short schedule (40 clients, 30 s, broker at 11 s, edge at 21/24 s); "
                        "options given as well still win")
    g = p.add_argument_group("load")
    g.add_argument("--clients", type=int, help="phoenix.js clients (200; quick 40)")
    g.add_argument("--node-procs", type=int, help="Node processes the clients are spread over (2; quick 1)")
    g.add_argument("--topics", type=int, help="room topics the clients are spread over (20; quick 8)")
    g.add_argument("--rate", type=float, help="numbered broadcasts per second, over all topics (50; quick 20)")
    g.add_argument("--ping-every", type=float, default=0.5, help="seconds between a client's pings (0.5)")
    g.add_argument("--push-timeout", type=float, default=10.0, help="phoenix.js push and join timeout, s (10)")
    g.add_argument("--reconnect", choices=["failover", "same"], default="failover",
                   help="a reconnecting client dials the next edge (failover, default) or its own (same)")
    g = p.add_argument_group("schedule (seconds from the start; a negative time leaves that fault out)")
    g.add_argument("--duration", type=float, help="worker kills from kill-every up to this time (60; quick 30)")
    g.add_argument("--kill-every", type=float, help="seconds between worker kills, 0 = none (2)")
    g.add_argument("--broker-kill-at", type=float, help="kill -9 of the broker (20; quick 11)")
    g.add_argument("--broker-down", type=float, help="seconds until the new broker starts (1)")
    g.add_argument("--edge-term-at", type=float, help="SIGTERM to the victim edge (40; quick 21)")
    g.add_argument("--edge-restart-at", type=float, help="the victim edge started again (45; quick 24)")
    g.add_argument("--edge-victim", type=int, default=1, help="index of the edge to SIGTERM (1 = the second)")
    g.add_argument("--edge-exit-wait", type=float, default=30.0,
                   help="how long a SIGTERMed edge may take to exit before SIGKILL (30)")
    g.add_argument("--tail", type=float, help="seconds of traffic after the last fault (5; quick 4)")
    g.add_argument("--drain-timeout", type=float, default=25.0,
                   help="at most this long, at the end, for every ping's outcome and every client joined (25)")
    g.add_argument("--seed", type=int, default=None, help="random seed for the choice of workers")
    g = p.add_argument_group("system")
    g.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    g.add_argument("--edges", type=int, default=2, help="edges (2)")
    g.add_argument("--app", default=APP, help=f"handler module (default {APP})")
    g.add_argument("--edge-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for every edge, e.g. --edge-arg=--heartbeat-timeout=30 (repeatable)")
    g.add_argument("--worker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the supervisor (repeatable)")
    g.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for the broker (repeatable)")
    g = p.add_argument_group("judging")
    g.add_argument("--guard", type=float, default=0.5,
                   help="a broadcast is owed to a client in its channel from guard s before to guard s "
                        "after it was published; fault windows start guard s early (0.5)")
    g.add_argument("--window-tail", type=float, default=2.0,
                   help="fault windows end this long after the restarted process is READY (2)")
    g.add_argument("--bound-out", type=float, default=3.0, help="issue bound: s out of channel (3)")
    g.add_argument("--bound-edge", type=float, default=2.0,
                   help="issue bound: s from a reachable reconnect attempt to joined (2)")
    g = p.add_argument_group("output")
    g.add_argument("--json", metavar="FILE", help="write the summary as JSON")
    g.add_argument("--raw", metavar="FILE", help="write the whole record of the run as JSON")
    g.add_argument("--analyse", metavar="FILE",
                   help="judge a record written by --raw again, with this command line's judging options; no run")
    g.add_argument("--keep-logs", action="store_true", help="keep the processes' log directory")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.edge_victim >= args.edges or args.edges < 1 or args.workers < 1 or args.clients < 1:
        p.error("need at least one edge, worker and client, and --edge-victim below --edges")
    if args.edge_term_at >= 0 and args.edge_restart_at < args.edge_term_at:
        p.error("--edge-restart-at must not come before --edge-term-at")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    if args.analyse:
        record = json.loads(Path(args.analyse).read_text())
        record["config"].update({k: getattr(args, k) for k in ("guard", "window_tail", "bound_out", "bound_edge")})
    else:
        try:
            record = run(args)
        except Stop as exc:
            log(f"stopped by {exc}; every process it started is stopped")
            return 130
        if args.raw:
            Path(args.raw).write_text(json.dumps(record))
    summary = chaosreport.analyse(record)
    cfg = summary["config"]
    print(f"\n## Chaos run on {summary['commit']}: {cfg['clients']} clients, {cfg['workers']} workers, "
          f"{cfg['edges']} edges, reconnect {cfg['reconnect']}{' (quick)' if cfg['quick'] else ''}\n")
    print(chaosreport.markdown(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=_json_default))
    return 0


def _json_default(v):
    return None if isinstance(v, float) and math.isinf(v) else str(v)


if __name__ == "__main__":
    sys.exit(main())
