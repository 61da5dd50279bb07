"""How long a new message takes to become durable in the spool, apart from everything else.

``Spool.put`` through the real spool writer process (what the 250 after DATA waits for), with
``--inflight`` puts kept in flight and each message removed once stored, as a relay does; then,
with ``--raw``, the two file sequences of ``mta/spool/files.py`` alone, one thread, no Python
between them: the directory-fsync way (write, fdatasync, rename, fsync of the directory) and the
one-commit way (write, rename, fsync of the file). Latency of a few milliseconds on a shared machine
moves with its load; run it interleaved against another checkout (``PYTHONPATH=<checkout>``) and
compare medians.

    PYTHONPATH=. python bench/spool_latency.py --puts 1100 --inflight 20 --raw
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

if not os.environ.get("PYTHONPATH"):         # else the checkout it names (to compare two)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer, reactor  # noqa: E402

from mta.model.queue_entry import QueueEntry, RecipientState  # noqa: E402
import mta  # noqa: E402
from mta.spool import files as spool_files  # noqa: E402
from mta.spool.store import Spool  # noqa: E402

BODY = [b"Subject: spool latency\r\n\r\n", b"x" * 4000, b"\r\n"]
WARMUP = 100                    # puts not counted: the writer process starts with the first


def percentiles(samples: list[float]) -> str:
    s = sorted(samples)
    return " ".join(f"p{p} {s[min(len(s) - 1, len(s) * p // 100)] * 1e3:.2f}" for p in (50, 90, 99)) + " ms"


def measure_puts(directory: str, puts: int, inflight: int) -> tuple[list[float], int]:
    spool = Spool(directory, reactor=reactor)
    spool.open()
    times: list[float] = []
    started = iter(range(puts))
    finished: list[int] = []
    result: list[int] = []

    def one() -> None:
        i = next(started, None)
        if i is None:
            return
        entry = QueueEntry(id=f"m{i:08d}", sender="a@b.test", rcpts=[RecipientState("c@d.test")],
                           received_at=time.time())
        t = time.perf_counter()

        def stored(_: object) -> None:
            if i >= WARMUP:
                times.append(time.perf_counter() - t)
            spool.remove(entry.id)
            finished.append(i)
            if len(finished) == puts:
                result.append(spool.dir_syncs)
                spool.close().addBoth(lambda _: reactor.stop())
            else:
                one()

        spool.put(entry, BODY).addCallbacks(stored, lambda f: (f.printTraceback(), reactor.stop()))

    reactor.callWhenRunning(lambda: [one() for _ in range(inflight)])
    reactor.run()
    return times, result[0] if result else -1


def measure_raw(directory: str, n: int) -> dict[str, list[float]]:
    tmp, queue = os.path.join(directory, "raw-tmp"), os.path.join(directory, "raw-queue")
    os.makedirs(tmp)
    os.makedirs(queue)
    dir_fd = os.open(queue, os.O_RDONLY | os.O_DIRECTORY)
    data = b"".join(BODY)
    out: dict[str, list[float]] = {"directory fsync": [], "one commit": []}
    try:
        for i in range(n):
            for way, samples in out.items():
                src, dst = os.path.join(tmp, f"{way[0]}{i}"), os.path.join(queue, f"{way[0]}{i}")
                t = time.perf_counter()
                fd = os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, data)
                if way == "one commit":
                    os.rename(src, dst)
                    os.fsync(fd)
                    os.close(fd)
                else:
                    os.fdatasync(fd)
                    os.close(fd)
                    os.rename(src, dst)
                    os.fsync(dir_fd)
                samples.append(time.perf_counter() - t)
                os.unlink(dst)
    finally:
        os.close(dir_fd)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--puts", type=int, default=1100)
    p.add_argument("--inflight", type=int, default=20)
    p.add_argument("--raw", type=int, nargs="?", const=300, default=0,
                   help="also time the two file sequences alone, this many times each (default 300)")
    p.add_argument("--dir", default=None, help="where to make the spool (default: a new folder here)")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="spool-latency-", dir=args.dir or os.getcwd())
    try:
        if hasattr(spool_files, "one_commit_fs"):
            way = "one commit" if spool_files.one_commit_fs(work) else "directory fsync"
            print(f"{mta.__file__}: {spool_files.mount_type(work)}, new messages the {way} way")
        else:
            print(f"{mta.__file__}: new messages the directory fsync way (a checkout without one commit)")
        times, dir_syncs = measure_puts(os.path.join(work, "spool"), args.puts, args.inflight)
        print(f"put, {args.inflight} in flight, {len(times)} counted: {percentiles(times)}; "
              f"directory fsyncs {dir_syncs / args.puts:.2f} a message")
        if args.raw:
            for name, samples in measure_raw(work, args.raw).items():
                print(f"{name:>16}, one thread: {percentiles(samples)}")
    finally:
        shutil.rmtree(work, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
