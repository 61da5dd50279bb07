"""CPU time and resident memory of a process tree, read from /proc.

A target is a process tree (Postfix's master and its daemons; twistd and any workers it forks).
Daemons come and go during a run (Postfix's smtpd exits after max_use sessions), so CPU time is
counted as: for every live process in the tree, its own time plus the time of its children that it
has already reaped. A child that exits between two samples moves its time into its parent's
cutime/cstime, so the sum stays monotonic and a before/after difference is the tree's whole cost.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces; split after the last ')'.
    rest = data[data.rfind(")") + 2:].split()
    return rest  # rest[0] is field 3 (state)


def children_map() -> dict[int, list[int]]:
    """ppid -> [pid] for every process on the machine (one scan of /proc)."""
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        kids.setdefault(int(fields[1]), []).append(int(name))
    return kids


def tree(root: int) -> list[int]:
    """The root pid and all its live descendants."""
    kids = children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if not os.path.exists(f"/proc/{pid}"):
            continue
        out.append(pid)
        todo.extend(kids.get(pid, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime+cutime+cstime summed over the given live processes, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # fields index = stat field number - 3: utime 14, stime 15, cutime 16, cstime 17
        ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLOCK_TICKS


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


@dataclass
class MemSample:
    """Resident memory of a process tree at one instant."""
    processes: int
    rss_total_kb: int
    rss_max_kb: int
    pss_total_kb: int | None            # proportional set size: shared pages split among sharers
    per_process: dict[str, int]         # "name[pid]" -> VmRSS kB (largest few only)

    def as_dict(self) -> dict:
        return {"processes": self.processes, "rss_total_mb": round(self.rss_total_kb / 1024, 1),
                "rss_max_mb": round(self.rss_max_kb / 1024, 1),
                "pss_total_mb": None if self.pss_total_kb is None else round(self.pss_total_kb / 1024, 1),
                "largest_mb": {k: round(v / 1024, 1) for k, v in self.per_process.items()}}


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(pids: list[int], with_pss: bool = True, keep: int = 5) -> MemSample:
    rss = {pid: _status_kb(pid, "VmRSS") for pid in pids}
    rss = {pid: kb for pid, kb in rss.items() if kb > 0}
    pss = sum(_pss_kb(pid) for pid in rss) if with_pss else None
    largest = sorted(rss.items(), key=lambda kv: -kv[1])[:keep]
    return MemSample(processes=len(rss), rss_total_kb=sum(rss.values()),
                     rss_max_kb=max(rss.values(), default=0), pss_total_kb=pss,
                     per_process={f"{comm(pid)}[{pid}]": kb for pid, kb in largest})


def peak(a: MemSample | None, b: MemSample) -> MemSample:
    """The sample with the larger total RSS (for a running peak)."""
    if a is None or b.rss_total_kb > a.rss_total_kb:
        return b
    return a
