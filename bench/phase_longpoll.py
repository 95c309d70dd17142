"""Phase e. longpoll (docs/benchmarks.md): L LongPoll clients (bench/lpclient.js, raw protocol
over Node's http with a keep-alive agent) create a session, join room:lobby and keep one GET
poll outstanding each. Measured, like the WebSocket phases, between two samples of server CPU:

  open         sessions created + joined: time, latency, server CPU per session
  round trips  every client POSTs "ping" and waits for the reply to come back through its poll
  fan-out      one WebSocket publisher sends "new_msg" M times (paced: one broadcast in
               flight; blast: back to back); deliveries/s, publish->receive latency, lost

The WebSocket clients of earlier phases are closed first (they would receive the broadcasts
too), and the LongPoll clients leave their channel and abandon their sessions at the end.
"""
from __future__ import annotations

from cluster import log


def lp_urls(cluster) -> list[str]:
    return [u.replace("ws://", "http://").replace("/socket/websocket", "/socket/longpoll")
            for u in cluster.urls]


def _cpu(d: dict, n: int) -> dict:
    return {"server_cpu_s": round(d["total_s"], 3),
            "server_cpu_by_process_s": {k: round(v, 3) for k, v in d["per_process_s"].items()},
            "server_cpu_us_per_op": round(d["total_s"] / n * 1e6, 2) if n else None,
            "client_cpu_s": round(d["client_cpu_s"], 3), "other_cpu_s": round(d["other_cpu_s"], 3),
            "irq_cpu_s": round(d["irq_cpu_s"], 3)}


def run(ph) -> None:
    a = ph.args
    out: dict = {"clients": a.lp_clients}
    ph.results["phases"]["longpoll"] = out
    urls = lp_urls(ph.cluster)
    log(f"== e. longpoll: {a.lp_clients} LongPoll clients over {', '.join(urls)}")
    if ph.joined():
        ph.lg.call({"cmd": "close", "keep": 0}, 600)
        ph.settle("closing the WebSocket clients", a.settle_timeout)
    base = ph.cluster.sample()
    res, d, _, _ = ph.measured({"cmd": "lp_open", "n": a.lp_clients, "urls": urls,
                                "join_payload": a.join_payload, "concurrency": 50}, a.join_timeout)
    st = ph.settle("longpoll joins", a.settle_timeout)
    after = ph.cluster.sample()
    joined = res["joined"]
    o = dict(res)
    o.update(_cpu(d, joined))
    o["rss_kb_before"], o["rss_kb_after"] = base.total_rss_kb, after.total_rss_kb
    o["rss_kb_per_session"] = round((after.total_rss_kb - base.total_rss_kb) / joined, 2) if joined else None
    o["settle_s"] = st["settle_s"]
    out["open"] = o
    log(f"  sessions {res['sessions']}/{a.lp_clients} (failed {res['session_failed']}), joined {joined} "
        f"(failed {res['join_failed']}) in {res['elapsed_ms'] / 1000:.2f} s; session GET p50 "
        f"{res['session_latency']['p50_ms']} ms p99 {res['session_latency']['p99_ms']} ms, join (POST -> reply "
        f"via poll) p50 {res['join_latency']['p50_ms']} ms p99 {res['join_latency']['p99_ms']} ms")
    log(f"  server CPU {o['server_cpu_s']} s = {o['server_cpu_us_per_op']} us per session+join; RSS "
        f"{base.total_rss_kb} -> {after.total_rss_kb} KB = {o['rss_kb_per_session']} KB per session "
        "(with one poll held each)")
    if joined == 0:
        raise RuntimeError("longpoll: no client joined")

    # a. push -> reply round trips, the reply arriving through the poll
    res, d, _, _ = ph.measured({"cmd": "lp_pings", "clients": a.lp_clients,
                                "duration_ms": int(a.lp_seconds * 1000)}, a.lp_seconds + 120)
    n = res["round_trips"]
    r = dict(res)
    r.update(_cpu(d, n))
    out["round_trips"] = r
    lat = res["latency"]
    log(f"  round trips: {n} in {res['elapsed_ms'] / 1000:.2f} s = {res['round_trips_per_s']}/s from "
        f"{res['clients']} clients; latency p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms; "
        f"failures {res['failures'] or 0}")
    log(f"  round trips: server CPU {r['server_cpu_s']} s = {r['server_cpu_us_per_op']} us per round trip; by "
        "process: " + ", ".join(f"{k} {v:.3f}" for k, v in d["per_process_s"].items())
        + f"; client CPU {r['client_cpu_s']} s")
    if res["failures"]:
        ph.results["errors"].append(f"longpoll round trips: failures {res['failures']}")
    ph.settle("longpoll round trips", a.settle_timeout)

    # b. broadcasts from one WebSocket publisher to the LongPoll subscribers
    ph.lg.call({"cmd": "lp_publisher", "url": ph.cluster.urls[0]}, 60)
    out["fanout"] = {}
    for mode in a.lp_modes:
        res, d, _, s1 = ph.measured({"cmd": "lp_fanout", "msgs": a.lp_msgs, "mode": mode,
                                     "gap_ms": a.gap_ms, "quiet_ms": a.quiet_ms}, a.fanout_timeout)
        rec = res["received"]
        f = dict(res)
        f.update(_cpu(d, rec))
        f["server_rss_kb_after"] = s1.total_rss_kb
        out["fanout"][mode] = f
        lat = res["latency"]
        log(f"  [{mode}] {res['subscribers']} LongPoll subs x {res['msgs']} msgs: received {rec}/{res['expected']} "
            f"(lost {res['lost']}, dup {res['duplicates']}) in {res['span_ms'] / 1000:.3f} s = "
            f"{res['deliveries_per_s']} deliveries/s")
        log(f"  [{mode}] latency publish->receive p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms"
            + (f"; one broadcast complete p50 {res['per_broadcast_complete_ms']['p50']} ms, max "
               f"{res['per_broadcast_complete_ms']['max']} ms" if "per_broadcast_complete_ms" in res else ""))
        log(f"  [{mode}] server CPU {f['server_cpu_s']} s = {f['server_cpu_us_per_op']} us per delivery; by process: "
            + ", ".join(f"{k} {v:.3f}" for k, v in d["per_process_s"].items()) + f"; client CPU {f['client_cpu_s']} s")
        if res["lost"] or res["duplicates"]:
            ph.results["errors"].append(f"longpoll fan-out {mode}: lost {res['lost']}, duplicates {res['duplicates']}")
        ph.settle(f"longpoll fan-out {mode}", a.settle_timeout)
    ph.close_clients("lp", "LongPoll", out)


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    p = results["phases"].get("longpoll")
    if not p or "open" not in p:
        return []
    o = p["open"]
    rows = [(f"e. longpoll: sessions joined ({p['clients']} requested)",
             f"{o['joined']} in {o['elapsed_ms'] / 1000:.2f} s", "", ""),
            ("e. longpoll: server CPU per session+join", f"{o['server_cpu_us_per_op']} us", "", "")]
    r = p.get("round_trips")
    if r:
        rows += [(f"e. longpoll round trips ({r['clients']} clients): round trips/s", f"{r['round_trips_per_s']}", "", ""),
                 ("e. longpoll round trips: p50 / p99 latency",
                  f"{r['latency']['p50_ms']} / {r['latency']['p99_ms']} ms", "", ""),
                 ("e. longpoll round trips: server CPU per round trip", f"{r['server_cpu_us_per_op']} us", "", "")]
    for mode, f in (p.get("fanout") or {}).items():
        tag = f"e. longpoll fan-out {f['subscribers']}x{f['msgs']} {mode}"
        rows += [(f"{tag}: deliveries/s", f"{f['deliveries_per_s']}", "", ""),
                 (f"{tag}: p50 / p99 latency", f"{f['latency']['p50_ms']} / {f['latency']['p99_ms']} ms", "", ""),
                 (f"{tag}: server CPU per delivery", f"{f['server_cpu_us_per_op']} us", "", ""),
                 (f"{tag}: lost / duplicated", f"{f['lost']} / {f['duplicates']}", "0", "")]
    return rows
