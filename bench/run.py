#!/usr/bin/env python3
"""zchannels benchmark: one command, real processes, figures on stdout.

    .venv/bin/python bench/run.py [--quick] [--conns N] [--subs N] [--msgs N] [--json FILE] ...

Starts a broker, two edges and a worker supervisor (-n 2) running examples/chat/channels.py
on free loopback ports, drives them with bench/loadgen.js (raw Phoenix V2 JSON clients on the
npm `ws` package, one Node process, clients spread evenly over both edges) and measures:

  a. connections  N clients connect + join room:lobby: join time, RSS per joined connection
  b. fan-out      one client publishes "new_msg"; every joined client records the
                  publish -> receive latency. At S subscribers (M messages) and at the large
                  count (10k by default). "blast" publishes all messages back to back
                  (throughput); "paced" keeps one broadcast in flight (latency of a single
                  broadcast at that fan-out).
  c. round trips  C clients each keeping D "ping" pushes in flight (default 1: sequential)
                  for T seconds; the edges run with the per-connection rate limit off
                  (--max-rate 0), which the phase checks in the edges' logs and prints
  d. fairness     a few clients pipelining pings (many in flight each) while probe clients
                  do sequential pings; p99 of both
  cluster         (only with --phases ...,cluster) the broker pinned to one core (CPU 0), C
                  clients over both edges keeping D pings in flight each: pushes answered
                  per second, server CPU per push -> reply in total and per process, the
                  broker's share of its core (bench/phase_cluster.py)
  e. longpoll     (only with --phases ...,longpoll) L LongPoll clients: ping round trips with
                  the reply arriving through the poll, and broadcasts from one WebSocket
                  publisher to them (bench/phase_longpoll.py, bench/lpclient.js)
  f. maxconns     (only with --phases ...,maxconns; meant for --edge-processes 2) as many joined
                  WebSocket clients as the machine holds, from several load generator
                  processes, then one broadcast to all (bench/phase_maxconns.py, massconns.js)
  g. presence     (only with --phases ...,presence) N clients, each under its own user name,
                  join room:lobby tracked in presence all at once and keep their lists as
                  phoenix.js does: time until every list is complete, presence frames and bytes
                  per client, server CPU; then all but K leave at once: time until the K
                  observers' lists are exact (bench/phase_presence.py, presclient.js)

Server CPU is utime+stime from /proc/PID/stat summed over every zchannels process (broker,
edges, supervisor and its worker children, found by walking /proc/PID/task/*/children),
sampled right before and after each phase; RSS is VmRSS from /proc/PID/status.
Benchmarks print figures; they are not tests (no pass/fail exit code for missed targets).
"""
# Run as a script, so Python puts bench/ first on sys.path and the sibling modules
# (procstats, cluster, loadgen, phases) import by their plain names.
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import phase_cluster
import phase_longpoll
import phase_maxconns
import phase_presence
from cluster import ROOT, Cluster, log, raise_nofile
from loadgen import LoadGen
from phases import PEERS, Phases
from procstats import read_proc

APP = "examples/chat/channels.py"


class Bench:
    def __init__(self, args):
        self.args = args
        self.cluster = Cluster(Path(args.server_tree).resolve() if args.server_tree else ROOT)
        self.lg: LoadGen | None = None
        self.results: dict = {"phases": {}, "errors": []}

    def run(self) -> int:
        a = self.args
        failed = False
        try:
            self.results["machine"] = machine(self.cluster.tree)
            self.cluster.start(a.edges, a.workers, a.app, a.edge_processes, a.broker_arg)
            self.lg = LoadGen(self.cluster.tmpdir)
            self.cluster.procs.append(self.lg.proc)
            self.results["args"] = vars(a)
            self.results["nofile"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
            self.results["server_rss_kb_idle"] = self.cluster.sample().rss_by_role()
            Phases(a, self.cluster, self.lg, self.results).run(a.phases)
            self.cluster.check_alive()
            stats = self.lg.call({"cmd": "stats"}, 30)
            self.results["client_counters"] = stats["counters"]
            self.results["client_error_reasons"] = stats["error_reasons"]
            self.results["client_first_errors"] = stats["first_errors"]
        except KeyboardInterrupt:
            log("interrupted")
            failed = True
        except Exception as exc:   # report, then stop everything
            log(f"FAILED: {exc}")
            self.results["errors"].append(f"FAILED: {exc}")
            failed = True
        finally:
            try:
                if self.lg:
                    self.lg.exit()
            finally:
                self.cluster.stop()
        self.report(failed)
        return 1 if failed else 0

    def report(self, failed: bool) -> None:
        a = self.args
        print()
        print("=" * 100)
        print("zchannels benchmark summary" + ("  (INCOMPLETE: a phase failed)" if failed else ""))
        m = self.results.get("machine", {})
        print(f"machine: {m.get('nproc')} cores, {m.get('cpu_model')}, {m.get('mem_gib')} GiB; "
              f"RLIMIT_NOFILE {self.results.get('nofile')}; python {m.get('python')}, node {m.get('node')}")
        print(f"code: {m.get('tree')} git {m.get('git_head')}" + (f" + uncommitted changes in {', '.join(m['git_modified_files'])}"
                                                  if m.get("git_modified_files") else ""))
        edges = f"one edge of {a.edge_processes} processes" if a.edge_processes > 0 else f"{a.edges} edge(s)"
        print(f"system: broker + {edges} + {a.workers} worker(s) running {a.app}")
        rows = []
        ph = self.results["phases"]
        c = ph.get("connections")
        if c:
            rows.append((f"a. connections: RSS per joined conn ({c['joined']} joined)",
                         f"{c['rss_kb_per_conn']} KB", "<= 30 KB", PEERS["rss_kb_per_conn"]))
            rows.append((f"a. connections: time to join {c['joined']} (+ settle)",
                         f"{c['join_elapsed_s']:.2f} s (+{c['settle_after_joins_s']} s)", "", ""))
            rows.append(("a. connections: server CPU per connect+join",
                         f"{c['server_cpu_us_per_join']} us", "", ""))
        for key in ("fanout", "fanout_big"):
            f = ph.get(key) or {}
            for mode, r in f.items():
                tag = f"b. fan-out {r['subscribers']}x{r['msgs']} {mode}"
                if mode == "blast":   # paced runs idle between broadcasts by design
                    rows.append((f"{tag}: deliveries/s", f"{r['deliveries_per_s']}", "", ""))
                rows.append((f"{tag}: p50 / p99 / max latency",
                             f"{r['latency']['p50_ms']} / {r['latency']['p99_ms']} / {r['latency']['max_ms']} ms",
                             "p99 < 200 ms" if r["subscribers"] >= 10000 else "",
                             PEERS["p99_ms_10k"] if r["subscribers"] >= 10000 else ""))
                rows.append((f"{tag}: server CPU per delivery", f"{r['server_cpu_us_per_delivery']} us",
                             "<= 10 us", PEERS["cpu_us_per_delivery"]))
                rows.append((f"{tag}: lost / duplicated", f"{r['lost']} / {r['duplicates']}", "0", ""))
        r = ph.get("round_trips")
        if r:
            limit = "edge rate limit off" if "rate limit off" in r["edge_rate_limit"] else "edge rate limit ON"
            rows.append((f"c. round trips ({r['shape']}, {limit}): round trips/s", f"{r['round_trips_per_s']}", "", ""))
            rows.append(("c. round trips: p50 / p99 latency",
                         f"{r['latency']['p50_ms']} / {r['latency']['p99_ms']} ms", "", ""))
            rows.append(("c. round trips: server CPU per round trip", f"{r['server_cpu_us_per_round_trip']} us",
                         "<= 60 us", PEERS["cpu_us_per_round_trip"]))
        r = ph.get("fairness")
        if r:
            rows.append((f"d. fairness: pipelining ({r['clients']}x depth {r['depth']}) p99",
                         f"{r['latency']['p99_ms']} ms", "", ""))
            rows.append((f"d. fairness: sequential probes ({r.get('probe_clients')}) p99",
                         f"{r.get('probe_latency', {}).get('p99_ms')} ms", "", ""))
        rows += (phase_cluster.summary_rows(self.results) + phase_longpoll.summary_rows(self.results) + phase_presence.summary_rows(self.results)
                 + phase_maxconns.summary_rows(self.results))
        w0 = max([len(x[0]) for x in rows] + [10])
        print(f"{'figure':<{w0}}  {'measured':<26} {'target':<14} peer on this machine")
        print("-" * 100)
        for name, val, tgt, peer in rows:
            print(f"{name:<{w0}}  {val:<26} {tgt:<14} {peer}")
        print("-" * 100)
        cc = self.results.get("client_counters")
        if cc:
            print("client counters: " + json.dumps({k: v for k, v in cc.items() if v}))
        if self.results.get("client_error_reasons"):
            print("client error replies by reason: " + json.dumps(self.results["client_error_reasons"]))
        seen: dict[str, int] = {}
        for e in self.results.get("client_first_errors") or []:
            seen[e] = seen.get(e, 0) + 1
        for e, n in seen.items():
            print(f"  client saw: {e}" + (f"  (x{n} among the first 20 recorded)" if n > 1 else ""))
        for when, flag in (("during the run", False), ("during shutdown", True)):
            problems = {}
            for pr in self.cluster.procs:
                n, first = pr.stderr_problems(during_shutdown=flag)
                if n:
                    problems[pr.name] = {"count": n, "first": first}
            self.results["stderr_problems_" + when.split()[-1]] = problems
            if problems:
                print(f"WARNING/ERROR/Traceback lines in process stderr {when}:")
                for name, p in problems.items():
                    print(f"  {name}: {p['count']} line(s)")
                    for line in p["first"]:
                        print(f"    {line}")
            else:
                print(f"no WARNING/ERROR/Traceback lines in any process's stderr {when}")
        for e in self.results["errors"]:
            print(f"problem: {e}")
        if failed:
            for pr in self.cluster.procs:
                print(f"--- tail of {pr.name} stderr ({pr.err_path}) ---")
                print(pr.stderr_tail())
        print(f"process logs: {self.cluster.tmpdir}")
        if a.json:
            Path(a.json).write_text(json.dumps(self.results, indent=2, default=str) + "\n")
            print(f"figures written to {a.json}")


def machine(tree: Path = ROOT) -> dict:
    model = ""
    text = read_proc("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in (read_proc("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1])
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=tree, capture_output=True, text=True).stdout.rstrip()
    head = git("rev-parse", "--short", "HEAD")
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"tree": str(tree), "git_head": head, "git_modified_files": dirty, "nproc": os.cpu_count(), "cpu_model": model,
            "mem_gib": round(mem / 1048576, 1), "kernel": os.uname().release,
            "python": sys.version.split()[0], "node": node}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small run: 1,000 connections, 200 subscribers x 50 msgs, 1,000 x 10, 3 s pings")
    ap.add_argument("--conns", type=int, help="a. clients to connect and join (default 10000; quick 1000)")
    ap.add_argument("--subs", type=int, help="b. subscribers (default 1000; quick 200)")
    ap.add_argument("--msgs", type=int, help="b. messages (default 200; quick 50)")
    ap.add_argument("--subs-big", type=int, help="b. large fan-out subscribers (default 10000; quick 1000)")
    ap.add_argument("--msgs-big", type=int, help="b. large fan-out messages (default 20; quick 10)")
    ap.add_argument("--fanout-modes", default="blast,paced",
                    help="comma list of blast (all messages back to back) and paced (one in flight)")
    ap.add_argument("--gap-ms", type=int, default=20, help="paced fan-out: pause between broadcasts")
    ap.add_argument("--quiet-ms", type=int, default=5000,
                    help="fan-out: stop waiting after this long without a delivery (counts the rest as lost)")
    ap.add_argument("--rt-clients", type=int, default=50, help="c. clients doing pings")
    ap.add_argument("--rt-depth", type=int, default=1,
                    help="c. pings in flight per client (default 1: each waits for its reply)")
    ap.add_argument("--rt-seconds", type=float, help="c. duration (default 10; quick 3)")
    ap.add_argument("--rt-count", type=int, default=0, help="c. pings per client instead of a duration")
    ap.add_argument("--fair-clients", type=int, default=20, help="d. pipelining clients")
    ap.add_argument("--fair-depth", type=int, default=100, help="d. pings in flight per pipelining client")
    ap.add_argument("--fair-probes", type=int, default=20, help="d. sequential probe clients")
    ap.add_argument("--fair-seconds", type=float, help="d. duration (default 10; quick 3)")
    ap.add_argument("--phases", default="connections,fanout,rt,fairness",
                    help="comma list of connections, fanout, rt, fairness, cluster, longpoll, presence, "
                         "maxconns (the last four only when named)")
    ap.add_argument("--cluster-clients", type=int, default=100,
                    help="cluster: clients pushing pings, round-robin over the edges")
    ap.add_argument("--cluster-depth", type=int, default=8, help="cluster: pings in flight per client")
    ap.add_argument("--cluster-seconds", type=float, default=10, help="cluster: duration (s)")
    ap.add_argument("--lp-clients", type=int, help="e. LongPoll clients (default 200; quick 50)")
    ap.add_argument("--lp-seconds", type=float, help="e. round-trip duration (default 10; quick 3)")
    ap.add_argument("--lp-msgs", type=int, help="e. broadcasts to the LongPoll clients (default 100; quick 20)")
    ap.add_argument("--lp-modes", default="paced,blast",
                    help="e. comma list of paced (one broadcast in flight, next --gap-ms after all "
                         "arrived) and blast (all back to back); default %(default)s")
    ap.add_argument("--mc-target", type=int, help="f. joined clients to reach (default 40000; quick 3000)")
    ap.add_argument("--mc-per-process", type=int, default=14000,
                    help="f. clients per load generator process (the number of processes follows)")
    ap.add_argument("--mc-sources", type=int, default=0,
                    help="f. source addresses 127.0.0.2.. to spread clients over (default: one per 4,000 clients)")
    ap.add_argument("--mc-batch", type=int, help="f. clients per ramp round (default 4000; quick 1000)")
    ap.add_argument("--mc-concurrency", type=int, default=100, help="f. connects+joins in flight per process")
    ap.add_argument("--mc-handshake-timeout", type=float, default=10, help="f. WebSocket handshake bound (s)")
    ap.add_argument("--mc-deliver-timeout", type=float, default=30,
                    help="f. how long every client may take to get the broadcast (s)")
    ap.add_argument("--mc-max-seconds", type=float, default=300, help="f. bound for the whole phase (s)")
    ap.add_argument("--presence-clients", type=int, default=2000,
                    help="g. clients joining tracked in presence, each under its own user name")
    ap.add_argument("--presence-observers", type=int, default=100,
                    help="g. clients that stay while all the others leave")
    ap.add_argument("--presence-timeout", type=float, default=60,
                    help="g. how long the lists may take to become complete (s)")
    ap.add_argument("--join-payload", default="{}", type=json.loads,
                    help='JSON join payload (default {}). The chat app announces a join when it is '
                         '{"announce": true}: a "user_joined" broadcast that passes through handle_out '
                         'of every member (N joins cost O(N^2) handle_out calls and pushes; add '
                         '"ignore": ["bench"] to filter them in handle_out)')
    ap.add_argument("--concurrency", type=int, default=200, help="connects+joins in flight")
    ap.add_argument("--join-timeout", type=float, default=1800, help="bound for opening clients (s)")
    ap.add_argument("--settle-timeout", type=float, default=600,
                    help="bound for waiting until the server is idle after a phase (s)")
    ap.add_argument("--fanout-timeout", type=float, default=600, help="bound for one fan-out run (s)")
    ap.add_argument("--quiet-wait", type=float, default=300,
                    help="before each measured phase wait up to this long (s) for other processes "
                         "to use < 10%% of a core (0: do not wait)")
    ap.add_argument("--edges", type=int, default=2)
    ap.add_argument("--edge-processes", type=int, default=0, metavar="N",
                    help="instead of --edges separate edges, start ONE edge with --processes N "
                         "(N processes sharing one port with SO_REUSEPORT)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--app", default=APP)
    ap.add_argument("--server-tree", metavar="DIR",
                    help="run the server processes from this checkout (its code, its .venv) instead of "
                         "this one; the load generator and the figures stay this tree's")
    ap.add_argument("--broker-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for the broker (repeatable), e.g. "
                         "--broker-arg=--history --broker-arg='room:*=1000/300'")
    ap.add_argument("--json", help="write all figures to this JSON file")
    a = ap.parse_args()
    q = a.quick
    a.conns = a.conns if a.conns is not None else (1000 if q else 10000)
    a.subs = a.subs if a.subs is not None else (200 if q else 1000)
    a.msgs = a.msgs if a.msgs is not None else (50 if q else 200)
    a.subs_big = a.subs_big if a.subs_big is not None else (1000 if q else 10000)
    a.msgs_big = a.msgs_big if a.msgs_big is not None else (10 if q else 20)
    a.rt_seconds = a.rt_seconds if a.rt_seconds is not None else (3 if q else 10)
    a.fair_seconds = a.fair_seconds if a.fair_seconds is not None else (3 if q else 10)
    a.fanout_modes = [m for m in a.fanout_modes.split(",") if m]
    a.phases = [p for p in a.phases.split(",") if p]
    known = {"connections", "fanout", "rt", "fairness", "cluster", "longpoll", "presence", "maxconns"}
    if set(a.phases) - known:
        ap.error(f"unknown phase(s) {', '.join(sorted(set(a.phases) - known))}; known: {', '.join(sorted(known))}")
    if a.rt_depth < 1 or a.cluster_depth < 1:
        ap.error("--rt-depth and --cluster-depth must be >= 1")
    a.lp_clients = a.lp_clients if a.lp_clients is not None else (50 if q else 200)
    a.lp_seconds = a.lp_seconds if a.lp_seconds is not None else (3 if q else 10)
    a.lp_msgs = a.lp_msgs if a.lp_msgs is not None else (20 if q else 100)
    a.lp_modes = [m for m in a.lp_modes.split(",") if m]
    a.mc_target = a.mc_target if a.mc_target is not None else (3000 if q else 40000)
    a.mc_batch = a.mc_batch if a.mc_batch is not None else (1000 if q else 4000)
    nofile = raise_nofile()
    need = max(a.conns, a.subs_big, a.subs, a.presence_clients) + 500   # per process: the loadgen holds one fd per client
    if nofile[0] < need:
        log(f"WARNING RLIMIT_NOFILE {nofile[0]} may be too low for {need - 500} clients")
    log(f"RLIMIT_NOFILE soft/hard {nofile[0]}/{nofile[1]} (inherited by all processes)")
    # Ctrl-C and SIGTERM: KeyboardInterrupt in the main thread, then everything is stopped.
    # (SIGINT explicitly: a shell starting us in the background would have it ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return Bench(a).run()


if __name__ == "__main__":
    sys.exit(main())
