#!/usr/bin/env python3
"""Message recovery, measured: prints figures (not a test).

    .venv/bin/python bench/recovery.py [--parts fanout,catchup,memory] [--store memory|redis|both]

a. fanout   server CPU per fan-out delivery with history off and on: bench/run.py's fan-out
            phase (bench/loadgen.js clients, two edges, two workers) run alternately with and
            without ``--history 'room:*=1000/300'`` on the broker, ``--rounds`` times each.
b. catchup  CLIENTS raw clients (bench/recoveryclients.js) joined to one topic on one edge; the
            edge is killed, MISSED broadcasts are published over OUTAGE seconds, the edge is
            started again on the same port and every client rejoins at once with its last
            position: time until all have caught up (every missed broadcast, in order, once),
            and the server CPU it took.
c. memory   N broadcasts stored over T topics: broker RSS growth per stored message (memory
            store) and Redis ``used_memory`` growth per stored message (Redis store).

The app is bench/recovery_app.py (the chat example's channels without their own history
declaration), so history is on or off by the broker's flag alone.
"""
# Run as a script: bench/ is first on sys.path, its modules import by their plain names.
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster import PY, ROOT, Proc, log, raise_nofile, stop_all
from procstats import Sample, cpu_delta

APP = "bench/recovery_app.py"
RULE = "room:*=1000/300"
REDIS_SERVER = "/usr/bin/redis-server"
sys.path.insert(0, str(ROOT))
from tests.redisserver import RedisServer   # noqa: E402  (a real redis-server on a free port)
from zchannels import Publisher              # noqa: E402


# ---- a. fan-out CPU per delivery, history off vs on ------------------------------------------

def fanout(a) -> dict:
    out: dict = {"off": [], "on": []}
    for r in range(a.rounds):
        for mode in ("off", "on"):
            extra = ["--broker-arg=--history", f"--broker-arg={RULE}"] if mode == "on" else []
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                cmd = [PY, "bench/run.py", "--phases", "fanout", "--app", APP, "--subs", str(a.subs),
                       "--msgs", str(a.msgs), "--subs-big", str(a.subs), "--msgs-big", "1",
                       "--fanout-modes", "blast", "--quiet-wait", str(a.quiet_wait),
                       "--json", f.name, *extra]
                log(f"a. round {r + 1}, history {mode}: {' '.join(cmd[1:])}")
                run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
                if run.returncode != 0:
                    log(f"  bench/run.py failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
                    continue
                res = json.load(open(f.name))["phases"]["fanout"]["blast"]
            out[mode].append(res)
            log(f"  history {mode}: {res['server_cpu_us_per_delivery']} us server CPU per delivery, "
                f"{res['received']}/{res['expected']} received, lost {res['lost']}, dup {res['duplicates']}, "
                f"p50 {res['latency']['p50_ms']} ms, p99 {res['latency']['p99_ms']} ms")
    best = {m: min((r["server_cpu_us_per_delivery"] for r in rs), default=None) for m, rs in out.items()}
    if best["off"] and best["on"]:
        log(f"a. fan-out {a.subs} subscribers x {a.msgs} messages, best of {a.rounds}: history off "
            f"{best['off']} us, on {best['on']} us per delivery = {best['on'] / best['off']:.2f}x")
    out["best_us_per_delivery"] = best
    return out


# ---- the system for b. and c.: broker, one edge on a fixed port, workers ----------------------

class System:
    def __init__(self, store: str, tmpdir: str, workers: int = 2):
        self.tmpdir = tmpdir
        self.procs: list[Proc] = []
        self.server: dict = {}
        self.redis: RedisServer | None = None
        store_arg = "memory"
        if store == "redis":
            self.redis = RedisServer(Path(tmpdir))
            store_arg = self.redis.url
        self.broker = self._start("broker", [PY, "-m", "zchannels.broker", "--bus", "tcp://127.0.0.1:0",
                                             "--history", RULE, "--history", "mem:*=1000/3600",
                                             "--history-store", store_arg])
        self.bus = self.broker.wait_line("READY", 30).split("bus=", 1)[1].split()[0]
        self.workers = self._start("workers", [PY, "-m", "zchannels.workers", "--bus", self.bus,
                                               "-n", str(workers), APP])
        for _ in range(workers):
            self.workers.wait_line("READY", 30)
        self.port = 0
        self.edge: Proc | None = None
        self.start_edge()
        if self.redis is not None:
            self.server["redis"] = self.redis.proc

    def _start(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.tmpdir)
        self.procs.append(p)
        self.server[name] = p.p
        return p

    def start_edge(self) -> None:
        self.edge = self._start("edge", [PY, "-m", "zchannels.edge", "--bus", self.bus, "--host", "127.0.0.1",
                                         "--port", str(self.port), "--max-rate", "0",
                                         "--max-pending-per-peer", "100000", "--max-pending", "100000"])
        http = self.edge.wait_line("READY", 30).split("http=", 1)[1].split()[0]
        self.port = int(http.rsplit(":", 1)[1])
        self.ws = f"ws://127.0.0.1:{self.port}/socket/websocket"

    def kill_edge(self) -> None:
        self.edge.finished = True
        self.edge.p.send_signal(signal.SIGKILL)
        self.edge.p.wait(5)

    def sample(self) -> Sample:
        return Sample({k: v for k, v in self.server.items() if v.poll() is None})

    def stop(self) -> None:
        stop_all(list(reversed(self.procs)))
        if self.redis is not None:
            self.redis.stop()


class Clients:
    def __init__(self, tmpdir: str):
        self.proc = Proc("recoveryclients", ["node", "bench/recoveryclients.js"], tmpdir, stdin=subprocess.PIPE)
        self.ids = 0

    def call(self, cmd: dict, timeout: float) -> dict:
        self.ids += 1
        self.proc.p.stdin.write((json.dumps({"id": self.ids, **cmd}) + "\n").encode())
        self.proc.p.stdin.flush()
        line = self.proc.wait_line("{", timeout)
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError(f"recoveryclients {cmd['cmd']}: {answer.get('error')}")
        return answer


def head_position(system: System, topic: str) -> str:
    """The topic's last position, as a fresh client's zc_recovery tells it."""
    probe = subprocess.run(["node", "-e", PROBE_JS, system.ws, topic], capture_output=True, text=True,
                           timeout=30, cwd=ROOT)
    return probe.stdout.strip()


PROBE_JS = """
const WebSocket = require("ws");
const [url, topic] = process.argv.slice(1);
const ws = new WebSocket(url + "?vsn=2.0.0&user=probe");
ws.on("open", () => ws.send(JSON.stringify(["1", "1", topic, "phx_join", {}])));
ws.on("message", (d) => { const m = JSON.parse(d); if (m[3] === "zc_recovery") { console.log(m[4].position); process.exit(0); } });
setTimeout(() => process.exit(1), 20000);
"""


def catchup(a, store: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="zchannels-recovery-bench-")
    system = System(store, tmp)
    clients = None
    try:
        clients = Clients(tmp)
        topic = "room:lobby"
        opened = clients.call({"cmd": "open", "n": a.clients, "url": system.ws, "topic": topic}, 300)
        log(f"b. [{store}] {opened['joined']} clients joined {topic} in {opened['ms']} ms")
        pub = Publisher(system.bus)
        pub.wait_connected(10)
        system.kill_edge()
        clients.call({"cmd": "wait_closed"}, 30)
        t0 = time.monotonic()
        for i in range(a.missed):       # spread over the outage
            pub.broadcast(topic, "new_msg", {"body": f"missed {i}", "user": "bench"})
            time.sleep(max(0.0, t0 + (i + 1) * a.outage / a.missed - time.monotonic()))
        pub.close()
        system.start_edge()
        head = head_position(system, topic)
        log(f"b. [{store}] edge down {time.monotonic() - t0:.1f} s, {a.missed} broadcasts sent; head {head}")
        s0 = system.sample()
        res = clients.call({"cmd": "rejoin", "url": system.ws, "head": head, "timeout_ms": 120000}, 180)
        s1 = system.sample()
        d = cpu_delta(s0, s1)
        res["server_cpu_s"] = round(d["total_s"], 3)
        res["server_cpu_by_process_s"] = {k: round(v, 3) for k, v in d["per_process_s"].items()}
        log(f"b. [{store}] {res['caught_up']}/{res['clients']} clients caught up; all in "
            f"{res['all_caught_up_ms']} ms (all rejoined in {res['all_joined_ms']} ms, per client p50 "
            f"{res['p50_ms']} ms, p99 {res['p99_ms']} ms); {res['broadcasts']} broadcasts replayed, "
            f"gaps {res['gaps']}, duplicates {res['duplicates']}, statuses {res['statuses']}")
        log(f"b. [{store}] server CPU {res['server_cpu_s']} s: " +
            ", ".join(f"{k} {v}" for k, v in res["server_cpu_by_process_s"].items()))
        return res
    finally:
        if clients is not None:
            stop_all([clients.proc])
        system.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def redis_used_memory(server: RedisServer) -> int:
    import redis
    return int(redis.Redis(port=server.port).info("memory")["used_memory"])


def memory(a, store: str) -> dict:
    """``--mem-rounds`` rounds, each storing N more messages on topics of its own: growth per
    round, so a high-water mark of the first (buffers kept by the allocator) shows as such."""
    tmp = tempfile.mkdtemp(prefix="zchannels-recovery-bench-")
    system = System(store, tmp)
    rounds = []
    try:
        pub = Publisher(system.bus)
        pub.wait_connected(10)
        quiet(system)
        per_topic = a.mem_messages // a.mem_topics
        total = per_topic * a.mem_topics
        payload = {"body": "x" * 80, "user": "bench"}        # a chat line, ~100 bytes of JSON
        for r in range(a.mem_rounds):
            s0 = system.sample()
            r0 = redis_used_memory(system.redis) if system.redis else 0
            for _ in range(per_topic):
                for t in range(a.mem_topics):
                    while True:
                        try:
                            pub.broadcast(f"mem:{r}:{t}", "new_msg", payload)
                            break
                        except Exception:       # the queue is full: let it drain
                            time.sleep(0.01)
            pub.wait_connected(10)
            quiet(system)
            s1 = system.sample()
            broker_kb = s1.rss_by_role()["broker"] - s0.rss_by_role()["broker"]
            out = {"messages": total, "topics": a.mem_topics, "broker_rss_delta_kb": broker_kb,
                   "broker_bytes_per_message": round(broker_kb * 1024 / total, 1)}
            line = f"c. [{store}] round {r + 1}: {total} more messages over {a.mem_topics} topics: broker " \
                   f"RSS +{broker_kb} KB = {out['broker_bytes_per_message']} bytes per message"
            if system.redis:
                used = redis_used_memory(system.redis) - r0
                out["redis_used_memory_delta"] = used
                out["redis_bytes_per_message"] = round(used / total, 1)
                line += f"; Redis used_memory +{used // 1024} KB = {out['redis_bytes_per_message']} bytes per message"
            log(line)
            rounds.append(out)
        pub.close()
        return {"rounds": rounds}
    finally:
        system.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def quiet(system: System, idle_s: float = 1.0, limit_s: float = 120.0) -> None:
    """Wait until the broker (and Redis) used under 2 % of a core over idle_s: all stored."""
    end = time.monotonic() + limit_s
    prev = system.sample()
    while time.monotonic() < end:
        time.sleep(idle_s)
        cur = system.sample()
        busy = sum(v for k, v in cpu_delta(prev, cur)["per_process_s"].items()
                   if k in ("broker", "redis"))
        prev = cur
        if busy < 0.02 * idle_s:
            return


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="fanout,catchup,memory")
    ap.add_argument("--store", default="both", choices=["memory", "redis", "both"])
    ap.add_argument("--rounds", type=int, default=2, help="a. runs of each of off/on")
    ap.add_argument("--subs", type=int, default=1000, help="a. subscribers")
    ap.add_argument("--msgs", type=int, default=200, help="a. broadcasts")
    ap.add_argument("--quiet-wait", type=float, default=60, help="a. see bench/run.py")
    ap.add_argument("--clients", type=int, default=1000, help="b. clients reconnecting at once")
    ap.add_argument("--missed", type=int, default=500, help="b. broadcasts sent during the outage")
    ap.add_argument("--outage", type=float, default=10.0, help="b. seconds the edge is down")
    ap.add_argument("--mem-messages", type=int, default=100_000, help="c. messages stored")
    ap.add_argument("--mem-topics", type=int, default=100, help="c. topics they are spread over")
    ap.add_argument("--mem-rounds", type=int, default=2, help="c. rounds of --mem-messages each")
    ap.add_argument("--json", help="write the figures to this JSON file")
    a = ap.parse_args()
    raise_nofile()
    parts = a.parts.split(",")
    stores = ["memory", "redis"] if a.store == "both" else [a.store]
    if "redis" in stores and not Path(REDIS_SERVER).exists():
        log(f"{REDIS_SERVER} is missing: the Redis figures are skipped")
        stores.remove("redis")
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: dict = {}
    if "fanout" in parts:
        results["fanout"] = fanout(a)
    for store in stores:
        if "catchup" in parts:
            results[f"catchup_{store}"] = catchup(a, store)
        if "memory" in parts:
            results[f"memory_{store}"] = memory(a, store)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())
