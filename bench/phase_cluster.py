"""Phase cluster (docs/benchmarks.md): how many client pushes per second the whole cluster
answers when the broker has ONE core. Every push of every edge passes through the broker on its
way to a worker (and its reply on the way back), so a broker limited to one core caps the
cluster's client -> server messages however many edges and workers there are.

The system is the benchmark's usual one (2 edges, a supervisor with 2 workers); every thread of
the broker is pinned to CPU 0 with sched_setaffinity for the measured run only. C clients
(--cluster-clients, spread round-robin over both edges) each keep D pings in flight
(--cluster-depth) for T seconds (--cluster-seconds). Reported: pushes answered per second, server
CPU per push -> reply in total and per process (broker, each edge, each worker), the broker's
share of its one core and the pushes/s a full broker core would carry at that cost (on a
machine with few cores the others saturate first), latency p50/p99, failed pushes.
"""
from __future__ import annotations

import time

from cluster import log
from procstats import cpu_figures, per_process_line

BROKER_CPU = 0


def run(ph) -> None:
    a, cl = ph.args, ph.cluster
    shape = f"{a.cluster_clients} clients x {a.cluster_depth} in flight"
    workers = [r for r in cl.sample().role.values() if r.startswith("workers.child")]
    log(f"== cluster: {shape} over {len(cl.urls)} edge(s) x {len(workers)} worker(s), broker pinned to "
        f"CPU {BROKER_CPU}, {a.cluster_seconds} s; {cl.rate_limit_note()}")
    if len(cl.urls) != 2 or len(workers) != 2:
        msg = f"cluster phase is meant for 2 edges x 2 workers; this system has {len(cl.urls)} x {len(workers)}"
        log("  WARNING " + msg)
        ph.results["errors"].append(msg)
    ph.ensure_joined(max(ph.joined(), a.cluster_clients))
    ph.heartbeat_all()
    time.sleep(0.5)
    ph.wait_quiet()   # before pinning: measured() waits again, briefly, with the broker pinned
    before = cl.pin("broker", {BROKER_CPU})
    try:
        masks = {tuple(sorted(m)) for m in cl.affinity("broker").values()}
        log(f"  broker threads ({len(before)}) now on CPU(s) {sorted(masks)} (were "
            f"{sorted({tuple(sorted(m)) for m in before.values()})})")
        res, d, _, _ = ph.measured({"cmd": "pings", "clients": a.cluster_clients, "depth": a.cluster_depth,
                                    "duration_ms": int(a.cluster_seconds * 1000)}, a.cluster_seconds + 180)
    finally:
        cl.unpin(before)
    n = res["round_trips"]
    edge_of = {u: f"edge{i + 1}" for i, u in enumerate(cl.urls)}
    out = dict(res)
    out["shape"] = shape
    out["edge_rate_limit"] = cl.rate_limit_note()
    out["broker_cpus"] = [BROKER_CPU]
    out["broker_threads_pinned"] = len(before)
    out["clients_by_edge"] = {edge_of.get(u, u): k for u, k in res.get("clients_by_url", {}).items()}
    out["pushes_per_s"] = res["round_trips_per_s"]
    out.update(cpu_figures(d, n, "push_reply"))
    broker_s = d["per_process_s"].get("broker", 0.0)
    out["broker_core_pct"] = round(broker_s / d["wall_s"] * 100, 1) if d["wall_s"] else None
    # on a machine whose other cores saturate first, the broker's core is not full: what it
    # could carry at this cost per push is the cluster's ceiling however many edges and workers
    out["broker_bound_pushes_per_s"] = round(n / broker_s) if broker_s and n else None
    ph.results["phases"]["cluster"] = out
    lat = res["latency"]
    log(f"  clients per edge: " + ", ".join(f"{k} {v}" for k, v in out["clients_by_edge"].items()))
    log(f"  {n} pushes answered in {res['elapsed_ms'] / 1000:.2f} s = {out['pushes_per_s']} pushes/s "
        f"(replies/s); error replies {res['errors']}, channel errors {res['channel_errors']}, "
        f"push timeouts {res['push_timeouts']}, closed {res['closed']}")
    log(f"  latency p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms")
    log(f"  server CPU {d['total_s']:.3f} s = {out['server_cpu_us_per_push_reply']} us per push -> reply; "
        f"client CPU {d['client_cpu_s']:.3f} s")
    log("  per push -> reply by process: " + per_process_line(out["server_cpu_us_per_push_reply_by_process"]))
    log(f"  broker: {broker_s:.3f} s CPU in {d['wall_s']:.2f} s = {out['broker_core_pct']}% of its one core; "
        f"a full core at this cost would answer {out['broker_bound_pushes_per_s']} pushes/s")
    ph._note_ping_failures("cluster", res)
    ph.settle("cluster", a.settle_timeout)


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    r = results["phases"].get("cluster")
    if not r:
        return []
    by = r["server_cpu_us_per_push_reply_by_process"]
    return [(f"cluster ({r['shape']}, broker on 1 core): pushes/s", f"{r['pushes_per_s']}", "", ""),
            ("cluster: p50 / p99 latency", f"{r['latency']['p50_ms']} / {r['latency']['p99_ms']} ms", "", ""),
            ("cluster: server CPU per push -> reply", f"{r['server_cpu_us_per_push_reply']} us", "", ""),
            ("cluster: ... of which broker", f"{by.get('broker')} us", "", ""),
            ("cluster: broker's share of its core", f"{r['broker_core_pct']}%", "", ""),
            ("cluster: pushes/s one full broker core would carry", f"{r['broker_bound_pushes_per_s']}", "", ""),
            ("cluster: failed pushes (error / channel / timeout / closed)",
             f"{r['errors']} / {r['channel_errors']} / {r['push_timeouts']} / {r['closed']}", "0", "")]
