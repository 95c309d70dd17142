"""The measured phases (docs/benchmarks.md, "Phases"): a. connections, b. fan-out,
c. round trips, d. fairness; cluster, e. longpoll, f. maxconns and g. presence are in
phase_cluster.py, phase_longpoll.py, phase_maxconns.py and phase_presence.py. Each one waits for the machine to be quiet, runs one load generator
command between two samples of server CPU and RSS, records its figures in
`results["phases"]`, logs them against the targets, and waits until the server is idle again.
"""
from __future__ import annotations

import time

import phase_cluster
import phase_longpoll
import phase_maxconns
import phase_presence
from cluster import Cluster, log
from loadgen import LoadGen
from procstats import Sample, all_proc_ticks, cpu_delta, cpu_figures, others_cpu_s, per_process_line, proc_tree

TARGETS = {
    "rss_kb_per_conn": 30.0,          # <= 30 KB RSS per connection (all processes)
    "cpu_us_per_delivery": 10.0,      # <= 10 us server CPU per fan-out delivery
    "p99_ms_10k": 200.0,              # p99 < 200 ms at 10k subscribers
    "cpu_us_per_round_trip": 60.0,    # <= 60 us server CPU per round trip
}
PEERS = {
    "rss_kb_per_conn": "Phoenix 1.7: 31 KB",
    "cpu_us_per_delivery": "Phoenix 1.7: 21-26 us",
    "p99_ms_10k": "Phoenix 1.7: ~400 ms",
    "cpu_us_per_round_trip": "Phoenix 1.7: 36-47 us",
}


class Phases:
    """The phases of one run, against a started cluster with its load generator; figures and
    problems go into `results` (the dict run.py prints and writes as JSON)."""

    def __init__(self, args, cluster: Cluster, lg: LoadGen, results: dict):
        self.args = args
        self.cluster = cluster
        self.lg = lg
        self.results = results

    def run(self, names: list[str]) -> None:
        """The phases named (connections, fanout, rt, fairness, cluster, longpoll, presence,
        maxconns), always in this order (the last four are in bench/phase_cluster.py,
        bench/phase_longpoll.py, bench/phase_presence.py and bench/phase_maxconns.py; cluster
        comes before the three that close the WebSocket clients of the earlier phases)."""
        a = self.args
        if "connections" in names:
            self.connections()
        if "fanout" in names:
            # the large fan-out first: it reuses the connections phase's clients
            self.fanout("fanout_big", a.subs_big, a.msgs_big)
            self.fanout("fanout", a.subs, a.msgs)
        if "rt" in names:
            self.round_trips()
        if "fairness" in names:
            self.fairness()
        if "cluster" in names:
            phase_cluster.run(self)
        if "longpoll" in names:
            phase_longpoll.run(self)
        if "presence" in names:
            phase_presence.run(self)
        if "maxconns" in names:
            phase_maxconns.run(self)

    # -- measuring -----------------------------------------------------------------------
    def close_clients(self, prefix: str, label: str, out: dict) -> None:
        """The end of a phase with its own kind of clients (``lp_*``, ``pr_*`` commands): record
        their counters and first errors in ``out``, close them, wait until the server is idle."""
        stats = self.lg.call({"cmd": f"{prefix}_stats"}, 30)
        out["client_counters"] = stats["counters"]
        if "close_codes" in stats:
            out["client_close_codes"] = stats["close_codes"]
        out["client_first_errors"] = stats["first_errors"]
        log(f"  {label} client counters: " + ", ".join(f"{k} {v}" for k, v in stats["counters"].items() if v))
        for e in stats["first_errors"][:5]:
            log(f"  {label} client saw: {e}")
        out["close"] = self.lg.call({"cmd": f"{prefix}_close"}, 300)
        self.settle(f"{label} close", self.args.settle_timeout)

    def settle(self, label: str, max_s: float) -> dict:
        """Wait until the server is idle (< 5% of a core over 1 s); the work done after the last
        client answer (e.g. intercepted broadcasts queued in workers) shows up here."""
        t0 = time.monotonic()
        first = prev = self.cluster.sample()
        while time.monotonic() - t0 < max_s:
            time.sleep(1.0)
            cur = self.cluster.sample()
            d = cpu_delta(prev, cur)
            prev = cur
            if d["total_s"] < 0.05 * d["wall_s"]:
                break
        tot = cpu_delta(first, prev)
        res = {"settle_s": round(time.monotonic() - t0, 2), "cpu_s": round(tot["total_s"], 3),
               "timed_out": time.monotonic() - t0 >= max_s}
        if res["settle_s"] > 1.5:
            log(f"  {label}: server busy for {res['settle_s']} s after the clients got their "
                f"answers ({res['cpu_s']} s CPU)")
        return res

    def wait_quiet(self) -> None:
        """Other processes on this machine (tests, other benchmarks) distort latencies: wait,
        bounded, until they use less than 10% of one core over a second."""
        if self.args.quiet_wait <= 0:
            return
        ours = {pid for p in self.cluster.server.values() for pid in proc_tree(p.pid)} | {self.lg.proc.p.pid}
        t0 = time.monotonic()
        waited = False
        while True:
            a = all_proc_ticks()
            time.sleep(1.0)
            b = all_proc_ticks()
            busy = others_cpu_s(a, b, ours)
            other = sum(x for x, _ in busy)
            if other < 0.10:
                if waited:
                    log(f"  machine quiet after {time.monotonic() - t0:.0f} s")
                return
            if time.monotonic() - t0 > self.args.quiet_wait:
                msg = (f"machine not quiet after {self.args.quiet_wait:.0f} s (others use {other:.2f} "
                       f"core: {', '.join(f'{n} {x:.2f}' for x, n in busy[:3])}); measuring anyway")
                log("  WARNING " + msg)
                self.results["errors"].append(msg)
                return
            if not waited:
                log(f"  waiting for other processes to go quiet ({other:.2f} core: "
                    f"{', '.join(f'{n} {x:.2f}' for x, n in busy[:3])})")
                waited = True

    def measured(self, cmd: dict, timeout: float) -> tuple[dict, dict, Sample, Sample]:
        """Run one loadgen command between two samples of server CPU and RSS."""
        self.cluster.check_alive()
        self.wait_quiet()
        c0 = self.lg.cpu_s()
        all0 = all_proc_ticks()
        s0 = self.cluster.sample()
        res = self.lg.call(cmd, timeout)
        s1 = self.cluster.sample()
        all1 = all_proc_ticks()
        c1 = self.lg.cpu_s()
        d = cpu_delta(s0, s1)
        d["client_cpu_s"] = c1 - c0
        # CPU used on this machine by other processes (the project's other engineers may run
        # tests at the same time) and in interrupt context (loopback TCP), shown, not subtracted
        ours = set(s0.cpu) | set(s1.cpu) | {self.lg.proc.p.pid}
        others = [(dt, name) for dt, name in others_cpu_s(all0, all1, ours) if dt > 0]
        d["other_cpu_s"] = sum(x for x, _ in others)
        d["other_top"] = [f"{n} {x:.2f} s" for x, n in others[:4]]
        d["irq_cpu_s"] = d["irq_s"]
        if d["other_cpu_s"] > 0.1 * d["wall_s"] and d["other_cpu_s"] > 0.2:
            msg = (f"other processes used {d['other_cpu_s']:.2f} s CPU during {cmd['cmd']} "
                   f"({d['wall_s']:.1f} s wall): {', '.join(d['other_top'])}; latencies may be distorted")
            log("  WARNING " + msg)
            self.results["errors"].append(msg)
        if d["pids_gone"] or d["pids_new"]:
            msg = f"server processes changed during {cmd['cmd']}: gone {d['pids_gone']}, new {d['pids_new']}"
            log("  WARNING " + msg)
            self.results["errors"].append(msg)
        return res, d, s0, s1

    def joined(self) -> int:
        return self.lg.call({"cmd": "stats"}, 30)["joined"]

    def ensure_joined(self, n: int) -> dict | None:
        """Open more clients, or close the newest ones, until exactly n are joined."""
        have = self.joined()
        if have < n:
            res = self.lg.call({"cmd": "open", "n": n - have, "urls": self.cluster.urls,
                                "join_payload": self.args.join_payload,
                                "concurrency": self.args.concurrency}, self.args.join_timeout)
            self.settle("extra joins", self.args.settle_timeout)
            return res
        if have > n:
            self.lg.call({"cmd": "close", "keep": n}, 600)
            self.settle("closing clients", self.args.settle_timeout)
        return None

    def heartbeat_all(self) -> None:
        hb = self.lg.call({"cmd": "heartbeat_all"}, 120)
        if hb["replied_ok"] != hb["sent"]:
            msg = f"heartbeat: {hb['replied_ok']}/{hb['sent']} answered"
            log("  WARNING " + msg)
            self.results["errors"].append(msg)

    # -- phases --------------------------------------------------------------------------
    def connections(self) -> None:
        a = self.args
        log(f"== a. connections: {a.conns} clients join room:lobby over {len(self.cluster.urls)} edges")
        time.sleep(1.0)
        base = self.cluster.sample()
        base_pss = base.total_pss_kb()
        res, d, s0, s1 = self.measured({"cmd": "open", "n": a.conns, "urls": self.cluster.urls,
                                        "join_payload": a.join_payload, "concurrency": a.concurrency},
                                       a.join_timeout)
        st = self.settle("joins", a.settle_timeout)
        time.sleep(1.0)
        after = self.cluster.sample()
        after_pss = after.total_pss_kb()
        joined = res["joined"]
        delta_kb = after.total_rss_kb - base.total_rss_kb
        per = delta_kb / joined if joined else None
        out = {
            "requested": a.conns, "opened": res["opened"], "joined": joined,
            "open_failed": res["open_failed"], "join_failed": res["join_failed"],
            "join_elapsed_s": res["elapsed_ms"] / 1000, "joins_per_s": res["joins_per_s"],
            "connect_latency_ms": res["connect_latency"], "join_latency_ms": res["join_latency"],
            "settle_after_joins_s": st["settle_s"], "settle_cpu_s": st["cpu_s"],
            "server_cpu_s": round(d["total_s"] + st["cpu_s"], 3),
            "server_cpu_by_process_s": {k: round(v, 3) for k, v in d["per_process_s"].items()},
            "server_cpu_us_per_join": round((d["total_s"] + st["cpu_s"]) / joined * 1e6, 1) if joined else None,
            "client_cpu_s": round(d["client_cpu_s"], 3), "other_cpu_s": round(d["other_cpu_s"], 3),
            "rss_kb_before": base.total_rss_kb, "rss_kb_after": after.total_rss_kb,
            "rss_kb_by_process_before": base.rss_by_role(), "rss_kb_by_process_after": after.rss_by_role(),
            "rss_kb_per_conn": round(per, 2) if per is not None else None,
            "pss_kb_before": base_pss, "pss_kb_after": after_pss,
            "pss_kb_per_conn": round((after_pss - base_pss) / joined, 2)
            if joined and base_pss is not None and after_pss is not None else None,
        }
        self.results["phases"]["connections"] = out
        log(f"  opened {out['opened']}/{a.conns}, joined {joined}, failed opens {out['open_failed']}, "
            f"failed joins {out['join_failed']}")
        log(f"  joining took {out['join_elapsed_s']:.2f} s ({out['joins_per_s']} joins/s; join reply "
            f"p50 {res['join_latency']['p50_ms']} ms p99 {res['join_latency']['p99_ms']} ms) "
            f"+ {st['settle_s']} s until the server was idle")
        log(f"  server CPU for connect+join: {out['server_cpu_s']} s = {out['server_cpu_us_per_join']} us per joined client; "
            "by process (until the last join reply): "
            + ", ".join(f"{k} {v:.2f}" for k, v in d["per_process_s"].items()))
        log(f"  RSS all server processes: {base.total_rss_kb} KB -> {after.total_rss_kb} KB "
            f"(+{delta_kb} KB) = {out['rss_kb_per_conn']} KB per joined connection "
            f"[target <= {TARGETS['rss_kb_per_conn']:.0f} KB; {PEERS['rss_kb_per_conn']}]")
        log("  RSS by process after: " + ", ".join(f"{k} {v} KB" for k, v in after.rss_by_role().items()))
        if out["pss_kb_per_conn"] is not None:
            log(f"  PSS (shared pages counted once) all server processes: {base_pss} KB -> {after_pss} KB "
                f"= {out['pss_kb_per_conn']} KB per joined connection")

    def fanout(self, key: str, subs: int, msgs: int) -> None:
        a = self.args
        log(f"== b. fan-out: {subs} subscribers x {msgs} messages")
        op = self.ensure_joined(subs)
        if op is not None:
            log(f"  opened {op['opened']} more clients, joined {op['joined']} in {op['elapsed_ms'] / 1000:.2f} s")
        have = self.joined()
        if have != subs:
            log(f"  WARNING only {have} of {subs} subscribers joined")
        out = {}
        for mode in a.fanout_modes:
            self.heartbeat_all()
            time.sleep(0.5)
            res, d, _, s1 = self.measured({"cmd": "fanout", "msgs": msgs, "mode": mode,
                                           "gap_ms": a.gap_ms, "quiet_ms": a.quiet_ms},
                                          a.fanout_timeout)
            rec = res["received"]
            cpu_us = d["total_s"] / rec * 1e6 if rec else None
            r = dict(res)
            r["server_cpu_s"] = round(d["total_s"], 3)
            r["server_cpu_by_process_s"] = {k: round(v, 3) for k, v in d["per_process_s"].items()}
            r["server_cpu_us_per_delivery"] = round(cpu_us, 2) if cpu_us is not None else None
            r["client_cpu_s"] = round(d["client_cpu_s"], 3)
            r["server_rss_kb_after"] = s1.total_rss_kb
            r["other_cpu_s"] = round(d["other_cpu_s"], 3)
            r["irq_cpu_s"] = round(d["irq_cpu_s"], 3)
            out[mode] = r
            lat = res["latency"]
            log(f"  [{mode}] {res['subscribers']} subs x {msgs} msgs: received {rec}/{res['expected']} "
                f"(lost {res['lost']}, dup {res['duplicates']}) in {res['span_ms'] / 1000:.3f} s = "
                f"{res['deliveries_per_s']} deliveries/s")
            tgt = ""
            if subs >= 10000:
                tgt = f" [target p99 < {TARGETS['p99_ms_10k']:.0f} ms; {PEERS['p99_ms_10k']}]"
            log(f"  [{mode}] latency publish->receive p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, "
                f"max {lat['max_ms']} ms{tgt}")
            log(f"  [{mode}] server CPU {d['total_s']:.3f} s = {r['server_cpu_us_per_delivery']} us per delivery "
                f"[target <= {TARGETS['cpu_us_per_delivery']:.0f} us; {PEERS['cpu_us_per_delivery']}]; "
                "by process: " + ", ".join(f"{k} {v:.3f}" for k, v in d["per_process_s"].items())
                + f"; client CPU {d['client_cpu_s']:.3f} s")
            log(f"  [{mode}] RSS of all server processes after: {s1.total_rss_kb} KB")
            if mode == "paced" and "per_broadcast_complete_ms" in res:
                pb = res["per_broadcast_complete_ms"]
                log(f"  [paced] one broadcast reaches all subscribers in p50 {pb['p50']} ms, max {pb['max']} ms")
            if res["lost"] or res["duplicates"] or res["publish_errors"]:
                msg = (f"fan-out {subs}x{msgs} {mode}: lost {res['lost']}, duplicates {res['duplicates']}, "
                       f"publish errors {res['publish_errors']}, messages incomplete {res['msgs_incomplete']}")
                log("  WARNING " + msg)
                self.results["errors"].append(msg)
            self.settle(f"fan-out {mode}", a.settle_timeout)
        self.results["phases"][key] = out

    def round_trips(self) -> None:
        a = self.args
        shape = f"{a.rt_clients} clients x {a.rt_depth} in flight"
        limit = self.cluster.rate_limit_note()
        log(f"== c. round trips: {shape} ({'sequential pings' if a.rt_depth == 1 else 'pipelined pings'}), "
            + (f"{a.rt_count} each" if a.rt_count else f"{a.rt_seconds} s") + f"; {limit}")
        self.ensure_joined(max(self.joined(), a.rt_clients))
        self.heartbeat_all()
        time.sleep(0.5)
        res, d, _, _ = self.measured({"cmd": "pings", "clients": a.rt_clients, "depth": a.rt_depth,
                                      "duration_ms": int(a.rt_seconds * 1000), "count": a.rt_count},
                                     a.rt_seconds + 180)
        n = res["round_trips"]
        out = dict(res)
        out["shape"] = shape
        out["edge_rate_limit"] = limit
        out.update(cpu_figures(d, n, "round_trip"))
        self.results["phases"]["round_trips"] = out
        lat = res["latency"]
        log(f"  {n} round trips in {res['elapsed_ms'] / 1000:.2f} s = {res['round_trips_per_s']} round trips/s; "
            f"error replies {res['errors']}, channel errors {res['channel_errors']}, "
            f"push timeouts {res['push_timeouts']}, closed {res['closed']}")
        log(f"  latency p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
        log(f"  server CPU {d['total_s']:.3f} s = {out['server_cpu_us_per_round_trip']} us per round trip "
            f"({shape}) [target <= {TARGETS['cpu_us_per_round_trip']:.0f} us; {PEERS['cpu_us_per_round_trip']}]; "
            f"client CPU {d['client_cpu_s']:.3f} s")
        log("  per round trip by process: " + per_process_line(out["server_cpu_us_per_round_trip_by_process"]))
        self._note_ping_failures("round trips", res)
        self.settle("round trips", a.settle_timeout)

    def _note_ping_failures(self, phase: str, res: dict) -> None:
        if res["errors"] or res["closed"] or res["channel_errors"] or res["push_timeouts"] or res["timed_out"]:
            msg = (f"{phase}: {res['errors']} error replies, {res['channel_errors']} phx_error/phx_close, "
                   f"{res['push_timeouts']} pushes unanswered after 10 s, {res['closed']} closed, "
                   f"{res['clients_stopped_by_failure']} client(s) stopped early"
                   + (", phase hit its time bound" if res["timed_out"] else ""))
            log("  WARNING " + msg)
            self.results["errors"].append(msg)

    def fairness(self) -> None:
        a = self.args
        log(f"== d. fairness: {a.fair_clients} clients pipelining {a.fair_depth} pings each + "
            f"{a.fair_probes} sequential probe clients, {a.fair_seconds} s")
        self.ensure_joined(max(self.joined(), a.fair_clients + a.fair_probes))
        self.heartbeat_all()
        time.sleep(0.5)
        res, d, _, _ = self.measured({"cmd": "pings", "clients": a.fair_clients, "depth": a.fair_depth,
                                      "probe_clients": a.fair_probes, "offset": 0,
                                      "probe_offset": a.fair_clients,
                                      "duration_ms": int(a.fair_seconds * 1000)}, a.fair_seconds + 180)
        total = res["round_trips"] + res.get("probe_round_trips", 0)
        out = dict(res)
        out["server_cpu_s"] = round(d["total_s"], 3)
        out["server_cpu_us_per_round_trip"] = round(d["total_s"] / total * 1e6, 2) if total else None
        out["client_cpu_s"] = round(d["client_cpu_s"], 3)
        out["other_cpu_s"] = round(d["other_cpu_s"], 3)
        out["irq_cpu_s"] = round(d["irq_cpu_s"], 3)
        self.results["phases"]["fairness"] = out
        lat, plat = res["latency"], res.get("probe_latency", {})
        log(f"  pipelining clients: {res['round_trips']} round trips, p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
        log(f"  sequential probes:  {res.get('probe_round_trips')} round trips, p50 {plat.get('p50_ms')} ms, "
            f"p99 {plat.get('p99_ms')} ms, max {plat.get('max_ms')} ms")
        inflight = a.fair_clients * a.fair_depth + a.fair_probes
        if res.get("total_round_trips_per_s"):
            log(f"  (queueing alone predicts ~{inflight / res['total_round_trips_per_s'] * 1000:.0f} ms: "
                f"{inflight} pings in flight / throughput; probes far above that would mean starvation)")
        log(f"  total {res.get('total_round_trips_per_s')} round trips/s; server CPU "
            f"{out['server_cpu_us_per_round_trip']} us per round trip; error replies {res['errors']}, "
            f"channel errors {res['channel_errors']}, push timeouts {res['push_timeouts']}, closed {res['closed']}")
        self._note_ping_failures("fairness", res)
        self.settle("fairness", a.settle_timeout)

