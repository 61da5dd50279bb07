"""A private Postfix on one loopback address, as an outside peer for interoperability tests.

The instance is the benchmark's (bench/postfix.py ``PostfixInstance``: its own config, queue and
data directories under a temporary folder, smtpd bound to one address in master.cf, no chroot, the
system's Postfix untouched), with the test's own main.cf settings applied through ``postconf -e``
on top. bench/postfix.py is imported on first use only, because bench/util.py installs the bench's
signal handlers and exit-time cleanups when imported; in a test run that means a killed pytest
still stops the instance.

The temporary folder is under /var/tmp, not pytest's ``tmp_path``: that lives under a 0700 directory the
``postfix`` user cannot traverse.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterator

from gwprocess import REPO

_QUEUE_ID = re.compile(r"^([0-9A-F]{6,})[*!]?\s", re.MULTILINE)


def _bench_postfix() -> Any:
    bench = str(REPO / "bench")
    if "postfix" not in sys.modules:
        sys.path.insert(0, bench)
        try:
            importlib.import_module("postfix")
        finally:
            sys.path.remove(bench)
    return sys.modules["postfix"]


@functools.cache
def _configured_class() -> type:
    """bench's PostfixInstance, whose main.cf also gets the test's ``settings`` (``postconf -e``)."""
    base = _bench_postfix().PostfixInstance

    class Configured(base):  # type: ignore[misc, valid-type]
        settings: dict[str, str] = {}

        def write_config(self) -> None:
            super().write_config()
            pairs = [f"{key}={value}" for key, value in self.settings.items()]
            r = subprocess.run(["postconf", "-c", self.config_dir, "-e", *pairs], capture_output=True,
                               text=True, timeout=30, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise RuntimeError(f"postconf -e failed: {r.stdout}{r.stderr}")
    return Configured


def postfix_available() -> bool:
    return shutil.which("postfix") is not None and shutil.which("postconf") is not None


class PostfixPeer:
    """One private Postfix: ``start()``, ``stop()``, and a look at its queue (``postqueue -p``)."""

    def __init__(self, host: str, port: int = 25, settings: dict[str, str] | None = None,
                 relay_host: str = "127.0.0.1", relay_port: int = 25) -> None:
        self.workdir = tempfile.mkdtemp(prefix="smtpgw-test-postfix-", dir="/var/tmp")
        self.settings = {"multi_instance_name": "postfix-smtpgw-test", **(settings or {})}
        self.instance = _configured_class()(self.workdir, host=host, port=port, relay_host=relay_host,
                                            relay_port=relay_port, process_limit=20)
        self.instance.settings = self.settings
        self.host, self.port = host, port
        self.config_dir = self.instance.config_dir

    def start(self) -> "PostfixPeer":
        self.instance.start()
        return self

    def stop(self) -> None:
        """Idempotent; also removes the instance's folder."""
        try:
            self.instance.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def postqueue(self) -> str:
        r = subprocess.run(["postqueue", "-c", self.config_dir, "-p"], capture_output=True, text=True,
                           timeout=30, stdin=subprocess.DEVNULL)
        return r.stdout + r.stderr

    def queue_ids(self) -> list[str]:
        """The queue IDs ``postqueue -p`` lists (any queue: active ``*``, hold ``!``, deferred)."""
        return _QUEUE_ID.findall(self.postqueue())

    def log(self) -> str:
        try:
            with open(self.instance.maillog, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


@contextlib.contextmanager
def private_postfix(host: str, port: int = 25, settings: dict[str, str] | None = None,
                    **kw: Any) -> Iterator[PostfixPeer]:
    """A started :class:`PostfixPeer`, stopped (and removed) however the block ends."""
    peer = PostfixPeer(host, port, settings, **kw)
    try:
        yield peer.start()
    finally:
        peer.stop()
