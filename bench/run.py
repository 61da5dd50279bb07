#!/usr/bin/env python3
"""smtpgw benchmark: ceiling vs Postfix vs smtpgw, side by side, in one run.

    python bench/run.py                      # full run (N = 20000)
    python bench/run.py --quick              # sanity run, well under two minutes
    python bench/run.py --targets ceiling,postfix --messages 5000

Prints a table and writes bench/results/<timestamp>.json. See bench/README.md for what each figure
means and how it is measured. Needs root (port 25, Postfix, smtp-sink -u postfix).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attack  # noqa: E402
import conns  # noqa: E402
import latency  # noqa: E402
import procstat  # noqa: E402
import targets as targets_mod  # noqa: E402
from conns import MemorySampler  # noqa: E402
from sink import Sink  # noqa: E402
from util import on_exit, port_free, raise_nofile, settle_disk  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
SENDER = "source@bench-client.test"
CHECK_IDS = True        # throughput runs: the sink keeps each message and checks its Message-Id (--no-check-ids)
RECIPIENT = "user@remote.test"

# name -> (sessions, size in bytes, which message count: "n" or "big")
LOADS = {
    "s20_4k": (20, 4096, "n"),
    "s100_4k": (100, 4096, "n"),
    "s20_100k": (20, 102400, "big"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_ports(addresses: list[tuple[str, int]]) -> None:
    busy = [f"{h}:{p}" for h, p in addresses if not port_free(h, p)]
    if busy:
        raise SystemExit(f"bench: address already in use: {', '.join(busy)} (a leftover from an "
                         "earlier run? stop it first)")


def run_source(argv: list[str], stderr_path: str):
    with open(stderr_path, "wb") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def reap(proc: subprocess.Popen) -> tuple[int, float] | None:
    """(exit code, CPU seconds) once the process has exited, else None. Uses wait4 for the rusage."""
    try:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:
        return (proc.returncode if proc.returncode is not None else -1, 0.0)
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, ru.ru_utime + ru.ru_stime


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all CPUs together."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / procstat.CLOCK_TICKS, steal / procstat.CLOCK_TICKS


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def throughput(target: targets_mod.Target, load: str, sessions: int, size: int, n: int, rundir: str,
               timeout: float, idle_limit: float, attacker: bool = False, from_host: str = "") -> dict:
    """One smtp-source run through one target; time until the sink has all n messages. With
    ``attacker``, a client floods the target without reading its replies meanwhile (bench/attack.py)."""
    os.makedirs(rundir, exist_ok=True)
    res: dict = {"load": load, "target": target.name, "sessions": sessions, "size": size, "messages": n}
    res["settle_s"] = round(settle_disk(), 1)      # start on quiet disks, whatever ran before
    sink = Sink(*targets_mod.SINK, rundir, dump=CHECK_IDS)
    sink.start()
    forget = on_exit(sink.stop)
    try:
        try:
            target.start(rundir)
        except Exception as e:
            res["error"] = str(e)
            log(f"{load} {target.name}: failed to start: {str(e).splitlines()[0]}")
            return res
        res["start_idle_s"] = round(target.wait_idle(), 1)
        cpu0, sink_cpu0 = target.cpu_seconds(), sink.cpu_seconds()
        (busy0, steal0), self0 = machine_cpu(), self_cpu()
        with open("/proc/loadavg") as f:
            res["loadavg_before"] = f.read().split()[0]
        sampler = MemorySampler(target.pids, interval=1.0)
        sampler.start()
        flooder = attack.Flooder(target.host, target.port) if attacker else None
        if flooder is not None:
            flooder.start()
            forget_flooder = on_exit(flooder.stop)
        argv = ["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size),
                *(["-M", from_host] if from_host else []),      # the From: header's domain
                "-f", SENDER, "-t", RECIPIENT, f"{target.host}:{target.port}"]
        t0 = time.monotonic()
        src = run_source(argv, os.path.join(rundir, "smtp-source.err"))
        forget_src = on_exit(lambda: src.poll() is None and src.kill())
        deadline, last, last_change = t0 + timeout, -1, t0
        source_done = None
        while True:
            c = sink.count()
            now = time.monotonic()
            if source_done is None:
                r = reap(src)
                if r is not None:
                    source_done = (now - t0, *r)
            if c >= n:
                break
            if c != last:
                last, last_change = c, now
            if now > deadline or now - last_change > idle_limit:
                res["error"] = (f"stopped waiting: {c}/{n} delivered after {now - t0:.0f} s "
                                f"({'timeout' if now > deadline else f'no progress for {idle_limit:.0f} s'})")
                break
            # Poll often enough for 0.2 % precision, rarely enough not to load the machine.
            time.sleep(max(0.002, min(0.05, (now - t0) / 500)))
        elapsed = time.monotonic() - t0
        delivered = sink.count()
        cpu1, sink_cpu1 = target.cpu_seconds(), sink.cpu_seconds()
        (busy1, steal1), self1 = machine_cpu(), self_cpu()
        peak = sampler.stop()
        if flooder is not None:
            res.update(flooder.stop())
            forget_flooder()
        end_mem = procstat.memory(target.pids(), with_pss=False)
        while source_done is None and time.monotonic() < t0 + elapsed + 30:
            r = reap(src)
            if r is not None:
                source_done = (time.monotonic() - t0, *r)
            else:
                time.sleep(0.05)
        if source_done is None:
            src.kill()
            res.setdefault("error", "smtp-source did not finish")
        forget_src()
        with open(os.path.join(rundir, "smtp-source.err"), errors="replace") as f:
            source_err = f.read()[-500:]
        cpu = cpu1 - cpu0
        # Whatever else ran on the machine meanwhile (other processes, unattributed kernel work):
        # a high figure means the run was disturbed and should be repeated.
        source_cpu = source_done[2] if source_done else 0.0
        other = (busy1 - busy0) - cpu - (sink_cpu1 - sink_cpu0) - source_cpu - (self1 - self0)
        capacity = elapsed * (os.cpu_count() or 1)
        res.update({
            "other_cpu_s": round(other, 2), "other_cpu_pct": round(100 * other / capacity, 1),
            "steal_s": round(steal1 - steal0, 2), "bench_cpu_s": round(self1 - self0, 2),
            "delivered": delivered, "complete": delivered >= n,
            "elapsed_s": round(elapsed, 3),
            "msgs_per_s": round(delivered / elapsed, 1) if elapsed else None,
            "source_exit": source_done[1] if source_done else None,
            "source_s": round(source_done[0], 3) if source_done else None,
            "source_cpu_s": round(source_done[2], 2) if source_done else None,
            "source_stderr": source_err.strip(),
            "cpu_s": round(cpu, 2) if target.name != "ceiling" else None,
            "cpu_s_per_1000": round(cpu / delivered * 1000, 3) if delivered and target.name != "ceiling"
            else None,
            "sink_cpu_s": round(sink_cpu1 - sink_cpu0, 2),
            "peak_memory": peak.as_dict() if peak else None,
            "end_memory": end_mem.as_dict(),
        })
        if target.name == "postfix" and isinstance(target, targets_mod.Postfix) and target.instance:
            res["postfix_queue_left"] = target.instance.queue_size()
        if CHECK_IDS:       # after the timed window: each message exactly once, by its Message-Id
            res["sink_final_count"] = sink.settled_count()
            res["ids"] = sink.check_ids(n)
            if not res["ids"]["ok"]:
                res["complete"] = False
                res.setdefault("error", "sink: {files} messages, {distinct} distinct Message-Ids, "
                               "{duplicates} duplicate(s), {without_id} without an id".format(**res["ids"]))
        if res.get("error") or source_err.strip():
            res["target_log_tail"] = target.log_tail()[-2000:]
        log(f"{load} {target.name}: {delivered}/{n} in {elapsed:.2f} s = {res['msgs_per_s']} msg/s"
            + (f", CPU {res['cpu_s_per_1000']} s/1000" if res["cpu_s_per_1000"] is not None else "")
            + (f"  [{res['error']}]" if res.get("error") else ""))
        return res
    finally:
        target.stop()
        sink.stop()
        forget()


@contextlib.contextmanager
def started(target: targets_mod.Target, rundir: str, tag: str, res: dict, **start: int):
    """A fresh sink and target for one measurement, both stopped after it; yields the sink, or None
    when the target did not start (then ``res["error"]`` says why)."""
    os.makedirs(rundir, exist_ok=True)
    sink = Sink(*targets_mod.SINK, rundir)
    sink.start()
    forget = on_exit(sink.stop)
    try:
        try:
            target.start(rundir, **start)
        except Exception as e:
            res["error"] = str(e)
            log(f"{tag} {target.name}: failed to start: {str(e).splitlines()[0]}")
            yield None
            return
        res["start_idle_s"] = round(target.wait_idle(), 1)
        yield sink
    finally:
        target.stop()
        sink.stop()
        forget()


def latency_run(target: targets_mod.Target, messages: int, rundir: str, timeout: float) -> dict:
    res: dict = {"target": target.name}
    with started(target, rundir, "latency", res) as sink:
        if sink is None:
            return res
        try:
            res.update(latency.measure(target.host, target.port, messages, sessions=20, size=4096,
                                       overall_timeout=timeout))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        ok = res.get("ok", 0)
        res["all_delivered"] = sink.wait_for(ok, timeout=min(timeout, 120), idle_limit=60) if ok else False
        res["delivered"] = sink.count()
        log(f"latency {target.name}: {ok}/{messages} ok, p50 {res.get('p50_ms')} ms, "
            f"p99 {res.get('p99_ms')} ms" + (f", errors {res['errors']}" if res.get("errors") else "")
            + (f"  [{res['error']}]" if res.get("error") else ""))
    return res


def fanout_run(target: targets_mod.Target, recipients: int, rundir: str, timeout: float) -> dict:
    """One message to ``recipients`` addresses while a probe times the banner (bench/attack.py)."""
    res: dict = {"case": "fanout", "target": target.name}
    with started(target, rundir, "fanout", res) as sink:
        if sink is None:
            return res
        try:
            res.update(attack.fanout(target.host, target.port, target.name, recipients, target.pids,
                                     lambda k, t: sink.wait_for(k, t, idle_limit=60), sink.count, timeout))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        if not res.get("error") and not res.get("all_at_sink"):
            res["error"] = f"only {res.get('sink_transactions')} transactions reached the sink"
        log(f"fanout {recipients} {target.name}: {res.get('accepted')} accepted, at the sink after "
            f"{res.get('delivery_s')} s; banner p99 {res.get('banner_p99_ms')} ms, max "
            f"{res.get('banner_max_ms')} ms over {res.get('samples')} probes"
            + (f"  [{res['error']}]" if res.get("error") else ""))
        if res.get("error"):
            res["target_log_tail"] = target.log_tail()[-2000:]
    return res


def flood_runs(target: targets_mod.Target, n: int, rundir: str, timeout: float, idle_limit: float) -> dict:
    """The s20_4k load without, then beside, a client that floods without reading (bench/attack.py)."""
    sessions, size, _ = LOADS["s20_4k"]
    res: dict = {"case": "flood", "target": target.name}
    for tag, attacker in (("alone", False), ("attacked", True)):
        r = throughput(target, f"flood-{tag}", sessions, size, n, os.path.join(rundir, tag), timeout,
                       idle_limit, attacker=attacker)
        res[tag] = r
    alone, attacked = res["alone"], res["attacked"]
    if alone.get("msgs_per_s") and attacked.get("msgs_per_s"):
        res["rate_ratio"] = round(attacked["msgs_per_s"] / alone["msgs_per_s"], 3)
    errors = [r["error"] for r in (alone, attacked) if r.get("error")]
    if errors:
        res["error"] = "; ".join(errors)
    log(f"flood {target.name}: {alone.get('msgs_per_s')} msg/s alone, {attacked.get('msgs_per_s')} beside "
        f"the attacker ({attacked.get('attacker_bytes_sent', 0) / 2**20:.1f} MB taken from it)")
    return res


def conns_run(target: targets_mod.Target, count: int, rundir: str, timeout: float) -> dict:
    res: dict = {"target": target.name, "connections": count}
    with started(target, rundir, f"conns {count}", res, max_connections=count + 100) as sink:
        if sink is None:
            return res
        try:
            res.update(conns.run(target.host, target.port, count, target.pids, sink.count,
                                 lambda k, t: sink.wait_for(k, t, idle_limit=60),
                                 timeout=120, overall_timeout=timeout))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        idle = res.get("idle_memory") or {}
        log(f"conns {count} {target.name}: ready {res.get('ready')}, accepted {res.get('accepted')}, "
            f"delivered {res.get('delivered')}; idle RSS max/process {idle.get('rss_max_mb')} MB, "
            f"sum {idle.get('rss_total_mb')} MB over {idle.get('processes')} processes"
            + (f"  [{res['error']}]" if res.get("error") else ""))
        if res.get("error") or not res.get("ok"):
            res["target_log_tail"] = target.log_tail()[-2000:]
    return res


# -- output ---------------------------------------------------------------------------------------
def fmt(v, spec: str = "", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(results: dict) -> list[dict]:
    """One row per (load, target): medians over repetitions, ratio to Postfix's median."""
    rows = []
    lat: dict[str, list[dict]] = {}
    for r in results["latency"]:
        if not r.get("error"):
            lat.setdefault(r["target"], []).append(r)
    for load in results["meta"]["loads"]:
        per_target: dict[str, list[dict]] = {}
        for r in results["throughput"]:
            if r["load"] == load:
                per_target.setdefault(r["target"], []).append(r)
        summary = {}
        for name, runs in per_target.items():
            done = [r for r in runs if r.get("complete")]
            rates = [r["msgs_per_s"] for r in done]
            mems = [r["peak_memory"] for r in done if r.get("peak_memory") and r["peak_memory"]["processes"]]
            summary[name] = {
                "load": load, "target": name, "messages": runs[0]["messages"], "runs": len(runs),
                "complete_runs": len(done), "msgs_per_s": _median(rates),
                "msgs_per_s_min": min(rates, default=None), "msgs_per_s_max": max(rates, default=None),
                "cpu_s_per_1000": _median([r["cpu_s_per_1000"] for r in done
                                           if r.get("cpu_s_per_1000") is not None]),
                "other_cpu_pct": _median([r["other_cpu_pct"] for r in done if "other_cpu_pct" in r]),
                "peak_rss_total_mb": max((m["rss_total_mb"] for m in mems), default=None),
                "peak_rss_max_mb": max((m["rss_max_mb"] for m in mems), default=None),
                "peak_processes": max((m["processes"] for m in mems), default=None),
                "errors": [r["error"] for r in runs if r.get("error")],
            }
            if load == "s20_4k" and name in lat:
                for key in ("p50_ms", "p99_ms"):        # medians over the repetitions
                    values = [r[key] for r in lat[name] if r.get(key) is not None]
                    summary[name][key] = _median(values)
                    summary[name][key.replace("_ms", "_runs")] = values
        pf = summary.get("postfix", {}).get("msgs_per_s")
        for row in summary.values():
            row["ratio_vs_postfix"] = round(row["msgs_per_s"] / pf, 3) if pf and row["msgs_per_s"] else None
            rows.append(row)
    return rows


def print_table(results: dict) -> None:
    reps = results["meta"]["repeat"]
    print()
    print("Throughput (smtp-source -> target -> smtp-sink; msgs/s until the sink has all N"
          + (f"; median of {reps} runs" if reps > 1 else "") + ")")
    head = (f"{'load':<9} {'target':<8} {'N':>6} {'msgs/s':>8} {'vs postfix':>10} {'p50 ms':>7} "
            f"{'p99 ms':>7} {'CPU s/1k':>8} {'RSS MB sum/max/procs':>21} {'other CPU':>9} {'complete':>8}")
    print(head)
    print("-" * len(head))
    for row in results["summary"]:
        rate = fmt(row["msgs_per_s"], ".1f")
        ratio = f"{row['ratio_vs_postfix']:.2f}x" if row["ratio_vs_postfix"] else "-"
        mem = (f"{row['peak_rss_total_mb']:.0f}/{row['peak_rss_max_mb']:.0f}/{row['peak_processes']}"
               if row["peak_processes"] else "-")
        print(f"{row['load']:<9} {row['target']:<8} {row['messages']:>6} {rate:>8} {ratio:>10} "
              f"{fmt(row.get('p50_ms'), '.1f'):>7} {fmt(row.get('p99_ms'), '.1f'):>7} "
              f"{fmt(row['cpu_s_per_1000'], '.2f'):>8} {mem:>21} {fmt(row['other_cpu_pct'], '.0f'):>8}% "
              f"{row['complete_runs']:>4}/{row['runs']:<3}")
        if reps > 1 and row["msgs_per_s_min"] is not None:
            print(f"{'':<9} {'':<8} {'':>6} range {row['msgs_per_s_min']:.1f} .. {row['msgs_per_s_max']:.1f}")
        for e in row["errors"][:2]:
            print(f"{'':<9} {'':<8} ! {e.splitlines()[0][:110]}")
    print("RSS: peak during the run, summed over the target's processes / largest process / processes. "
          "other CPU: share of the machine used by anything else during the run (noise).")
    if CHECK_IDS:
        print("complete: runs in which the sink got every message exactly once (N messages, N distinct Message-Ids).")
    if results["latency"]:
        print("\np50/p99: end of DATA ('.') -> 250, own client, 20 sessions x 4 KB, "
              f"{results['meta']['latency_messages']} messages per target and repetition (after that repetition's "
              "throughput runs; medians over the repetitions)")
    if results["conns"]:
        print("\nConcurrent connections (idle after EHLO, then one message each, all at once)")
        head = (f"{'target':<8} {'conns':>6} {'ready':>6} {'250s':>6} {'at sink':>8} "
                f"{'idle RSS MB max/proc':>21} {'idle RSS sum':>13} {'idle PSS sum':>13} "
                f"{'peak RSS max/proc':>18} {'ok':>4}")
        print(head)
        print("-" * len(head))
        for r in results["conns"]:
            idle = r.get("idle_memory") or {}
            peak = r.get("peak_memory_during_send") or {}
            print(f"{r['target']:<8} {r['connections']:>6} {fmt(r.get('ready')):>6} "
                  f"{fmt(r.get('accepted')):>6} {fmt(r.get('delivered')):>8} "
                  f"{fmt(idle.get('rss_max_mb'), '.1f'):>21} {fmt(idle.get('rss_total_mb'), '.1f'):>13} "
                  f"{fmt(idle.get('pss_total_mb'), '.1f'):>13} {fmt(peak.get('rss_max_mb'), '.1f'):>18} "
                  f"{'yes' if r.get('ok') else 'NO':>4}")
            if r.get("error"):
                print(f"{'':<8} ! {r['error'].splitlines()[0][:100]}")
            elif r.get("connect_errors") or r.get("send_errors"):
                print(f"{'':<8} ! connect errors {r.get('connect_errors')}, "
                      f"send errors {r.get('send_errors')}")


def _section(title: str, head: str) -> None:
    print("\n" + title)
    print(head)
    print("-" * len(head))


def print_attacks(results: dict) -> None:
    fanouts = [r for r in results["attacks"] if r["case"] == "fanout"]
    floods = [r for r in results["attacks"] if r["case"] == "flood"]
    if fanouts:
        _section("Fan-out: one message to R recipients (NOTIFY, ORCPT); banner latency of another client "
                 "meanwhile (bar: < 100 ms)",
                 f"{'target':<8} {'R':>6} {'accepted':>8} {'at sink s':>9} {'probes':>6} {'p50 ms':>7} "
                 f"{'p99 ms':>7} {'max ms':>7} {'peak RSS MB':>11}")
    for r in fanouts:
        peak = r.get("peak_memory") or {}
        print(f"{r['target']:<8} {fmt(r.get('recipients')):>6} {fmt(r.get('accepted')):>8} "
              f"{fmt(r.get('delivery_s'), '.1f'):>9} {fmt(r.get('samples')):>6} "
              f"{fmt(r.get('banner_p50_ms'), '.1f'):>7} {fmt(r.get('banner_p99_ms'), '.1f'):>7} "
              f"{fmt(r.get('banner_max_ms'), '.1f'):>7} {fmt(peak.get('rss_total_mb'), '.0f'):>11}")
        if r.get("error"):
            print(f"{'':<8} ! {r['error'].splitlines()[0][:100]}")
    if floods:
        _section("Attacker beside a normal load: smtp-source s20_4k alone, then while one client writes NOOPs "
                 "without reading",
                 f"{'target':<8} {'msgs/s alone':>12} {'attacked':>9} {'ratio':>6} {'peak RSS MB alone':>17} "
                 f"{'attacked':>9} {'MB taken':>9} {'cut off':>7}")
    for r in floods:
        alone, hit = r.get("alone") or {}, r.get("attacked") or {}
        rss = lambda x: (x.get("peak_memory") or {}).get("rss_total_mb")  # noqa: E731
        print(f"{r['target']:<8} {fmt(alone.get('msgs_per_s'), '.1f'):>12} {fmt(hit.get('msgs_per_s'), '.1f'):>9} "
              f"{fmt(r.get('rate_ratio'), '.2f'):>6} {fmt(rss(alone), '.0f'):>17} {fmt(rss(hit), '.0f'):>9} "
              f"{hit.get('attacker_bytes_sent', 0) / 2**20:>9.1f} "
              f"{'yes' if hit.get('attacker_closed_by_target') else 'no':>7}")
        if r.get("error"):
            print(f"{'':<8} ! {r['error'].splitlines()[0][:100]}")


def machine_info() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
    except OSError:
        pass
    return {"hostname": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "cpu_model": model, "python": platform.python_version(),
            "mem_total_mb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", "-n", type=int, help="N for the 4 KB loads (default 20000; quick 1000)")
    p.add_argument("--big-messages", type=int, help="N for the 100 KB load (default N/4)")
    p.add_argument("--targets", default="ceiling,postfix,smtpgw")
    p.add_argument("--loads", default=",".join(LOADS), help=f"subset of {','.join(LOADS)}")
    p.add_argument("--latency-messages", type=int, help="messages per target for p50/p99 "
                   "(default 2000; quick 300; 0 skips)")
    p.add_argument("--conns", help="connection counts, comma-separated (default 1000,5000; "
                   "quick 200; '' skips)")
    p.add_argument("--conns-targets", help="targets for the connection test (default: --targets "
                   "without ceiling)")
    p.add_argument("--attacks", help="hostile cases, comma-separated: fanout, flood (default both; '' skips)")
    p.add_argument("--fanout-recipients", type=int, help="recipients of the fan-out message "
                   "(default 10000; quick 2000)")
    p.add_argument("--attack-targets", help="targets for the hostile cases (default: --targets without "
                   "ceiling)")
    p.add_argument("--smtpgw-dkim", default="", choices=["", "rsa-sha256", "ed25519-sha256"],
                   help="smtpgw signs every message with dkim_sign and one fresh key of this kind "
                        "(smtp-source's From domain is then set for every target)")
    p.add_argument("--smtpgw-command", default=targets_mod.DEFAULT_SMTPGW_COMMAND,
                   help="how to start smtpgw; {config} is the generated YAML path; run from the "
                        "repository root with PYTHONPATH=<repo>")
    p.add_argument("--smtpgw-workers", default=targets_mod.DEFAULT_SMTPGW_WORKERS,
                   help="gateway.workers in the generated smtpgw config (a number or auto; default "
                        "%(default)s)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run every throughput measurement this many times (interleaved); the table "
                        "shows medians")
    p.add_argument("--quick", action="store_true", help="small counts, for a sanity check")
    p.add_argument("--timeout", type=float, help="per-run limit in seconds (default 120 + N/20)")
    p.add_argument("--idle-limit", type=float, default=60.0,
                   help="give up on a run when the sink count has not moved for this long")
    p.add_argument("--workdir-base", default="/var/tmp",
                   help="where the temporary queue/spool directories go (same disk as a real spool)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, configs)")
    p.add_argument("--no-check-ids", action="store_true",
                   help="do not keep the sink's messages to check each arrived once (by Message-Id)")
    p.add_argument("--json", help="output file (default bench/results/<timestamp>.json)")
    a = p.parse_args(argv)
    global CHECK_IDS
    CHECK_IDS = not a.no_check_ids
    a.messages = a.messages or (1000 if a.quick else 20000)
    a.big_messages = a.big_messages or max(1, a.messages // 4 if not a.quick else 200)
    if a.latency_messages is None:
        a.latency_messages = 300 if a.quick else 2000
    if a.conns is None:
        a.conns = "200" if a.quick else "1000,5000"
    a.conns = [int(x) for x in a.conns.split(",") if x.strip()]
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    a.loads = [l.strip() for l in a.loads.split(",") if l.strip()]
    for l in a.loads:
        if l not in LOADS:
            p.error(f"unknown load {l!r}")
    for t in a.targets:
        targets_mod.make(t)             # validates the name
    a.attacks = [x.strip() for x in ("fanout,flood" if a.attacks is None else a.attacks).split(",") if x.strip()]
    for x in a.attacks:
        if x not in ("fanout", "flood"):
            p.error(f"unknown attack {x!r} (fanout, flood)")
    a.fanout_recipients = a.fanout_recipients or (2000 if a.quick else 10000)
    if a.attack_targets is None:
        a.attack_targets = [t for t in a.targets if t != "ceiling"]
    else:
        a.attack_targets = [t.strip() for t in a.attack_targets.split(",") if t.strip()]
    if a.conns_targets is None:
        a.conns_targets = [t for t in a.targets if t != "ceiling"]
    else:
        a.conns_targets = [t.strip() for t in a.conns_targets.split(",") if t.strip()]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (Postfix, port 25, smtp-sink -u postfix)")
    for tool in ("smtp-source", "smtp-sink", "postfix", "postconf"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found (apt-get install postfix)")
    nofile = raise_nofile(1 << 20)      # the servers inherit this limit too
    addrs = [targets_mod.SINK] + [(targets_mod.make(t).host, targets_mod.make(t).port)
                                  for t in set(a.targets) | set(a.conns_targets) | set(a.attack_targets)
                                  if t != "ceiling"]
    check_ports(addrs)

    workdir = tempfile.mkdtemp(prefix="smtpgw-bench-", dir=a.workdir_base)
    os.chmod(workdir, 0o755)
    if not a.keep:
        on_exit(lambda: shutil.rmtree(workdir, ignore_errors=True))
    started = datetime.datetime.now(datetime.timezone.utc)
    targets = {t: targets_mod.make(t, a.smtpgw_command, a.smtpgw_workers, a.smtpgw_dkim)
               for t in dict.fromkeys(a.targets + a.conns_targets + a.attack_targets)}
    results: dict = {
        "meta": {"started": started.isoformat(timespec="seconds"), "machine": machine_info(),
                 "args": {k: v for k, v in vars(a).items()}, "loads": a.loads,
                 "messages": a.messages, "big_messages": a.big_messages,
                 "latency_messages": a.latency_messages, "rlimit_nofile": nofile, "repeat": a.repeat,
                 "targets": {name: t.describe() for name, t in targets.items()},
                 "workdir": workdir if a.keep else None},
        "throughput": [], "latency": [], "conns": [], "attacks": [],
    }
    log(f"workdir {workdir}; targets {a.targets}; N={a.messages} (100 KB: {a.big_messages})")
    run_no = 0

    def rundir(tag: str) -> str:
        nonlocal run_no
        run_no += 1
        return os.path.join(workdir, f"{run_no:02d}-{tag}")

    try:
        for rep in range(a.repeat):
            for load in a.loads:
                sessions, size, which = LOADS[load]
                n = a.messages if which == "n" else a.big_messages
                timeout = a.timeout or 120 + n / 20
                for name in a.targets:
                    r = throughput(targets[name], load, sessions, size, n, rundir(f"{load}-{name}"),
                                   timeout, a.idle_limit,
                                   from_host=targets_mod.DKIM_DOMAIN if a.smtpgw_dkim else "")
                    r["repetition"] = rep + 1
                    results["throughput"].append(r)
            # latency too is measured once per repetition, interleaved with the other targets
            for name in a.targets if a.latency_messages else ():
                r = latency_run(targets[name], a.latency_messages, rundir(f"latency-{name}"),
                                a.timeout or 120 + a.latency_messages / 10)
                r["repetition"] = rep + 1
                results["latency"].append(r)
        for count in a.conns:
            for name in a.conns_targets:
                results["conns"].append(conns_run(targets[name], count, rundir(f"conns{count}-{name}"),
                                                  a.timeout or 300 + count / 10))
        for case in a.attacks:
            for name in a.attack_targets:
                if case == "fanout":
                    r = fanout_run(targets[name], a.fanout_recipients, rundir(f"fanout-{name}"),
                                   a.timeout or 300 + a.fanout_recipients / 20)
                else:
                    r = flood_runs(targets[name], a.messages, rundir(f"flood-{name}"),
                                   a.timeout or 120 + a.messages / 20, a.idle_limit)
                results["attacks"].append(r)
    except KeyboardInterrupt:
        log("interrupted; writing what was measured")
        results["meta"]["interrupted"] = True
    results["summary"] = summarize(results)
    results["meta"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")

    path = a.json or os.path.join(BENCH, "results", started.strftime("%Y%m%dT%H%M%SZ") + ".json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)
    print_attacks(results)
    print(f"\nJSON: {path}")
    failed = [r for r in results["throughput"] if not r.get("complete")] + \
             [r for r in results["latency"] if r.get("error")] + \
             [r for r in results["conns"] if not r.get("ok")] + \
             [r for r in results["attacks"] if r.get("error")]
    return 1 if failed or results["meta"].get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
