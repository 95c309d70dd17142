"""Hostile clients against one edge, with a canary on the same edge: the benchmark of issue 9.

Each attack runs against a FRESH system (broker + 2 workers + 1 edge with default flags, the
chat example; attacks 6 and 8 use bench/attack_app.py, which is the chat example plus a probe
and a blocking topic), while bench/canary.js (phoenix.js in Node, from 127.0.0.1) joins
room:lobby, pushes a ping every 200 ms and opens a fresh connection + join every 2 s. The
attackers come from 127.0.0.2 and up (see bench/attackers.py).

Per attack it measures the edge's RSS (the broker's for the bus attack) every 100 ms: the
baseline before the attack, the peak from its start until `--after` s after the attacker
closed, and the RSS at that point; what the canary saw over the same window; and what the
attack saw itself. It prints one markdown table and, with --json FILE, writes everything.

    .venv/bin/python bench/attack.py               # all attacks at the sizes of issue 9 (~8 min)
    .venv/bin/python bench/attack.py --quick       # smaller sizes, ~2-3 min
    .venv/bin/python bench/attack.py --only 1,4a --json /tmp/attack.json

Verdict per attack (the "Done when" of issue 9): RSS peak within 150 MB of the baseline and
back within 40 MB of it `--after` s after the attacker closed; the canary lost no ping, its p99
is <= 500 ms and every fresh connection joined; the attack's own bound where it has one (>= 95%
of slowloris connections closed by the edge in time, LongPoll bodies refused before they were
sent, forwarding headers not believed, the bus message not passed on, no fresh join failed
behind a blocked handler).

Every process started here is stopped at the end (also on Ctrl-C or SIGTERM); all traffic
goes to 127.0.0.x.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))

from attackers import ATTACKS, Target  # noqa: E402
from attackrig import Canary, RssSampler, System  # noqa: E402
from cluster import log, raise_nofile  # noqa: E402

CHAT_APP = str(BENCH.parent / "examples" / "chat" / "channels.py")
BENCH_APP = str(BENCH / "attack_app.py")
NEEDS_BENCH_APP = {"6", "8"}
BUS_ATTACKS = {"7"}          # measured on the broker, not the edge
MB = 1_000_000
RSS_PEAK_MB, RSS_AFTER_MB, P99_MS, CLOSED_SHARE = 150, 40, 500, 0.95

# name: (issue 9's size, --quick size, help)
SIZES = {
    "flood_seconds": (15.0, 4.0, "length of each ping flood (attacks 1, 2), s"),
    "flood_readers": (4, 4, "connections of the reading ping flood (attack 2)"),
    "ping_size": (125, 125, "payload bytes per ping (125 is the most a control frame may carry)"),
    "lp_posts": (100, 20, "LongPoll POSTs sent at once (attack 3)"),
    "lp_body_mb": (7.9, 7.9, "body of each LongPoll POST, MB"),
    "lp_timeout": (60.0, 30.0, "longest wait for a POST's answer, s"),
    "slowloris_conns": (2000, 300, "slow WebSocket upgrades (attack 4a)"),
    "slowloris_seconds": (40.0, 18.0, "how long each slow upgrade is watched, s"),
    "slowloris_interval": (5.0, 5.0, "one header line every this many s"),
    "slowbody_conns": (200, 50, "slow LongPoll bodies (attack 4b)"),
    "slowbody_mb": (8.0, 8.0, "announced body size, MB"),
    "slowbody_seconds": (30.0, 18.0, "how long each slow body is watched, s"),
    "slowbody_rate": (4, 4, "body bytes sent per second"),
    "frames_conns": (300, 100, "WebSockets with an unfinished frame per round (attack 5)"),
    "frames_rounds": (7, 2, "rounds of attack 5"),
    "frame_size": (1 << 20, 1 << 20, "announced frame size, bytes (the default --max-frame-size)"),
    "frame_sent_share": (0.95, 0.95, "share of the frame's payload actually sent"),
    "bus_mb": (300.0, 100.0, "size of the bus message (attack 7), MB"),
    "bus_timeout": (20.0, 10.0, "longest wait for it to come back through the broker, s"),
    "block_seconds": (10.0, 4.0, "how long the handler blocks its worker (attack 8), s"),
    "joiner_interval": (0.25, 0.25, "a fresh bystander connect + join every this many s meanwhile"),
    "join_timeout": (10.0, 10.0, "a bystander's connect + join fails after this many s"),
    "baseline": (3.0, 1.5, "quiet time before the attack (RSS baseline), s"),
    "after": (10.0, 5.0, "time after the attacker closed at which RSS is read again, s"),
    "attack_bound": (300.0, 120.0, "hard bound on one attack's run, s"),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes and shorter waits (~2-3 min)")
    ap.add_argument("--only", default="", help=f"comma-separated attacks to run ({','.join(ATTACKS)}); default all")
    ap.add_argument("--json", metavar="FILE", help="write options, results and the commit to FILE")
    ap.add_argument("--sources", type=int, default=32,
                    help="attacker source addresses 127.0.0.2 .. 127.0.0.(1+N), used round-robin (default 32)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--open-concurrency", type=int, default=200, help="connections being opened at once")
    ap.add_argument("--edge-arg", action="append", default=[],
                    help="extra flag for the edge, e.g. --edge-arg=--trusted-proxies=10.0.0.0/8 (repeatable)")
    ap.add_argument("--server-root", type=Path, default=BENCH.parent,
                    help="checkout whose broker, edge and workers run (default: this one); the "
                         "benchmark, its app and the canary stay these")
    ap.add_argument("--flood-reconnect", action="store_true",
                    help="attacks 1, 2: a flood connection the edge cut is opened again while the flood lasts")
    ap.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (path printed)")
    for name, (full, _quick, text) in SIZES.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(full), default=None,
                        help=f"{text} (default {full:g}, --quick {_quick:g})")
    o = ap.parse_args(argv)
    for name, (full, quick, _) in SIZES.items():
        if getattr(o, name) is None:
            setattr(o, name, quick if o.quick else full)
    o.ids = [a.strip() for a in o.only.split(",") if a.strip()] or list(ATTACKS)
    unknown = [a for a in o.ids if a not in ATTACKS]
    if unknown:
        ap.error(f"unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}")
    return o


def rss_mb(sampler: RssSampler, who: str, t0: float, t1: float, how) -> float | None:
    values = sampler.window(who, t0, t1)
    return round(how(values) / 1000, 1) if values else None


def median(values: list[int]) -> float:
    s = sorted(values)
    return s[len(s) // 2]


def run_attack(aid: str, o: argparse.Namespace, logdir: str) -> dict:
    """One attack against a fresh system; everything it started is stopped on the way out."""
    title, fn = ATTACKS[aid]
    app = BENCH_APP if aid in NEEDS_BENCH_APP else CHAT_APP
    who = "broker" if aid in BUS_ATTACKS else "edge"
    tmp = os.path.join(logdir, f"attack-{aid}")
    os.makedirs(tmp, exist_ok=True)
    log(f"attack {aid}: {title} (fresh system, {os.path.relpath(app, BENCH.parent)})")
    system = sampler = canary = None
    try:
        system = System(app, o.workers, tmp, o.edge_arg, o.server_root.resolve())
        sampler = RssSampler({"edge": system.edge_pid, "broker": system.broker_pid})
        canary = Canary(system.ws_url, tmp)
        canary.wait_joined()
        time.sleep(o.baseline)
        target = Target(system.host, system.port, system.bus, o.sources)
        t_start = time.time()
        try:
            outcome = asyncio.run(asyncio.wait_for(fn(target, o), o.attack_bound))
        except (Exception, asyncio.TimeoutError) as exc:   # the table says so; the run goes on
            outcome = {"summary": f"the attack itself failed: {type(exc).__name__}: {str(exc)[:120]}", "ok": None,
                       "traceback": traceback.format_exc()}
        t_closed = time.time()
        log(f"attack {aid}: attacker closed after {t_closed - t_start:.1f} s; waiting {o.after:g} s")
        time.sleep(o.after)
        t_after = time.time()
        canary.settle(t_after)
        alive = system.alive()
        res = {
            "id": aid, "title": title, "app": app, "measured": who,
            "attack_s": round(t_closed - t_start, 1),
            "rss_base_mb": rss_mb(sampler, who, t_start - o.baseline, t_start, median),
            "rss_peak_mb": rss_mb(sampler, who, t_start, t_after, max),
            "rss_after_mb": rss_mb(sampler, who, t_after - 0.35, t_after + 0.05, median),
            "edge_rss_peak_mb": rss_mb(sampler, "edge", t_start, t_after, max),
            "broker_rss_peak_mb": rss_mb(sampler, "broker", t_start, t_after, max),
            "canary": canary.stats(t_start, t_after),
            "outcome": outcome,
            "processes_alive": alive,
            "tracebacks": system.tracebacks(),
        }
    finally:
        for part in (canary, sampler, system):
            if part is not None:
                part.stop()
    res["verdict"] = verdict(res)
    log(f"attack {aid}: {res['outcome']['summary']}")
    log(f"attack {aid}: {who} RSS {res['rss_base_mb']} -> peak {res['rss_peak_mb']} -> {res['rss_after_mb']} MB; "
        f"canary {fmt_canary(res['canary'])}; {res['verdict']['text']}")
    return res


def verdict(res: dict) -> dict:
    base, peak, after = res["rss_base_mb"], res["rss_peak_mb"], res["rss_after_mb"]
    rss_ok = None not in (base, peak, after) and peak - base <= RSS_PEAK_MB and after - base <= RSS_AFTER_MB
    c = res["canary"]
    canary_ok = (c["pings_sent"] > 0 and c["pings_lost"] == 0 and c["p99_ms"] is not None
                 and c["p99_ms"] <= P99_MS and c["fresh_joined"] == c["fresh_attempted"])
    attack_ok = res["outcome"].get("ok")
    died = [n for n, up in res["processes_alive"].items() if not up]
    failed = [name for name, ok in (("rss", rss_ok), ("canary", canary_ok), ("attack", attack_ok))
              if ok is False]
    if died:
        failed.append("died: " + ",".join(died))
    return {"rss": rss_ok, "canary": canary_ok, "attack": attack_ok, "died": died, "pass": not failed,
            "text": "PASS" if not failed else "FAIL (" + ", ".join(failed) + ")"}


def fmt_canary(c: dict) -> str:
    p = lambda v: "-" if v is None else f"{v:,}"   # noqa: E731
    return (f"pings lost {c['pings_lost']}/{c['pings_sent']}, p50/p99 {p(c['p50_ms'])}/{p(c['p99_ms'])} ms, "
            f"fresh joined {c['fresh_joined']}/{c['fresh_attempted']} (slowest {p(c['fresh_slowest_ms'])} ms)")


def table(results: list[dict], o: argparse.Namespace) -> str:
    after = f"+{o.after:g} s"
    rows = [f"| # | attack | RSS base / peak / {after} (MB) | canary pings lost/sent | canary p50 / p99 (ms) "
            "| fresh joined / tried (slowest ms) | what the attack saw | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    n = lambda v: "-" if v is None else f"{v:,.0f}"   # noqa: E731
    for r in results:
        c = r["canary"]
        who = " (broker)" if r["measured"] == "broker" else ""
        summary = r["outcome"]["summary"].replace("|", "/")
        if r["tracebacks"]:
            summary += f"; {r['tracebacks']} traceback(s) in server logs"
        rows.append(f"| {r['id']} | {r['title']} | {n(r['rss_base_mb'])} / {n(r['rss_peak_mb'])} / "
                    f"{n(r['rss_after_mb'])}{who} | {c['pings_lost']}/{c['pings_sent']} | "
                    f"{n(c['p50_ms'])} / {n(c['p99_ms'])} | {c['fresh_joined']}/{c['fresh_attempted']} "
                    f"({n(c['fresh_slowest_ms'])}) | {summary} | {r['verdict']['text']} |")
    return "\n".join(rows)


def commit(root: Path) -> str:
    """The short commit of the checkout at `root`, "+changes" when its tracked files differ."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    o = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    soft, hard = raise_nofile()
    logdir = tempfile.mkdtemp(prefix="zchannels-attack-")
    log(f"attacks {','.join(o.ids)}{' (quick sizes)' if o.quick else ''}; open files {soft}/{hard}; "
        f"logs in {logdir}")
    results = []
    try:
        for aid in o.ids:
            try:
                results.append(run_attack(aid, o, logdir))
            except Exception as exc:   # e.g. a system that did not start: say so, go on
                log(f"attack {aid}: not run: {type(exc).__name__}: {str(exc)[:300]}")
    except KeyboardInterrupt:
        log("interrupted: every process started was stopped")
    finally:
        if not o.keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
    if not results:
        return 1
    servers = commit(o.server_root)
    if o.server_root.resolve() != BENCH.parent:
        servers += f" of {o.server_root}, benchmark at {commit(BENCH.parent)}"
    head = (f"Attacks against one edge at {servers} ({'--quick sizes' if o.quick else 'sizes of issue 9'}), "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}:")
    print("\n" + head + "\n\n" + table(results, o) + "\n", flush=True)
    if o.json:
        with open(o.json, "w") as f:
            json.dump({"servers": commit(o.server_root), "benchmark": commit(BENCH.parent), "quick": o.quick,
                       "time": time.time(), "options": {k: str(v) if isinstance(v, Path) else v
                                                        for k, v in vars(o).items()},
                       "results": results}, f, indent=1)
        log(f"results written to {o.json}")
    return 0 if all(r["verdict"]["pass"] for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
