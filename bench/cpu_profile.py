"""Where a relayed message's CPU goes, process by process: CPU per message from /proc, system calls per
message (strace), and Python calls per message in each worker's reactor thread (cProfile).

    sudo python bench/cpu_profile.py                    # /proc figures only: CPU per message per process
    sudo python bench/cpu_profile.py --profile          # and a cProfile of each worker (thread CPU clock)
    sudo python bench/cpu_profile.py --strace           # and system calls per message per process
    sudo python bench/cpu_profile.py --dkim rsa-sha256  # with dkim_sign on (as bench/run.py --smtpgw-dkim)

It starts the sink and smtpgw as bench/run.py does (same generated configuration), sends ``--warmup``
messages with smtp-source (connections, caches and the delivery pool warm), then measures a window of
``--messages`` more: from the moment smtp-source starts until the sink has them all. Run it twice,
before and after a change, interleaved, on a loaded machine: these are CPU times, not rates.

With ``--profile`` every Python process of the gateway loads ``bench/cpuprof/sitecustomize.py``, and a
signal switches a cProfile of its main thread on and off around the window; cProfile roughly doubles
the CPU it measures, so read its shares and call counts, and take CPU per message from a run without it.
``--strace`` (strace -c -f on each process) slows the gateway down much more; its CPU figures mean
nothing, its counts do.
"""
from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import latency  # noqa: E402
import procstat  # noqa: E402
import targets as targets_mod  # noqa: E402
from sink import Sink  # noqa: E402
from util import on_exit  # noqa: E402

TOGGLE = signal.SIGRTMIN + 3        # bench/cpuprof/sitecustomize.py
SENDER, RECIPIENT = "bench@bench-client.test", "user@remote.test"


def role(pid: int, root: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    if b"mta.spool.writer" in argv:
        return "spool writer"
    if pid == root:
        return "worker 0"
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        return f"worker {int(env.get(b'SMTPGW_WORKER', b'0'))}"
    except (OSError, ValueError):
        return "worker ?"


def stat(pid: int) -> dict[str, float]:
    """utime, stime (s, all threads) and context switches of one process."""
    out = {"user": 0.0, "sys": 0.0, "vcsw": 0, "ivcsw": 0}
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        out["user"], out["sys"] = int(rest[11]) / procstat.CLOCK_TICKS, int(rest[12]) / procstat.CLOCK_TICKS
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        out["vcsw"] += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches"):
                        out["ivcsw"] += int(line.split()[1])
    except OSError:
        pass
    return out


def source(target, n: int, sessions: int, size: int, from_host: str = "") -> subprocess.Popen:
    """smtp-source; ``from_host`` sets the From: header's domain (-M), the key's domain with --dkim."""
    return subprocess.Popen(["smtp-source", "-s", str(sessions), "-m", str(n), "-l", str(size),
                             *(["-M", from_host] if from_host else []),
                             "-f", SENDER, "-t", RECIPIENT, f"{target.host}:{target.port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def strace_summary(path: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                    calls[parts[-1]] = int(parts[3])
    except OSError:
        pass
    return calls


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workers", default=targets_mod.DEFAULT_SMTPGW_WORKERS)
    ap.add_argument("--dkim", default="", choices=["", "rsa-sha256", "ed25519-sha256"],
                    help="dkim_sign signs every message with one fresh key of this kind (bench/run.py's --smtpgw-dkim)")
    ap.add_argument("--profile", action="store_true", help="cProfile each worker's reactor thread")
    ap.add_argument("--strace", action="store_true", help="count system calls per process")
    ap.add_argument("--top", type=int, default=30, help="functions shown per worker (by own CPU)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (profiles, logs)")
    ap.add_argument("--latency", action="store_true",
                    help="the window is bench/latency.py's client (sessions kept open) instead of smtp-source")
    args = ap.parse_args()

    workdir = tempfile.mkdtemp(prefix="smtpgw-cpuprof-", dir="/var/tmp")
    profdir = os.path.join(workdir, "prof")
    os.makedirs(profdir)
    if args.profile:
        os.environ["SMTPGW_CPROFILE"] = profdir
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "cpuprof"),
                                                                  os.environ.get("PYTHONPATH")]))
    sink = Sink(*targets_mod.SINK, workdir)
    sink.start()
    on_exit(sink.stop)
    target = targets_mod.make("smtpgw", smtpgw_workers=args.workers, smtpgw_dkim=args.dkim)
    from_host = targets_mod.DKIM_DOMAIN if args.dkim else ""
    target.start(workdir)
    try:
        target.wait_idle()
        warm = source(target, args.warmup, args.sessions, args.size, from_host)
        warm.wait()
        if not sink.wait_for(args.warmup, 120):
            print("warm-up messages did not all arrive", file=sys.stderr)
            return 1
        time.sleep(1.0)
        root = target.proc.pid
        pids = target.pids()
        roles = {pid: role(pid, root) for pid in pids}
        tracers = []
        if args.strace:
            for pid in pids:
                out = os.path.join(workdir, f"strace-{pid}.txt")
                tracers.append((pid, out, subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                                                           stderr=subprocess.DEVNULL)))
            time.sleep(1.0)
        if args.profile:
            for pid, r in roles.items():
                if r.startswith("worker"):
                    os.kill(pid, TOGGLE)
        before = {pid: stat(pid) for pid in pids}
        t0 = time.monotonic()
        lat = None
        if args.latency:
            src = subprocess.Popen(["true"])
            lat = latency.measure(target.host, target.port, args.messages, args.sessions, args.size)
        else:
            src = source(target, args.messages, args.sessions, args.size, from_host)
        ok = sink.wait_for(args.warmup + args.messages, 600, idle_limit=60)
        elapsed = time.monotonic() - t0
        after = {pid: stat(pid) for pid in pids}
        if args.profile:
            for pid, r in roles.items():
                if r.startswith("worker"):
                    os.kill(pid, TOGGLE)
        src.wait()
        for _, _, proc in tracers:
            proc.send_signal(signal.SIGINT)
            proc.wait()
        if not ok:
            print(f"only {sink.count() - args.warmup}/{args.messages} arrived", file=sys.stderr)
            return 1
        n = args.messages
        print(f"{n} messages of {args.size} octets, {args.sessions} sessions, workers {args.workers}: "
              f"{elapsed:.2f} s{f' (dkim {args.dkim})' if args.dkim else ''}{' (profiled)' if args.profile else ''}{' (straced)' if args.strace else ''}")
        if lat is not None:
            print(f"DATA-end to 250: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms ({lat['ok']} ok, "
                  f"errors {lat['errors'] or 'none'})")
        print(f"{'process':<14}{'pid':>8}{'CPU ms/msg':>12}{'user':>8}{'sys':>8}{'csw/msg':>9}")
        total = 0.0
        for pid in sorted(pids, key=lambda p: roles[p]):
            b, a = before[pid], after[pid]
            user, sys_ = (a["user"] - b["user"]) / n * 1000, (a["sys"] - b["sys"]) / n * 1000
            total += user + sys_
            csw = (a["vcsw"] + a["ivcsw"] - b["vcsw"] - b["ivcsw"]) / n
            print(f"{roles[pid]:<14}{pid:>8}{user + sys_:>12.3f}{user:>8.3f}{sys_:>8.3f}{csw:>9.1f}")
        print(f"{'all':<22}{total:>12.3f}   (= {total:.2f} s per 1,000 messages)")
        for pid, out, _ in tracers:
            calls = strace_summary(out)
            top = sorted(calls.items(), key=lambda kv: -kv[1])[:12]
            print(f"\nsystem calls per message, {roles[pid]} ({pid}): {sum(calls.values()) / n:.1f}: "
                  + ", ".join(f"{name} {count / n:.2f}" for name, count in top))
        if args.profile:
            time.sleep(1.0)
            for pid in sorted(pids, key=lambda p: roles[p]):
                path = os.path.join(profdir, f"{pid}.prof")
                if not os.path.exists(path):
                    continue
                st = pstats.Stats(path)
                print(f"\n== {roles[pid]} ({pid}): {st.total_calls / n:.0f} Python calls per message, "
                      f"{st.total_tt / n * 1000:.3f} ms profiled CPU per message")
                rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:args.top]
                print(f"{'own %':>6} {'cum %':>6} {'calls/msg':>9}  function")
                for (file, line, name), (cc, nc, tt, ct, _) in rows:
                    where = file.split("site-packages/")[-1].replace(str(HERE.parent) + "/", "")
                    print(f"{tt / st.total_tt * 100:6.1f} {ct / st.total_tt * 100:6.1f} {nc / n:9.2f}  "
                          f"{name} ({where}:{line})")
        return 0
    finally:
        target.stop()
        sink.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
