"""Shared fixtures: the gateway as a real twistd process, real SMTP peers, a real DNS server."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gwprocess import GatewayProcess, base_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _plugins_registered() -> None:
    """Plugins are found through the installed metadata's entry points, which list what setup.cfg
    held when ``pip install -e .`` last ran (``bash tests/run`` runs it). A plugin added since would be
    "unknown" to the gateway under test; then this checkout's metadata is written beside it (the
    ignored ``smtpgw.egg-info``, found first on PYTHONPATH), as ``pip install -e`` would."""
    import configparser
    import importlib
    import subprocess
    from importlib.metadata import entry_points

    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    declared = {line.split("=")[0].strip() for line in
                parser.get("options.entry_points", "smtpgw.plugins", fallback="").splitlines() if "=" in line}
    if declared <= {ep.name for ep in entry_points(group="smtpgw.plugins")}:
        return
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info"],
                   cwd=REPO, check=True, capture_output=True)
    importlib.invalidate_caches()


_plugins_registered()


@pytest.fixture
def gateway(tmp_path):
    """Factory: ``gateway(config_dict)`` starts ``twistd -n smtpgw`` on it; all are stopped after the test."""
    started: list[GatewayProcess] = []

    def start(config: dict | None = None, wait: bool = True) -> GatewayProcess:
        gw = GatewayProcess(tmp_path, config or base_config(tmp_path))
        started.append(gw)
        return gw.start(wait=wait)

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def peers():
    """Factory: ``peers(host, port=25, **kw)`` starts a recording SMTP peer; all stopped after the test."""
    from peers import SMTPPeer

    started = []

    def start(host: str, port: int = 25, **kw):
        p = SMTPPeer(host=host, port=port, **kw).start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def dns_server():
    """A dnsmasq on loopback serving the records a test adds (call ``.restart()`` after adding)."""
    from dnsfixture import DNSServer

    server = DNSServer(listen="127.0.0.54")
    yield server
    server.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """``request.node.rep_call``: whether the test body failed (the browser fixture's screenshot)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture
def redis_server(tmp_path):
    """A private redis-server on 127.0.0.180:6390 for the cluster tests (tests/redisfixture.py)."""
    from redisfixture import RedisServer

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()

