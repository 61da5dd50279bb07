"""Small shared helpers: readiness probe, cleanup registry, file-descriptor limit."""
from __future__ import annotations

import atexit
import math
import resource
import signal
import socket
import sys
import time
from typing import Callable

_cleanups: list[Callable[[], None]] = []


def on_exit(fn: Callable[[], None]) -> Callable[[], None]:
    """Register a cleanup that runs at exit (and on SIGTERM/SIGHUP); returns a function to unregister."""
    _cleanups.append(fn)

    def forget() -> None:
        if fn in _cleanups:
            _cleanups.remove(fn)
    return forget


def run_cleanups() -> None:
    # A second Ctrl-C must not cut a cleanup short and leave a daemon behind.
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:          # not the main thread
        pass
    while _cleanups:
        fn = _cleanups.pop()
        try:
            fn()
        except Exception as e:  # cleanup must go on for the others
            print(f"bench: cleanup failed: {e!r}", file=sys.stderr)


def _on_signal(signum, frame) -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)      # one cleanup at a time; repeats can't cut it short
    run_cleanups()
    sys.exit(128 + signum)


def _on_sigint(signum, frame) -> None:
    # The first Ctrl-C stops the bench (the current target is stopped, results so far are written);
    # further ones are ignored so that they cannot interrupt the stopping.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


atexit.register(run_cleanups)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGHUP, _on_signal)
signal.signal(signal.SIGINT, _on_sigint)


def read_line(sock: socket.socket) -> bytes:
    """Bytes up to and including the first newline (less if the peer closes first)."""
    data = b""
    while b"\n" not in data:
        more = sock.recv(512)
        if not more:
            break
        data += more
    return data


def wait_for_banner(host: str, port: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """True once host:port answers with a 220 greeting (then QUIT), False after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.settimeout(max(0.5, deadline - time.monotonic()))
                if read_line(s).startswith(b"220"):
                    try:
                        s.sendall(b"QUIT\r\n")
                        s.recv(512)
                    except OSError:
                        pass
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def raise_nofile(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards want (capped by the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def _disk_activity() -> tuple[int, int]:
    """(I/Os in flight, sectors written + discarded so far) over the machine's block devices."""
    in_flight = done = 0
    with open("/proc/diskstats") as f:
        for line in f:
            v = line.split()
            if v[2].startswith(("loop", "ram", "zram")):
                continue
            in_flight += int(v[11])
            done += int(v[9]) + (int(v[16]) if len(v) > 16 else 0)
    return in_flight, done


def settle_disk(quiet_for: float = 2.0, max_wait: float = 60.0) -> float:
    """``sync``, then wait until the disks have been idle for ``quiet_for`` seconds (at most
    ``max_wait``): the writeback and discards a previous run left behind (Postfix's 20,000 deleted
    queue files, say) would otherwise slow whatever target runs next. Returns the seconds waited."""
    import os
    t0 = time.monotonic()
    os.sync()
    last, since = None, time.monotonic()
    while time.monotonic() - t0 < max_wait:
        now = _disk_activity()
        if now != last or now[0]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            break
        time.sleep(0.1)
    return time.monotonic() - t0
