"""A private ``redis-server`` on a loopback address for the cluster tests (Debian's package, installed by
tests/run): its own port and directory, no persistence, stopped (or killed) by the test."""
from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

from gwprocess import port_open, wait_until


class RedisServer:
    def __init__(self, folder: Path, host: str = "127.0.0.180", port: int = 6390) -> None:
        self.folder, self.host, self.port = folder, host, port
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen([binary, "--bind", self.host, "--port", str(self.port),
                                      "--dir", str(self.folder), "--save", "", "--appendonly", "no",
                                      "--logfile", str(self.folder / "redis.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not wait_until(lambda: port_open(self.host, self.port) or self.proc.poll() is not None, 15) \
                or self.proc.poll() is not None:
            raise RuntimeError(f"redis-server did not start: {(self.folder / 'redis.log').read_text()}")
        return self

    def kill(self) -> None:
        """kill -9: the cluster's Redis is gone at once."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-h", self.host, "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=10).stdout.strip()
