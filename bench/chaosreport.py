"""Judging one chaos run (bench/chaos.py): what the clients lived through, per fault.

Input is the run's record (`run`, a JSON-serialisable dict; `bench/chaos.py --raw FILE` saves
it and `--analyse FILE` judges a saved one again): the fault times, every broadcast published,
every client's report from bench/chaosclient.js and the scanned process logs. Output is a
summary dict and a markdown table.

Fault windows.  Every instant of a client's run belongs to one fault:
- "broker restart": from the broker's kill - guard until its successor's READY + window tail;
- "edge restart": for the clients connected to the SIGTERMed edge at that moment only, from
  the SIGTERM - guard until the restarted edge's READY + window tail;
- "worker kills": everything else (workers are killed all along the run).
An episode out of the channel (from the first phx_error / socket close / socket error while
joined until the join is acknowledged again), a ping (by the time it was pushed), a lost or
duplicated broadcast (by the time it was published / received again) and a traceback (by the
time of the log line before it) count for the fault of their instant.

Broadcasts owed.  A broadcast is owed to a client when the Publisher accepted it (returned True)
and the client was in its channel from `guard` ms before it was published until `guard` ms
after; an owed broadcast that never arrived is lost. Broadcasts pass through the broker and the
edges, not the workers, so losses in the "worker kills" time are the ones the issue calls
"outside the fault windows".
"""
from __future__ import annotations

import math
import re
import time

FAULTS = ("worker kills", "broker restart", "edge restart")
PENDING, OK, ERROR, TIMEOUT, THREW = 0, 1, 2, 3, 4
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


# ---- logs -------------------------------------------------------------------------------

def scan_log(path) -> dict:
    """Traceback lines (with the wall-clock ms of the log line before each, or None), and the
    number of ERROR and WARNING lines, of one process's stderr."""
    tracebacks: list[float | None] = []
    errors = warnings = 0
    last: float | None = None
    try:
        with open(path, "rb") as f:
            for raw in f:
                line = raw.decode("utf-8", "replace")
                m = STAMP.match(line)
                if m:
                    last = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) * 1000 + int(m.group(2))
                    if " ERROR " in line[:40]:
                        errors += 1
                    elif " WARNING " in line[:40]:
                        warnings += 1
                if "Traceback" in line:
                    tracebacks.append(last)
    except OSError:
        pass
    return {"tracebacks": tracebacks, "errors": errors, "warnings": warnings}


# ---- small helpers ----------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _inside(t: float, window: tuple[float, float] | None) -> bool:
    return window is not None and window[0] <= t <= window[1]


class Windows:
    """The fault of any instant, for a client inside or outside the SIGTERMed edge."""

    def __init__(self, run: dict):
        cfg = run["config"]
        guard, tail = cfg["guard"] * 1000, cfg["window_tail"] * 1000
        end = run["report_t"]
        b, e = run.get("broker"), run.get("edge")
        self.broker = (b["kill"] - guard, (b["ready"] or end) + tail) if b else None
        self.edge = (e["term"] - guard, (e["ready"] or end) + tail) if e else None

    def fault(self, t: float, edge_client: bool) -> str:
        if _inside(t, self.broker):
            return "broker restart"
        if edge_client and _inside(t, self.edge):
            return "edge restart"
        return "worker kills"


def edge_clients(run: dict) -> set[int]:
    """Ids of the clients connected to the SIGTERMed edge when it got the signal."""
    e = run.get("edge")
    if not e:
        return set()
    found = set()
    for c in run["clients"]:
        opens = [o for o in c["opens"] if o[0] <= e["term"]]
        if not opens or opens[-1][1] != e["index"]:
            continue
        if not any(opens[-1][0] <= cl[0] <= e["term"] for cl in c["closes"]):
            found.add(c["id"])
    return found


def joined_intervals(c: dict, end: float) -> list[tuple[float, float]]:
    """When the client was in its channel: from each join ack to the next episode's start."""
    if c["first_join"] is None:
        return []
    out, start = [], c["first_join"]
    for ep in c["episodes"]:
        if start is not None:
            out.append((start, ep[0]))
        start = ep[1]
    if start is not None:
        out.append((start, end))
    return out


def edge_rejoin_ms(run: dict, c: dict) -> float | None:
    """For a client of the SIGTERMed edge: ms from its first connection attempt after the
    SIGTERM that found an edge up until its channel was joined again (inf: never); None when
    its connection was not closed after the SIGTERM. The episode may have begun before the
    SIGTERM (a client already out of its channel when its edge went away)."""
    e = run["edge"]
    guard = run["config"]["guard"] * 1000
    closed = next((cl[0] for cl in c["closes"] if cl[0] >= e["term"] - guard), None)
    if closed is None:
        return None
    ep = next((ep for ep in c["episodes"] if ep[0] <= closed and (ep[1] is None or ep[1] >= closed)), None)
    if ep is None:
        return None
    if ep[1] is None:
        return math.inf

    def up(edge: int, t: float) -> bool:
        return edge != e["index"] or t < e["term"] or (e["ready"] is not None and t >= e["ready"])

    first = next((a[0] for a in c["attempts"] if a[0] >= ep[0] and up(a[1], a[0])), None)
    return ep[1] - (first if first is not None and first <= ep[1] else ep[0])


# ---- the analysis -----------------------------------------------------------------------

def analyse(run: dict) -> dict:
    cfg = run["config"]
    win = Windows(run)
    guard = cfg["guard"] * 1000
    end = run["report_t"]
    on_edge = edge_clients(run)
    rows = {f: {"durations": [], "open": 0, "pings": [0, 0, 0, 0, 0], "owed": 0, "lost": 0,
                "dups": 0, "tracebacks": 0} for f in FAULTS}
    pubs = {topic: [p for p in entries if p[2]] for topic, entries in run["publications"].items()}
    ping_reasons: dict[str, int] = {}
    join_errors: dict[str, int] = {}
    lost_examples: list[dict] = []
    totals = {"wrong_replies": 0, "misrouted": 0, "double_outcomes": 0, "join_timeouts": 0,
              "phx_closes": 0, "joined_at_end": 0}
    for c in run["clients"]:
        is_edge = c["id"] in on_edge
        for ep in c["episodes"]:
            row = rows[win.fault(ep[0], is_edge)]
            row["durations"].append((ep[1] if ep[1] is not None else end) - ep[0])
            row["open"] += ep[1] is None
        for t, o in zip(c["ping_t"], c["ping_o"]):
            rows[win.fault(t, is_edge)]["pings"][o] += 1
        for t, _n in c["dups"]:
            rows[win.fault(t, is_edge)]["dups"] += 1
        got = set(c["recv"])
        spans = joined_intervals(c, end)
        for n, t, _ok in pubs.get(c["topic"], ()):
            if not any(a + guard <= t <= b - guard for a, b in spans):
                continue
            row = rows[win.fault(t, is_edge)]
            row["owed"] += 1
            if n not in got:
                row["lost"] += 1
                if len(lost_examples) < 10:
                    lost_examples.append({"client": c["id"], "topic": c["topic"], "n": n,
                                          "t": round((t - run["t0"]) / 1000, 3)})
        for key, count in c["ping_error_reasons"].items():
            ping_reasons[key] = ping_reasons.get(key, 0) + count
        for key, count in c["join_errors"].items():
            join_errors[key] = join_errors.get(key, 0) + count
        totals["wrong_replies"] += c["wrong_replies"]
        totals["misrouted"] += c["misrouted"]
        totals["double_outcomes"] += c["double_outcomes"]
        totals["join_timeouts"] += c["join_timeouts"]
        totals["phx_closes"] += c["phx_closes"]
        totals["joined_at_end"] += bool(c["joined"])

    logs = run["logs"]
    for info in logs.values():
        for t in info["tracebacks"]:
            rows["worker kills" if t is None else win.fault(t, True)]["tracebacks"] += 1

    rejoin = [v for c in run["clients"] if c["id"] in on_edge
              for v in [edge_rejoin_ms(run, c)] if v is not None]
    limit_out, limit_edge = cfg["bound_out"] * 1000, cfg["bound_edge"] * 1000
    summary_rows = {}
    for name, row in rows.items():
        d = row["durations"]
        summary_rows[name] = {
            "episodes": len(d), "never_rejoined": row["open"],
            "out_p50_s": _s(percentile(d, 50)), "out_p99_s": _s(percentile(d, 99)),
            "out_max_s": _s(max(d, default=None)),
            "pings": dict(zip(("none", "ok", "error", "timeout", "threw"), row["pings"])),
            "broadcasts_owed": row["owed"], "broadcasts_lost": row["lost"], "broadcasts_duplicated": row["dups"],
            "tracebacks": row["tracebacks"],
        }
    summary_rows["edge restart"]["rejoin_after_reachable_p50_s"] = _s(percentile(rejoin, 50))
    summary_rows["edge restart"]["rejoin_after_reachable_max_s"] = _s(max(rejoin, default=None))
    summary_rows["edge restart"]["clients"] = len(on_edge)
    overall = _overall(summary_rows)
    every = [d for row in rows.values() for d in row["durations"]]
    overall["out_p50_s"], overall["out_p99_s"] = _s(percentile(every, 50)), _s(percentile(every, 99))
    summary_rows["overall"] = overall

    kills = run["kills"]
    kill_stats = _kill_stats(kills, run.get("worker_ready", []))
    n_clients = len(run["clients"])
    w, b = summary_rows["worker kills"], summary_rows["broker restart"]
    bounds = [
        _bound("every client ended joined", totals["joined_at_end"], f"= {n_clients}",
               totals["joined_at_end"] == n_clients, strict=False),
        _bound("every ping has an outcome", overall["pings"]["none"], "= 0",
               overall["pings"]["none"] == 0 and totals["double_outcomes"] == 0, strict=False),
        _bound("no broadcast duplicated", overall["broadcasts_duplicated"], "= 0",
               overall["broadcasts_duplicated"] == 0, strict=False),
        _bound("out of channel after a worker kill (max s)", w["out_max_s"], f"<= {cfg['bound_out']:g}",
               _le(w["out_max_s"], cfg["bound_out"]) and w["never_rejoined"] == 0),
        _bound("out of channel after the broker restart (max s)", b["out_max_s"], f"<= {cfg['bound_out']:g}",
               _le(b["out_max_s"], cfg["bound_out"]) and b["never_rejoined"] == 0),
        _bound("edge clients joined after first attempt finding an edge up (max s)",
               summary_rows["edge restart"]["rejoin_after_reachable_max_s"], f"<= {cfg['bound_edge']:g}",
               _le(summary_rows["edge restart"]["rejoin_after_reachable_max_s"], cfg["bound_edge"])),
        _bound("tracebacks in all logs", overall["tracebacks"], "= 0", overall["tracebacks"] == 0),
        _bound("pings timed out or without outcome", overall["pings"]["timeout"] + overall["pings"]["none"], "= 0",
               overall["pings"]["timeout"] + overall["pings"]["none"] == 0),
        _bound("broadcasts lost outside fault windows", w["broadcasts_lost"], "= 0", w["broadcasts_lost"] == 0),
        _bound("kills that found no live worker", kill_stats["no_live_worker"], "= 0",
               kill_stats["no_live_worker"] == 0),
    ]
    published = sum(len(v) for v in run["publications"].values())
    accepted = sum(len(v) for v in pubs.values())
    return {
        "commit": run.get("commit"), "config": cfg, "rows": summary_rows, "bounds": bounds,
        "clients": n_clients, "edge_clients": len(on_edge), **totals,
        "kills": kill_stats,
        "publisher": {"published": published, "accepted": accepted, "refused": published - accepted},
        "broker": _fault_times(run, "broker", "kill"), "edge": _fault_times(run, "edge", "term"),
        "ping_error_reasons": ping_reasons, "join_error_reasons": join_errors,
        "lost_examples": lost_examples,
        "logs": {name: {"tracebacks": len(v["tracebacks"]), "errors": v["errors"], "warnings": v["warnings"]}
                 for name, v in logs.items()},
        "unexpected_exits": run.get("unexpected_exits", []),
        "sigkilled_at_stop": run.get("sigkilled_at_stop", []),
    }


def _s(ms: float | None) -> float | None:
    if ms is None:
        return None
    return math.inf if ms == math.inf else round(ms / 1000, 3)


def _le(value: float | None, limit: float) -> bool:
    return value is None or value <= limit


def _bound(name: str, value, limit: str, ok: bool, strict: bool = True) -> dict:
    return {"name": name, "value": value, "limit": limit, "pass": bool(ok), "strict": strict}


def _overall(rows: dict) -> dict:
    out = {"episodes": 0, "never_rejoined": 0, "pings": dict.fromkeys(("none", "ok", "error", "timeout", "threw"), 0),
           "broadcasts_owed": 0, "broadcasts_lost": 0, "broadcasts_duplicated": 0, "tracebacks": 0}
    for row in rows.values():
        for key in ("episodes", "never_rejoined", "broadcasts_owed", "broadcasts_lost",
                    "broadcasts_duplicated", "tracebacks"):
            out[key] += row[key]
        for key, count in row["pings"].items():
            out["pings"][key] += count
    maxima = [r["out_max_s"] for r in rows.values() if r["out_max_s"] is not None]
    out["out_max_s"] = max(maxima, default=None)
    return out


def _kill_stats(kills: list[dict], ready: list[list]) -> dict:
    """Kills, those that found no ready worker, and how long each killed worker's slot took to
    announce a replacement (READY of the same slot after the kill)."""
    replaced = []
    for k in kills:
        if k["pid"] is None:
            continue
        later = [t for t, slot, pid in ready if slot == k["slot"] and t > k["t"] and pid != k["pid"]]
        if later:
            replaced.append(min(later) - k["t"])
    return {"total": len(kills), "no_live_worker": sum(k["pid"] is None for k in kills),
            "replaced_p50_s": _s(percentile(replaced, 50)), "replaced_max_s": _s(max(replaced, default=None)),
            "never_replaced": sum(1 for k in kills if k["pid"] is not None) - len(replaced)}


def _fault_times(run: dict, key: str, first: str) -> dict | None:
    f = run.get(key)
    if not f:
        return None
    t0 = run["t0"]
    out = {k: (None if v is None else round((v - t0) / 1000, 3)) for k, v in f.items()
           if k in (first, "exit", "start", "ready")}
    if f.get("ready") is not None:
        out["down_s"] = round((f["ready"] - f[first]) / 1000, 3)
    for k in ("exit_code", "sigkilled", "index"):
        if k in f:
            out[k] = f[k]
    return out


# ---- output -----------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if v == math.inf:
        return "never"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("pass" if ok else "FAIL")


def markdown(summary: dict) -> str:
    cfg = summary["config"]
    rows = summary["rows"]
    head = ("| fault | episodes | out of channel p50 / p99 / max (s) | out-of-channel bound | "
            "pings ok / error / timeout / no outcome | pings bound | broadcasts owed / lost / dup | "
            "lost bound | tracebacks | tracebacks bound |")
    lines = [head, "|" + "---|" * 10]
    for name in (*FAULTS, "overall"):
        r = rows[name]
        p = r["pings"]
        if name == "edge restart":
            value = r.get("rejoin_after_reachable_max_s")
            bound = (f"{_mark(_le(value, cfg['bound_edge']))} (max {_fmt(value)} s after a reachable "
                     f"attempt, <= {cfg['bound_edge']:g})")
        elif name == "overall":
            bound = "-"
        else:
            ok = _le(r["out_max_s"], cfg["bound_out"]) and r["never_rejoined"] == 0
            bound = f"{_mark(ok)} (<= {cfg['bound_out']:g})"
        lost_ok = r["broadcasts_lost"] == 0 if name in ("worker kills", "overall") else None
        if name == "overall":
            lost_ok = rows["worker kills"]["broadcasts_lost"] == 0
        lines.append(
            f"| {name} | {r['episodes']}" + (f" ({r['never_rejoined']} never rejoined)" if r["never_rejoined"] else "")
            + f" | {_fmt(r['out_p50_s'])} / {_fmt(r['out_p99_s'])} / {_fmt(r['out_max_s'])} | {bound}"
            f" | {p['ok']} / {p['error'] + p['threw']} / {p['timeout']} / {p['none']}"
            f" | {_mark(p['timeout'] + p['none'] == 0)}"
            f" | {r['broadcasts_owed']} / {r['broadcasts_lost']} / {r['broadcasts_duplicated']}"
            f" | {_mark(lost_ok)} | {r['tracebacks']} | {_mark(r['tracebacks'] == 0)} |")
    k, pub = summary["kills"], summary["publisher"]
    lines += [
        "",
        "| bound | value | limit | result |",
        "|---|---|---|---|",
        *(f"| {b['name']}{'' if b['strict'] else ' (never broken)'} | {_fmt(b['value'])} | {b['limit']} "
          f"| {_mark(b['pass'])} |" for b in summary["bounds"]),
        "",
        f"- clients: {summary['clients']} ({summary['edge_clients']} on the SIGTERMed edge), joined at the end: "
        f"{summary['joined_at_end']}",
        f"- worker kills: {k['total']}, found no live worker: {k['no_live_worker']}; killed slot announced a "
        f"replacement after p50 {_fmt(k['replaced_p50_s'])} s, max {_fmt(k['replaced_max_s'])} s"
        + (f", {k['never_replaced']} never" if k["never_replaced"] else ""),
        f"- broker: {_times(summary['broker'])}",
        f"- edge: {_times(summary['edge'])}",
        f"- publisher: {pub['published']} broadcasts, {pub['refused']} refused while the bus was down",
        f"- wrong ping replies: {summary['wrong_replies']}, misrouted broadcasts: {summary['misrouted']}, "
        f"double ping outcomes: {summary['double_outcomes']}, join timeouts: {summary['join_timeouts']}, "
        f"phx_close: {summary['phx_closes']}",
        f"- ping error reasons: {_reasons(summary['ping_error_reasons'])}; join error reasons: "
        f"{_reasons(summary['join_error_reasons'])}",
        "- logs (tracebacks / ERROR / WARNING lines): " + ", ".join(
            f"{name} {v['tracebacks']}/{v['errors']}/{v['warnings']}" for name, v in summary["logs"].items()),
    ]
    if summary["lost_examples"]:
        lines.append("- first lost broadcasts (client, topic, n, s after start): " + ", ".join(
            f"({x['client']}, {x['topic']}, {x['n']}, {x['t']})" for x in summary["lost_examples"][:5]))
    if summary["unexpected_exits"]:
        lines.append(f"- processes that exited on their own: {summary['unexpected_exits']}")
    if summary["sigkilled_at_stop"]:
        lines.append(f"- needed SIGKILL at the end: {', '.join(summary['sigkilled_at_stop'])}")
    return "\n".join(lines)


def _times(f: dict | None) -> str:
    if not f:
        return "not faulted"
    return ", ".join(f"{k} {_fmt(v)}" + (" s" if k not in ("exit_code", "sigkilled", "index") else "")
                     for k, v in f.items())


def _reasons(reasons: dict) -> str:
    if not reasons:
        return "none"
    return ", ".join(f"{k!r} x{v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])[:6])
