"""Postfix's smtp-sink as the smart host, with a live count of the messages it has received.

smtp-sink ``-c`` writes ``sess=N quit=N mesg=N`` followed by a carriage return every time a session
ends or a final "." arrives. Its output goes to a file (never a pipe, which could fill up and stall
the sink); the count is the last complete record of that file.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import procstat
from util import wait_for_banner

_RECORD = re.compile(rb"mesg=(\d+)\r")


class Sink:
    def __init__(self, host: str, port: int, workdir: str, max_concurrency: int = 1000) -> None:
        self.host, self.port = host, port
        self.path = os.path.join(workdir, f"sink-{time.monotonic_ns()}.out")
        self.max_concurrency = max_concurrency
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._out = open(self.path, "wb")
        argv = ["smtp-sink", "-c", "-u", "postfix", "-m", str(self.max_concurrency),
                f"{self.host}:{self.port}", "4096"]
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        if not wait_for_banner(self.host, self.port, timeout, alive=lambda: self.proc.poll() is None):
            self.stop()
            raise RuntimeError(f"smtp-sink did not start on {self.host}:{self.port}: {self.tail()}")
        # The banner probe itself is one session with no message; counts below are of messages only.

    def count(self) -> int:
        """Messages received so far."""
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - 256))
                chunk = f.read()
        except OSError:
            return 0
        found = _RECORD.findall(chunk)
        return int(found[-1]) if found else 0

    def wait_for(self, n: int, timeout: float, poll: float = 0.005, idle_limit: float | None = None) -> bool:
        """Wait until n messages have arrived; False on timeout, or when the count stops moving for
        ``idle_limit`` seconds (so a stuck target doesn't hold the whole bench for the full timeout)."""
        deadline = time.monotonic() + timeout
        last, last_change = -1, time.monotonic()
        while True:
            c = self.count()
            now = time.monotonic()
            if c >= n:
                return True
            if c != last:
                last, last_change = c, now
            if now >= deadline:
                return False
            if idle_limit is not None and now - last_change > idle_limit:
                return False
            time.sleep(poll)

    def cpu_seconds(self) -> float:
        return procstat.cpu_seconds([self.proc.pid]) if self.proc and self.proc.poll() is None else 0.0

    def tail(self) -> str:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 300))
                return f.read().decode("latin-1").replace("\r", "\n").strip().splitlines()[-1:][0]
        except (OSError, IndexError):
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_out", None) is not None:
            self._out.close()
            self._out = None
