"""What the benchmark measures, read straight from /proc: CPU ticks, RSS and PSS per process,
the process tree under each server process (supervisor -> forked workers), and how busy the
whole machine and every other process on it are (it is shared; see docs/benchmarks.md).

No processes are started here; cluster.py starts them and phases.py samples them.
"""
from __future__ import annotations

import os
import subprocess
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_proc(path: str) -> str | None:
    """The text of a /proc file, or None when the process (or file) is gone."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        text = read_proc(f"/proc/{pid}/task/{tid}/children")
        if text:
            out.extend(int(x) for x in text.split())
    return out


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants (bounded walk)."""
    seen, todo = [], [pid]
    while todo and len(seen) < 1000:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children_of(p))
    return seen


def alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    text = read_proc(f"/proc/{pid}/stat")
    if text is None:
        return False
    return text[text.rindex(")") + 2] != "Z"


def cpu_ticks(pid: int) -> int | None:
    text = read_proc(f"/proc/{pid}/stat")
    if text is None:
        return None
    fields = text[text.rindex(")") + 2:].split()   # fields from #3 (state) on
    return int(fields[11]) + int(fields[12])       # utime (#14) + stime (#15)


def pss_kb(pid: int) -> int | None:
    """Proportional set size: shared pages (the forked workers share their parent's) split
    between the processes that map them, so a sum over processes counts them once."""
    text = read_proc(f"/proc/{pid}/smaps_rollup")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return None


def machine_busy_s() -> tuple[float, float]:
    """Non-idle CPU seconds of the whole machine since boot (all cores), and the part of it
    spent in interrupt/softirq context (loopback TCP processing lands there), from /proc/stat."""
    text = read_proc("/proc/stat") or ""
    for line in text.splitlines():
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            idle = v[3] + (v[4] if len(v) > 4 else 0)   # idle + iowait
            return (sum(v[:8]) - idle) / CLK_TCK, (v[5] + v[6]) / CLK_TCK
    return 0.0, 0.0


def all_proc_ticks() -> dict[int, tuple[str, int]]:
    """utime+stime of every process on the machine: {pid: (comm, ticks)}."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        text = read_proc(f"/proc/{name}/stat")
        if not text:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        f = text[text.rindex(")") + 2:].split()
        out[int(name)] = (comm, int(f[11]) + int(f[12]))
    return out


def others_cpu_s(before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]],
                 ours: set[int]) -> list[tuple[float, str]]:
    """CPU seconds each process not in `ours` used between two all_proc_ticks() snapshots, as
    (seconds, "comm[pid]"), busiest first."""
    return sorted((((t - before.get(pid, (comm, 0))[1]) / CLK_TCK, f"{comm}[{pid}]")
                   for pid, (comm, t) in after.items() if pid not in ours), reverse=True)


def rss_kb(pid: int) -> int | None:
    text = read_proc(f"/proc/{pid}/status")
    if text is None:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sample:
    """CPU ticks and RSS of every server process, keyed by pid, with role names."""

    def __init__(self, procs: dict[str, subprocess.Popen]):
        self.t = time.monotonic()
        self.machine_s, self.irq_s = machine_busy_s()
        self.cpu: dict[int, int] = {}
        self.rss: dict[int, int] = {}
        self.role: dict[int, str] = {}
        for name, p in procs.items():
            for pid in proc_tree(p.pid):
                c, r = cpu_ticks(pid), rss_kb(pid)
                if c is None or r is None:
                    continue
                self.cpu[pid], self.rss[pid] = c, r
                self.role[pid] = name if pid == p.pid else f"{name}.child{pid}"

    @property
    def total_rss_kb(self) -> int:
        return sum(self.rss.values())

    def total_pss_kb(self) -> int | None:
        vals = [pss_kb(pid) for pid in self.rss]
        return None if any(v is None for v in vals) else sum(vals)

    def rss_by_role(self) -> dict[str, int]:
        return {self.role[p]: v for p, v in self.rss.items()}


def cpu_delta(a: Sample, b: Sample) -> dict:
    """Server CPU between two samples, in seconds, total and per process role."""
    per = {}
    for pid, c in b.cpu.items():
        per[b.role[pid]] = (c - a.cpu.get(pid, 0)) / CLK_TCK
    gone = sorted(set(a.cpu) - set(b.cpu))
    new = sorted(set(b.cpu) - set(a.cpu))
    return {"total_s": sum(per.values()), "per_process_s": per, "wall_s": b.t - a.t,
            "machine_busy_s": b.machine_s - a.machine_s, "irq_s": b.irq_s - a.irq_s,
            "pids_gone": [a.role[p] for p in gone], "pids_new": [b.role[p] for p in new]}


def cpu_figures(d: dict, n: int, unit: str) -> dict:
    """The server CPU of a request phase (n requests answered): in total and per process, in
    seconds and in microseconds per request; the client's, other processes' and softirq CPU."""
    per = d["per_process_s"]
    return {"server_cpu_s": round(d["total_s"], 3),
            "server_cpu_by_process_s": {k: round(v, 3) for k, v in per.items()},
            f"server_cpu_us_per_{unit}": round(d["total_s"] / n * 1e6, 2) if n else None,
            f"server_cpu_us_per_{unit}_by_process": {k: round(v / n * 1e6, 2) for k, v in per.items()} if n else {},
            "client_cpu_s": round(d["client_cpu_s"], 3), "other_cpu_s": round(d["other_cpu_s"], 3),
            "irq_cpu_s": round(d["irq_cpu_s"], 3), "wall_s": round(d["wall_s"], 3)}


def per_process_line(us: dict) -> str:
    return ", ".join(f"{k} {v:.1f} us" for k, v in us.items()) if us else "-"
