"""Runs the gateway the way administrators do -- ``twistd -n smtpgw -c FILE`` -- for end-to-end tests.

The test writes a YAML configuration, starts the real daemon in its own process, waits until its
listener answers, talks SMTP to it over loopback, and can stop it politely or with kill -9.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.02) -> bool:
    """Poll a condition until it holds or the time runs out (an await, not a sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def twistd_path() -> str:
    """The ``twistd`` installed beside this Python (the one users run)."""
    beside = Path(sys.executable).with_name("twistd")
    return str(beside) if beside.exists() else (shutil.which("twistd") or "twistd")


def base_config(tmp: Path, listen: str = "127.0.0.1:2525", **over: Any) -> dict:
    """A minimal valid configuration rooted in ``tmp``; callers adjust the dict before starting."""
    cfg = {
        "gateway": {
            "hostname": "gw.example.test",
            "spool": str(tmp / "spool"),
            "postmaster": "postmaster@example.test",
            "local_domains": {"example.test": {"maildir": str(tmp / "mail")}},
            "dns": {"nameservers": []},
            "queue": {"retry": ["1s", "1s", "1s", "2s"], "delay_notification": "12h", "expire": "2d",
                      "max_hops": 30},
        },
        "virtual_servers": [{
            "name": "Default SMTP Virtual Server",
            "listen": [listen],
            "limits": {"max_message_size": "1MB", "max_recipients": 100, "max_connections": 100,
                       "timeout": "30s"},
            "relay": {"allow": [], "allow_authenticated": True},
        }],
        "connectors": [{
            "name": "Internet SMTP connector",
            "address_spaces": [{"domain": "*", "cost": 1}],
            "smart_hosts": [],
            "bridgeheads": ["Default SMTP Virtual Server"],
        }],
        "plugins": {"enabled": ["relay_acl", "smart_host", "diag_logging"], "local": [],
                    # enough in twistd.log to follow a message when an end-to-end test fails
                    "diag_logging": {"levels": {"queuing_engine": "medium", "routing_engine": "medium"}}},
    }
    cfg.update(over)
    return cfg


class GatewayProcess:
    def __init__(self, tmp: Path, config: dict) -> None:
        self.tmp = tmp
        self.config = config
        self.config_path = tmp / "gateway.yaml"
        self.log_path = tmp / "twistd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        first = self.config["virtual_servers"][0]["listen"][0]
        host, _, port = str(first).rpartition(":")
        return host, int(port)

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def command(self) -> list[str]:
        return [twistd_path(), "-n", "--pidfile=", f"--logfile={self.log_path}",
                "smtpgw", "-c", str(self.config_path)]

    def env(self) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        return env

    def start(self, wait: bool = True) -> "GatewayProcess":
        self.write_config()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.tmp), env=self.env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        if wait:
            host, port = self.address
            ok = wait_until(lambda: port_open(host, port) or self.proc.poll() is not None, 30)
            if not ok or self.proc.poll() is not None:
                raise RuntimeError(f"gateway did not start:\n{self.output()}")
        return self

    def output(self) -> str:
        text = ""
        if self.proc is not None and self.proc.poll() is not None and self.proc.stdout:
            text += self.proc.stdout.read().decode(errors="replace")
        if self.log_path.exists():
            text += self.log_path.read_text(errors="replace")
        return text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """The gateway and every process below it (spool writer, workers), from /proc."""
        if self.proc is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rpartition(")")[2].split()[1])
                children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def cpu_seconds(self) -> float:
        """User + system CPU time used so far by the gateway's process tree (live processes)."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])          # utime, stime
        return total / tick

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def maildir_messages(root: Path, mailbox: str) -> list[bytes]:
    new = root / mailbox / "new"
    if not new.is_dir():
        return []
    return [p.read_bytes() for p in sorted(new.iterdir())]
