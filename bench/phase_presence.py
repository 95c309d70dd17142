"""Phase g. presence (docs/benchmarks.md): what presence costs when many users arrive and leave
at once, and whether every client's list ends up right. The clients (bench/presclient.js, in the
load generator process) each connect under a user name of their own and keep their presence
list as phoenix.js does (the npm `phoenix` package's Presence.syncState / syncDiff).

  join   N clients, connected beforehand, join room:lobby with {"track": true} in one burst:
         time from the first join sent until every list holds all N users; per client the
         presence_state / presence_diff frames and bytes received (min / median / max);
         server CPU. Lists still incomplete after --presence-timeout are counted, with the
         entries they miss.
  leave  the first K clients (the observers, spread over the edges) stay, the other N - K
         send phx_leave in one burst: time until every observer's list holds exactly the K;
         presence_diff frames and bytes per observer; server CPU.

The WebSocket clients of earlier phases are closed first (they are members of room:lobby and
would receive every diff too); all presence clients are closed at the end.
"""
from __future__ import annotations

from cluster import log


def _cpu(d: dict, settle: dict) -> dict:
    return {"server_cpu_s": round(d["total_s"], 3),
            "server_cpu_by_process_s": {k: round(v, 3) for k, v in d["per_process_s"].items()},
            "server_cpu_after_s": settle["cpu_s"], "server_busy_after_s": settle["settle_s"],
            "client_cpu_s": round(d["client_cpu_s"], 3), "other_cpu_s": round(d["other_cpu_s"], 3),
            "irq_cpu_s": round(d["irq_cpu_s"], 3)}


def _mmm(s: dict) -> str:
    return f"{s['min']:g} / {s['p50']:g} / {s['max']:g}" if s["n"] else "-"


def _kb(s: dict) -> str:
    return (f"{s['min'] / 1024:.1f} / {s['p50'] / 1024:.1f} / {s['max'] / 1024:.1f} KB" if s["n"] else "-")


def _log_check(ph, what: str, r: dict) -> None:
    c = r["check"]
    if not (c["lists_wrong"] or r["incomplete"] or r["still_open"] < r.get("clients", r.get("observers"))):
        return
    msg = (f"presence {what}: {r['incomplete']} list(s) not complete within {r['timeout_ms'] / 1000:g} s; "
           f"after the grace: {c['incomplete']} list(s) missing {c['missing_entries']} entries "
           f"({c['users_missing_somewhere']} distinct users), {c['lists_with_extra']} list(s) with "
           f"{c['extra_entries']} extra entries, {c['keys_with_several_metas']} keys with several metas, "
           f"{r['still_open']} clients still open")
    log("  WARNING " + msg)
    ph.results["errors"].append(msg)
    if c["incomplete"]:
        log(f"  incomplete lists by edge: {c['incomplete_by_edge']}; most missed: "
            + ", ".join(f"{m['user']} ({m['missing_at']} lists, joined at {m['join_sent_ms']} ms)"
                        for m in c["most_missed"][:5]))
        if c["missing_user_join_reply_minus_own_state_ms"]:
            s = c["missing_user_join_reply_minus_own_state_ms"]
            log(f"  a missing user's join reply came {s['min']} / {s['p50']} / {s['max']} ms "
                "(min / median / max) after the list's own presence_state")


def run(ph) -> None:
    a = ph.args
    n = a.presence_clients
    k = min(a.presence_observers, n)
    out: dict = {"clients": n, "observers": k}
    ph.results["phases"]["presence"] = out
    log(f"== g. presence: {n} clients join room:lobby tracked, then all but {k} leave")
    if ph.joined():
        ph.lg.call({"cmd": "close", "keep": 0}, 600)
        ph.settle("closing the WebSocket clients", a.settle_timeout)
    op = ph.lg.call({"cmd": "pr_open", "n": n, "urls": ph.cluster.urls, "concurrency": a.concurrency},
                    a.join_timeout)
    out["open"] = op
    log(f"  connected {op['opened']}/{n} (failed {op['open_failed']}) in {op['elapsed_ms'] / 1000:.2f} s, "
        "not joined yet")
    if op["opened"] == 0:
        raise RuntimeError("presence: no client connected")
    ph.settle("presence connects", a.settle_timeout)
    timeout_ms = int(a.presence_timeout * 1000)

    res, d, _, _ = ph.measured({"cmd": "pr_join", "timeout_ms": timeout_ms, "grace_ms": 1000},
                               a.presence_timeout + 180)
    st = ph.settle("presence joins", a.settle_timeout)
    j = dict(res)
    j.update(_cpu(d, st))
    out["join"] = j
    m = res["clients"]
    log(f"  join: {m} joins sent in {res['joins_sent_ms']} ms; replies ok {res['joined_ok']}, failed "
        f"{res['join_failed']} (reply p50 {res['join_reply_ms']['p50']} ms, max {res['join_reply_ms']['max']} ms); "
        f"presence_state at {res['presence_state_received']} clients (p50 {res['presence_state_ms']['p50']} ms, "
        f"max {res['presence_state_ms']['max']} ms after the first join)")
    if res["all_complete_ms"] is not None:
        log(f"  join: every list holds all {m} users {res['all_complete_ms'] / 1000:.2f} s after the first "
            f"join (per client p50 {res['complete_ms']['p50']} ms, p90 {res['complete_ms']['p90']} ms)")
    else:
        log(f"  join: {res['incomplete']} of {m} lists NOT complete after {timeout_ms / 1000:g} s "
            f"({res['complete']} complete, the last at {res['last_complete_ms']} ms)")
    log(f"  join: presence frames per client (min / median / max) {_mmm(res['presence_frames'])}: "
        f"presence_state {_mmm(res['state_frames'])}, presence_diff {_mmm(res['diff_frames'])} "
        f"(vs {m} joiners: median {res['diff_frames']['p50'] / m:.3f} diff frames per joiner); "
        f"{res['distinct_diffs']} distinct presence_diff broadcasts with {res['distinct_diff_keys']} keys "
        f"({res['distinct_diff_leave_keys']} in leaves); "
        f"{res['diffs_queued_before_state']} diffs arrived before their client's presence_state")
    log(f"  join: presence bytes per client {_kb(res['presence_bytes'])} (state {_kb(res['state_bytes'])}, "
        f"diffs {_kb(res['diff_bytes'])})")
    log(f"  join: server CPU {j['server_cpu_s']} s until the lists were complete (+{j['server_cpu_after_s']} s "
        f"in {j['server_busy_after_s']} s after); by process: "
        + ", ".join(f"{p} {v:.2f}" for p, v in d["per_process_s"].items())
        + f"; client CPU {j['client_cpu_s']} s")
    _log_check(ph, "join", res)

    res, d, _, _ = ph.measured({"cmd": "pr_leave", "keep": k, "timeout_ms": timeout_ms, "grace_ms": 1000},
                               a.presence_timeout + 180)
    st = ph.settle("presence leaves", a.settle_timeout)
    lv = dict(res)
    lv.update(_cpu(d, st))
    out["leave"] = lv
    log(f"  leave: {res['leavers']} leaves sent in {res['leaves_sent_ms']} ms ({res['leave_replies']} replies seen); "
        + (f"every observer's list holds exactly the {res['observers']} observers "
           f"{res['all_complete_ms'] / 1000:.2f} s after the first leave (per observer p50 "
           f"{res['complete_ms']['p50']} ms)" if res["all_complete_ms"] is not None else
           f"{res['incomplete']} of {res['observers']} observers' lists NOT down to the observers "
           f"after {timeout_ms / 1000:g} s"))
    log(f"  leave: presence_diff frames per observer {_mmm(res['diff_frames'])}, bytes {_kb(res['diff_bytes'])} "
        f"({res['distinct_diffs']} distinct broadcasts with {res['distinct_diff_keys']} keys); "
        f"presence_state frames {_mmm(res['state_frames'])}")
    log(f"  leave: server CPU {lv['server_cpu_s']} s (+{lv['server_cpu_after_s']} s after); by process: "
        + ", ".join(f"{p} {v:.2f}" for p, v in d["per_process_s"].items())
        + f"; client CPU {lv['client_cpu_s']} s")
    _log_check(ph, "leave", res)

    ph.close_clients("pr", "presence", out)


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    p = results["phases"].get("presence")
    if not p or "join" not in p:
        return []
    j = p["join"]
    m = j["clients"]
    done = (f"{j['all_complete_ms'] / 1000:.2f} s" if j["all_complete_ms"] is not None else
            f"{j['incomplete']} lists INCOMPLETE ({j['check']['missing_entries']} entries missing)")
    rows = [(f"g. presence join ({m} clients): every list complete", done, "", ""),
            ("g. presence join: presence frames per client min/med/max", _mmm(j["presence_frames"]), "", ""),
            ("g. presence join: presence_diff frames per client min/med/max",
             f"{_mmm(j['diff_frames'])} (N={m})", "<< N", ""),
            ("g. presence join: distinct presence_diff broadcasts", f"{j['distinct_diffs']}", "", ""),
            ("g. presence join: presence bytes per client min/med/max", _kb(j["presence_bytes"]), "", ""),
            ("g. presence join: server CPU", f"{j['server_cpu_s']} s (+{j['server_cpu_after_s']} s after)", "", "")]
    lv = p.get("leave")
    if lv:
        done = (f"{lv['all_complete_ms'] / 1000:.2f} s" if lv["all_complete_ms"] is not None else
                f"{lv['incomplete']} lists INCOMPLETE")
        rows += [(f"g. presence leave ({lv['leavers']} leave, {lv['observers']} observe): lists exact", done, "", ""),
                 ("g. presence leave: presence_diff frames per observer min/med/max", _mmm(lv["diff_frames"]), "", ""),
                 ("g. presence leave: presence_diff bytes per observer min/med/max", _kb(lv["diff_bytes"]), "", ""),
                 ("g. presence leave: server CPU", f"{lv['server_cpu_s']} s (+{lv['server_cpu_after_s']} s after)",
                  "", "")]
    return rows
