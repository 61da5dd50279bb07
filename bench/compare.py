#!/usr/bin/env python3
"""Compare bench results across commits: one column per JSON file.

    python bench/compare.py bench/results/*.json
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__)
        return 2
    runs = []
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        if "summary" not in r:                  # files from before the summary existed
            from run import summarize
            r["summary"] = summarize(r)
        runs.append(r)
    labels = []
    for r in runs:
        gw = r["meta"]["targets"].get("smtpgw", {})
        labels.append(f"{r['meta']['started'][:16]} {gw.get('commit', '')}".strip())
    keys: list[tuple[str, str]] = []
    for r in runs:
        for row in r.get("summary", []):
            if (row["load"], row["target"]) not in keys:
                keys.append((row["load"], row["target"]))
    width = max(22, *(len(l) + 2 for l in labels))
    print(f"{'load':<9} {'target':<8} {'figure':<12}" + "".join(f"{l:>{width}}" for l in labels))
    for load, target in keys:
        for figure, fmt in (("msgs/s", ".1f"), ("vs postfix", ".2f"), ("CPU s/1k", ".2f"), ("p99 ms", ".1f")):
            field = {"msgs/s": "msgs_per_s", "vs postfix": "ratio_vs_postfix", "CPU s/1k": "cpu_s_per_1000",
                     "p99 ms": "p99_ms"}[figure]
            cells = []
            for r in runs:
                row = next((x for x in r.get("summary", [])
                            if x["load"] == load and x["target"] == target), {})
                v = row.get(field)
                cells.append("-" if v is None else format(v, fmt))
            if all(c == "-" for c in cells):
                continue
            print(f"{load:<9} {target:<8} {figure:<12}" + "".join(f"{c:>{width}}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
