"""Phase f. maxconns (docs/benchmarks.md): as many joined WebSocket clients as the machine holds,
up to a target (40,000 by default). Meant for one edge of 2 processes (`--edge-processes 2`),
works with separate edges too (clients go round-robin over their URLs).

One process may hold RLIMIT_NOFILE (20,000 here) sockets, so K extra load generators
(bench/massconns.js) hold the clients, K = target / --mc-per-process rounded up. Clients are
spread over source addresses 127.0.0.2.., PER_SOURCE each by default: one (source,
destination) pair has only ~28,000 ephemeral ports, and the kernel's search for a free port
in bind() (ws binds when given localAddress) costs seconds of system CPU per 1,000 connects
once ~7,000 ports of one source address are taken (measured here). They ramp up in rounds of --mc-batch clients until the target,
until a round joins less than a quarter of what it attempted, or until the time bound. Then
RSS per connection over all server processes, one broadcast counted at every client within a
deadline, and a clean close. The whole phase is bounded by --mc-max-seconds.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

from cluster import log
from loadgen import LoadGen
from procstats import all_proc_ticks, cpu_delta, others_cpu_s, proc_tree

RESERVE_S = 90       # of the time bound, kept for the broadcast and the close
PER_SOURCE = 4000    # clients per source address by default


def edge_fds(cluster) -> dict[str, int]:
    """Open file descriptors of every edge process (the limit that stops an edge)."""
    out = {}
    for name, p in cluster.server.items():
        if not name.startswith("edge"):
            continue
        for pid in proc_tree(p.pid):
            try:
                out[name if pid == p.pid else f"{name}.child{pid}"] = len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
    return out


LISTEN_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPReqQFullDrop", "SyncookiesSent")


def listen_drops() -> dict[str, int]:
    """Machine-wide TCP counters of connections a full listen queue dropped (/proc/net/netstat)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(row[k]) for k in LISTEN_COUNTERS if k in row}
    return {}


def pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, max(0, math.ceil(p / 100 * len(sorted_vals)) - 1))]


def merge(into: dict, more: dict) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def run(ph) -> None:
    a = ph.args
    t0 = time.monotonic()
    hard_end = t0 + a.mc_max_seconds
    k = max(1, math.ceil(a.mc_target / a.mc_per_process))
    addrs = [f"127.0.0.{2 + i}" for i in range(a.mc_sources or math.ceil(a.mc_target / PER_SOURCE))]
    urls = ph.cluster.urls
    out: dict = {"target": a.mc_target, "loadgens": k, "source_addresses": addrs, "urls": urls}
    ph.results["phases"]["maxconns"] = out
    log(f"== f. maxconns: up to {a.mc_target} joined WebSocket clients from {k} load generator processes, "
        f"source addresses {addrs[0]}..{addrs[-1]}, to {', '.join(urls)}; bound {a.mc_max_seconds:.0f} s")
    # what earlier phases hold would count against the edges' file limit and the baseline
    if ph.joined():
        ph.lg.call({"cmd": "close", "keep": 0}, 600)
    if ph.lg.call({"cmd": "lp_stats"}, 30)["clients"]:
        ph.lg.call({"cmd": "lp_close"}, 300)
    ph.settle("closing earlier clients", min(a.settle_timeout, 60))
    ph.wait_quiet()
    lgs: list[LoadGen] = []
    pool = ThreadPoolExecutor(max_workers=k)
    all0 = all_proc_ticks()
    ours = lambda: ({pid for p in ph.cluster.server.values() for pid in proc_tree(p.pid)}
                    | {g.proc.p.pid for g in lgs} | {ph.lg.proc.p.pid})

    def each(cmds: list[dict], timeout: float) -> list[dict]:
        return list(pool.map(lambda lc: lc[0].call(lc[1], timeout), zip(lgs, cmds)))

    try:
        for i in range(k):
            lg = LoadGen(ph.cluster.tmpdir, name=f"loadgen-mc{i + 1}")
            ph.cluster.procs.append(lg.proc)
            lgs.append(lg)
        each([{"cmd": "mc_stats"}] * k, 30)   # all started
        base = ph.cluster.sample()
        base_pss = base.total_pss_kb()
        out["rss_kb_before"], out["edge_fds_before"] = base.total_rss_kb, edge_fds(ph.cluster)
        log(f"  baseline: server RSS {base.total_rss_kb} KB, edge fds {out['edge_fds_before']}")

        # -- ramp -------------------------------------------------------------------------
        joined_by = [0] * k
        failures: dict = {}
        rounds = []
        stop = None
        ramp_start = time.monotonic()
        while True:
            want = a.mc_target - sum(joined_by)
            left = hard_end - RESERVE_S - time.monotonic()
            if want <= 0:
                stop = "target reached"
                break
            if left < 5:
                stop = "time bound"
                break
            batch = min(a.mc_batch, want)
            room = [max(0, a.mc_per_process - j) for j in joined_by]
            shares = [0] * k
            for n in range(batch):   # evenly over the load generators that have room
                i = min((i for i in range(k) if room[i] > shares[i]), key=lambda i: shares[i], default=None)
                if i is None:
                    break
                shares[i] += 1
            if not any(shares):
                stop = "load generators full (--mc-per-process)"
                break
            r0, c0, n0 = time.monotonic(), ph.cluster.sample(), listen_drops()
            g0 = sum(g.cpu_s() for g in lgs)
            res = each([{"cmd": "mc_open", "n": s, "urls": urls, "local_addresses": addrs,
                         "concurrency": a.mc_concurrency, "handshake_timeout_ms": int(a.mc_handshake_timeout * 1000),
                         "fail_limit": max(20, s // 4), "deadline_ms": int(left * 1000)} for s in shares],
                       left + a.mc_handshake_timeout + 30)
            started = sum(r["started"] for r in res)
            got = sum(r["joined"] for r in res)
            for i, r in enumerate(res):
                joined_by[i] = r["total_joined"]
            rf: dict = {}
            for r in res:
                merge(rf, r["failures"])
            merge(failures, rf)
            s = ph.cluster.sample()
            fds = edge_fds(ph.cluster)
            rd = cpu_delta(c0, s)
            gcpu = sum(g.cpu_s() for g in lgs) - g0
            drops = {n: v - n0.get(n, 0) for n, v in listen_drops().items() if v - n0.get(n, 0)}
            rounds.append({"attempted": started, "joined": got, "failures": rf, "total_joined": sum(joined_by),
                           "elapsed_s": round(time.monotonic() - r0, 2), "server_rss_kb": s.total_rss_kb,
                           "server_cpu_s": round(rd["total_s"], 2), "client_cpu_s": round(gcpu, 2),
                           "listen_drops": drops, "edge_fds": fds,
                           "t_s": round(time.monotonic() - ramp_start, 1)})
            log(f"  round {len(rounds)}: +{got}/{started} joined -> {sum(joined_by)} in "
                f"{time.monotonic() - r0:.1f} s; failures {rf or 0}; CPU server {rd['total_s']:.2f} s, clients "
                f"{gcpu:.2f} s; RSS {s.total_rss_kb} KB; edge fds " + ", ".join(f"{n} {v}" for n, v in fds.items())
                + (f"; listen queue drops (machine-wide) {drops}" if drops else ""))
            if started and got < 0.25 * started:
                stop = f"round joined {got} of {started} attempted"
                break
        ramp_s = time.monotonic() - ramp_start
        joined = sum(joined_by)
        out.update({"rounds": rounds, "stopped_because": stop, "failures": failures, "ramp_s": round(ramp_s, 1),
                    "joined_after_ramp": joined})
        log(f"  ramp stopped ({stop}) after {ramp_s:.1f} s: {joined} joined; failures by cause {failures or 0}")
        st = ph.settle("maxconns joins", max(1.0, min(a.settle_timeout, hard_end - RESERVE_S / 2 - time.monotonic())))
        time.sleep(1.0)
        after = ph.cluster.sample()
        after_pss = after.total_pss_kb()
        d = cpu_delta(base, after)
        out.update({
            "rss_kb_after": after.total_rss_kb, "rss_kb_by_process_after": after.rss_by_role(),
            "rss_kb_per_conn": round((after.total_rss_kb - base.total_rss_kb) / joined, 2) if joined else None,
            "pss_kb_per_conn": round((after_pss - base_pss) / joined, 2)
            if joined and base_pss is not None and after_pss is not None else None,
            "server_cpu_s": round(d["total_s"], 3),
            "server_cpu_by_process_s": {n: round(v, 3) for n, v in d["per_process_s"].items()},
            "server_cpu_us_per_join": round(d["total_s"] / joined * 1e6, 1) if joined else None,
            "settle_s": st["settle_s"], "edge_fds_after": edge_fds(ph.cluster),
        })
        log(f"  RSS all server processes {base.total_rss_kb} -> {after.total_rss_kb} KB = {out['rss_kb_per_conn']} KB "
            f"per joined connection (PSS {out['pss_kb_per_conn']} KB); by process: "
            + ", ".join(f"{n} {v}" for n, v in after.rss_by_role().items()))
        log(f"  server CPU for the ramp {out['server_cpu_s']} s = {out['server_cpu_us_per_join']} us per joined "
            "client; by process: " + ", ".join(f"{n} {v:.2f}" for n, v in d["per_process_s"].items()))

        # -- one broadcast, counted at every client ----------------------------------------
        dl = max(1.0, min(a.mc_deliver_timeout, hard_end - time.monotonic() - 45))
        armed = sum(r["armed"] for r in each([{"cmd": "mc_arm", "run": 1}] * k, 30))
        pub = next((i for i in range(k) if joined_by[i]), None)
        if pub is not None and armed:
            s0 = ph.cluster.sample()
            lgs[pub].call({"cmd": "mc_publish", "run": 1}, 30)
            col = each([{"cmd": "mc_collect", "deadline_ms": int(dl * 1000)}] * k, dl + 30)
            s1 = ph.cluster.sample()
            lat = sorted(x for r in col for x in r["latencies_ms"])
            rec = sum(r["received"] for r in col)
            bd = cpu_delta(s0, s1)
            out["broadcast"] = {
                "armed": armed, "received": rec, "missing": armed - rec,
                "duplicates": sum(r["duplicates"] for r in col), "deadline_s": round(dl, 1),
                "joined_at_collect": sum(r["joined_now"] for r in col),
                "latency_ms": {"p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                               "max": lat[-1] if lat else None},
                "server_cpu_s": round(bd["total_s"], 3),
                "server_cpu_us_per_delivery": round(bd["total_s"] / rec * 1e6, 2) if rec else None}
            b = out["broadcast"]
            log(f"  broadcast: {rec} of {armed} joined clients got it within {dl:.0f} s (missing {b['missing']}, "
                f"dup {b['duplicates']}); publish->receive p50 {b['latency_ms']['p50']} ms, p99 "
                f"{b['latency_ms']['p99']} ms, max {b['latency_ms']['max']} ms; server CPU {b['server_cpu_s']} s "
                "(wall-clock stamps, compared across processes)")
            if b["missing"]:
                ph.results["errors"].append(f"maxconns: broadcast reached {rec} of {armed} clients")
        stats = each([{"cmd": "mc_stats"}] * k, 30)
        out["client_stats"] = [{x: s[x] for x in ("counters", "close_codes", "joined", "rss_kb")} for s in stats]
        out["closed_by_server"] = sum(s["counters"]["closed_by_server"] for s in stats)
        out["client_first_errors"] = [e for s in stats for e in s["first_errors"][:5]]
        log(f"  clients closed by the server during the phase: {out['closed_by_server']}; load generator RSS "
            + ", ".join(f"{s['rss_kb']} KB" for s in stats))
        for e in out["client_first_errors"][:6]:
            log(f"  client saw: {e}")
    finally:
        # -- stop cleanly, bounded -----------------------------------------------------------
        left = max(10.0, hard_end - time.monotonic() - 10)
        c0 = time.monotonic()
        try:
            cl = each([{"cmd": "mc_close", "timeout_ms": int(left * 1000)}] * len(lgs), left + 30)
            out["close"] = {"closed": sum(r["closed"] for r in cl), "terminated": sum(r["terminated"] for r in cl),
                            "elapsed_s": round(time.monotonic() - c0, 1)}
            log(f"  closed {out['close']['closed']} clients (terminated {out['close']['terminated']}) in "
                f"{out['close']['elapsed_s']} s")
        except Exception as exc:   # the servers are still stopped by run.py
            log(f"  WARNING closing the maxconns clients: {exc}")
            ph.results["errors"].append(f"maxconns close: {exc}")
        for lg in lgs:
            lg.exit(wait=5)
        pool.shutdown()
    st = ph.settle("maxconns close", max(1.0, min(60.0, hard_end - time.monotonic())))
    all1 = all_proc_ticks()
    others = [(x, n) for x, n in others_cpu_s(all0, all1, ours()) if x > 0]
    out["other_cpu_s"] = round(sum(x for x, _ in others), 2)
    out["other_top"] = [f"{n} {x:.2f} s" for x, n in others[:4]]
    out["phase_s"] = round(time.monotonic() - t0, 1)
    out["rss_kb_after_close"] = ph.cluster.sample().total_rss_kb
    log(f"  phase took {out['phase_s']} s; server idle {st['settle_s']} s after the close; RSS after close "
        f"{out['rss_kb_after_close']} KB; other processes used {out['other_cpu_s']} s CPU meanwhile "
        f"({', '.join(out['other_top'])})")


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    m = results["phases"].get("maxconns")
    if not m or "joined_after_ramp" not in m:
        return []
    rows = [(f"f. maxconns: joined (target {m['target']})",
             f"{m['joined_after_ramp']} in {m['ramp_s']} s", "", "Phoenix 1.7: ~20,000 (fd limit)"),
            ("f. maxconns: stopped because", str(m["stopped_because"]), "", ""),
            ("f. maxconns: failures by cause", ", ".join(f"{k} {v}" for k, v in m["failures"].items()) or "0", "", ""),
            ("f. maxconns: RSS per joined conn (all server procs)", f"{m.get('rss_kb_per_conn')} KB", "", "")]
    b = m.get("broadcast")
    if b:
        rows += [("f. maxconns: one broadcast received", f"{b['received']} / {b['armed']} in {b['deadline_s']} s", "", ""),
                 ("f. maxconns: broadcast p50 / p99 / max",
                  f"{b['latency_ms']['p50']} / {b['latency_ms']['p99']} / {b['latency_ms']['max']} ms", "", "")]
    return rows
