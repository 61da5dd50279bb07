"""Postfix's smtp-sink as the smart host, with a live count of the messages it has received.

smtp-sink ``-c`` writes ``sess=N quit=N mesg=N`` followed by a carriage return every time a session
ends or a final "." arrives. Its output goes to a file (never a pipe, which could fill up and stall
the sink); the count is the last complete record of that file.

With ``dump``, every message is also kept as a file (``smtp-sink -d``) in a folder on tmpfs, so that
after a run :meth:`check_ids` can tell whether each message arrived exactly once: ``smtp-source``
gives every message its own ``Message-Id``, so N files with N distinct ids means nothing was lost and
nothing was delivered twice (a count alone cannot tell a duplicate from a message still missing).
The files go to memory, not the disk the targets fsync to, and cost the sink the same for every
target.
"""
from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time

import procstat
from util import wait_for_banner

_RECORD = re.compile(rb"mesg=(\d+)\r")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(\S+)", re.I | re.M)


class Sink:
    def __init__(self, host: str, port: int, workdir: str, max_concurrency: int = 1000,
                 dump: bool = False) -> None:
        self.host, self.port = host, port
        self.path = os.path.join(workdir, f"sink-{time.monotonic_ns()}.out")
        self.max_concurrency = max_concurrency
        self.proc: subprocess.Popen | None = None
        self.dump_dir: str | None = None
        if dump:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            self.dump_dir = tempfile.mkdtemp(prefix="smtpgw-bench-sink-", dir=shm)
            os.chown(self.dump_dir, pwd.getpwnam("postfix").pw_uid, -1)    # smtp-sink -u postfix writes

    def start(self, timeout: float = 10.0) -> None:
        self._out = open(self.path, "wb")
        dump = ["-d", os.path.join(self.dump_dir, "%H%M%S.")] if self.dump_dir else []
        argv = ["smtp-sink", "-c", "-u", "postfix", "-m", str(self.max_concurrency), *dump,
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

    def settled_count(self, quiet: float = 1.0, limit: float = 10.0) -> int:
        """The count once it has not moved for ``quiet`` seconds (at most ``limit``): a message
        delivered twice may come after the Nth has arrived."""
        deadline = time.monotonic() + limit
        last, since = self.count(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            c = self.count()
            if c != last:
                last, since = c, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def check_ids(self, expected: int) -> dict:
        """Exactly once? ``files`` received, ``distinct`` Message-Ids among them, ``duplicates``
        (files beyond the first with the same id), ``without_id``, and ``ok`` when each of the
        ``expected`` messages came once."""
        if self.dump_dir is None:
            return {}
        seen: dict[bytes, int] = {}
        files = without = 0
        for name in os.listdir(self.dump_dir):
            files += 1
            try:
                with open(os.path.join(self.dump_dir, name), "rb") as f:
                    head = f.read(4096)
            except OSError:
                without += 1
                continue
            m = _MESSAGE_ID.search(head.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0])
            if m is None:
                without += 1
            else:
                seen[m.group(1)] = seen.get(m.group(1), 0) + 1
        duplicates = sum(n - 1 for n in seen.values())
        return {"files": files, "distinct": len(seen), "duplicates": duplicates, "without_id": without,
                "ok": files == expected and len(seen) == expected and not duplicates and not without}

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
        if self.dump_dir is not None:
            shutil.rmtree(self.dump_dir, ignore_errors=True)
            self.dump_dir = None
