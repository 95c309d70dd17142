#!/usr/bin/env python3
"""Two (or more) checkouts measured by one benchmark, interleaved, figures side by side.

    .venv/bin/python bench/compare.py --tree /path/before --tree /path/after [--rounds 2] \\
        -- --phases rt,cluster --rt-depth 8 --rt-seconds 8

Runs `bench/run.py --server-tree TREE --json FILE <args after -->` once per tree per round,
alternating the trees (A B A B ...) so that a change in the machine's other load hits both
alike; each run starts fresh servers. Prints, for the main request and fan-out figures, every
run's value and the median per tree. The load generator and this script are this checkout's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _get(d: dict, *path):
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _by(d: dict, prefix: str):
    """Sum of the per-process figures whose role starts with prefix (e.g. the workers)."""
    if not isinstance(d, dict):
        return None
    vals = [v for k, v in d.items() if k.startswith(prefix)]
    return round(sum(vals), 2) if vals else None


FIGURES = [
    ("c. round trips/s", lambda r: _get(r, "phases", "round_trips", "round_trips_per_s")),
    ("c. server CPU us per round trip", lambda r: _get(r, "phases", "round_trips", "server_cpu_us_per_round_trip")),
    ("c.   of which broker us", lambda r: _get(r, "phases", "round_trips", "server_cpu_us_per_round_trip_by_process", "broker")),
    ("c.   of which edges us", lambda r: _by(_get(r, "phases", "round_trips", "server_cpu_us_per_round_trip_by_process"), "edge")),
    ("c.   of which workers us", lambda r: _by(_get(r, "phases", "round_trips", "server_cpu_us_per_round_trip_by_process"), "workers")),
    ("c. p50 ms", lambda r: _get(r, "phases", "round_trips", "latency", "p50_ms")),
    ("c. p99 ms", lambda r: _get(r, "phases", "round_trips", "latency", "p99_ms")),
    ("cluster pushes/s", lambda r: _get(r, "phases", "cluster", "pushes_per_s")),
    ("cluster server CPU us per push -> reply", lambda r: _get(r, "phases", "cluster", "server_cpu_us_per_push_reply")),
    ("cluster   of which broker us", lambda r: _get(r, "phases", "cluster", "server_cpu_us_per_push_reply_by_process", "broker")),
    ("cluster   of which edges us", lambda r: _by(_get(r, "phases", "cluster", "server_cpu_us_per_push_reply_by_process"), "edge")),
    ("cluster   of which workers us", lambda r: _by(_get(r, "phases", "cluster", "server_cpu_us_per_push_reply_by_process"), "workers")),
    ("cluster broker % of its core", lambda r: _get(r, "phases", "cluster", "broker_core_pct")),
    ("cluster pushes/s one broker core carries", lambda r: _get(r, "phases", "cluster", "broker_bound_pushes_per_s")),
    ("cluster p50 ms", lambda r: _get(r, "phases", "cluster", "latency", "p50_ms")),
    ("cluster p99 ms", lambda r: _get(r, "phases", "cluster", "latency", "p99_ms")),
    ("cluster failed pushes", lambda r: None if _get(r, "phases", "cluster") is None else sum(
        _get(r, "phases", "cluster", k) or 0 for k in ("errors", "channel_errors", "push_timeouts", "closed"))),
    ("b. fan-out blast us per delivery", lambda r: _get(r, "phases", "fanout", "blast", "server_cpu_us_per_delivery")),
    ("b. fan-out blast p99 ms", lambda r: _get(r, "phases", "fanout", "blast", "latency", "p99_ms")),
]


def main() -> int:
    argv = sys.argv[1:]
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", action="append", required=True, help="a checkout to measure (give two or more)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per tree (default 2)")
    ap.add_argument("--json", help="write every run's figures to this JSON file")
    a = ap.parse_args(argv)
    trees = [str(Path(t).resolve()) for t in a.tree]
    out_dir = Path(tempfile.mkdtemp(prefix="zchannels-compare-"))
    runs: dict[str, list[dict]] = {t: [] for t in trees}
    heads: dict[str, str] = {}
    failed = 0
    for rnd in range(a.rounds):
        for k, tree in enumerate(trees):
            js = out_dir / f"r{rnd + 1}-t{k + 1}.json"
            cmd = [sys.executable, str(HERE / "run.py"), "--server-tree", tree, "--json", str(js), *rest]
            print(f"=== round {rnd + 1}/{a.rounds}, tree {k + 1} ({tree}): {' '.join(cmd[2:])}", flush=True)
            rc = subprocess.run(cmd).returncode
            if rc != 0 or not js.exists():
                print(f"=== run failed (exit {rc}); its figures are left out", flush=True)
                failed += 1
                continue
            res = json.loads(js.read_text())
            runs[tree].append(res)
            heads[tree] = _get(res, "machine", "git_head") or "?"
    print()
    print("=" * 100)
    print(f"compare: {a.rounds} round(s), trees alternating; run.py args: {' '.join(rest) or '(defaults)'}")
    for k, t in enumerate(trees):
        print(f"  T{k + 1} = {t} (git {heads.get(t, '?')}), {len(runs[t])} run(s)")
    w = max(len(n) for n, _ in FIGURES)
    print(f"{'figure':<{w}}  " + "  ".join(f"{'T' + str(k + 1) + ' median (runs)':<32}" for k in range(len(trees))))
    for name, get in FIGURES:
        cols, any_val = [], False
        for t in trees:
            vals = [v for v in (get(r) for r in runs[t]) if v is not None]
            any_val |= bool(vals)
            cols.append(f"{statistics.median(vals):g} ({', '.join(f'{v:g}' for v in vals)})" if vals else "-")
        if any_val:
            print(f"{name:<{w}}  " + "  ".join(f"{c:<32}" for c in cols))
    others = {t: [_get(r, "errors") for r in runs[t] if _get(r, "errors")] for t in trees}
    for t, errs in others.items():
        for e in errs:
            print(f"problem noted in a run of {t}: {'; '.join(e)[:300]}")
    if a.json:
        Path(a.json).write_text(json.dumps({"trees": trees, "args": rest, "runs": runs}, indent=2, default=str) + "\n")
        print(f"all figures written to {a.json}")
    print(f"per-run JSON in {out_dir}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
