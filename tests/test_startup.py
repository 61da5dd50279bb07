"""Start-up failures as an administrator meets them: ``twistd -n smtpgw`` on a file with something
wrong, or beside something that holds what it needs. Each ends with one line naming the key (or the
address) and the cause, a non-zero status, no traceback and no usage text, and nothing started: no
listener, no log file, no control socket. One gateway per spool; the shipped examples run together.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from gwprocess import REPO, GatewayProcess, base_config, port_open, wait_until
from test_cli_queue import smtpgw_command

HOST = "127.0.0.124"


def config(tmp_path: Path, port: int = 2525, **gateway) -> dict:
    cfg = base_config(tmp_path, listen=f"{HOST}:{port}")
    cfg["gateway"].update(gateway)
    return cfg


def start(tmp_path: Path, cfg: dict, wrap: tuple[str, ...] = (), name: str = "gateway.yaml"
          ) -> subprocess.CompletedProcess:
    """Run ``twistd -n smtpgw`` on ``cfg`` until it exits (it must), stdout and stderr apart."""
    gw = GatewayProcess(tmp_path, cfg)
    gw.config_path = tmp_path / name
    gw.write_config()
    return subprocess.run([*wrap, *gw.command()], cwd=tmp_path, env=gw.env(), capture_output=True, text=True,
                          timeout=60)


def assert_one_line(done: subprocess.CompletedProcess, status: int, *expected: str) -> str:
    assert done.returncode == status, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "", done.stdout
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def assert_nothing_started(tmp_path: Path, cfg: dict) -> None:
    host, _, port = cfg["virtual_servers"][0]["listen"][0].rpartition(":")
    assert not port_open(host, int(port))
    assert not (tmp_path / "twistd.log").exists(), (tmp_path / "twistd.log").read_text()
    assert not (Path(cfg["gateway"]["spool"]) / "control.sock").exists()


def check_config(tmp_path: Path, wrap: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*wrap, *smtpgw_command(), "check-config", "-c", str(tmp_path / "gateway.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)


def read_only(path: Path) -> tuple[str, ...]:
    """Run the command with a read-only file system mounted on ``path`` (its own mount namespace):
    the one way a spool is unwritable for root."""
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root")
    path.mkdir(parents=True, exist_ok=True)
    return ("unshare", "-m", "sh", "-c", 'mount -t tmpfs -o ro smtpgw-ro "$0" && exec "$@"', str(path))


# -- configuration and files ---------------------------------------------------------------------

def test_a_config_error_is_one_line_without_twistds_usage_text(tmp_path):
    cfg = config(tmp_path)
    cfg["virtual_servers"][0]["limits"]["max_recipients"] = "lots"
    done = start(tmp_path, cfg)
    line = assert_one_line(done, 2, "virtual_servers[0].limits.max_recipients: expected an integer, got 'lots'")
    assert line.startswith(str(tmp_path / "gateway.yaml") + ": ")
    assert "Usage" not in done.stderr and "Traceback" not in done.stderr
    assert_nothing_started(tmp_path, cfg)


def test_an_unreadable_certificate_is_named(tmp_path):
    cfg = config(tmp_path)
    (tmp_path / "cert.pem").mkdir()                   # a folder where the file should be
    cfg["virtual_servers"][0]["tls"] = {"certificate": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}
    assert_one_line(start(tmp_path, cfg), 2, "virtual_servers[0].tls.certificate: ")
    assert_nothing_started(tmp_path, cfg)
    checked = check_config(tmp_path)
    assert checked.returncode == 2 and "virtual_servers[0].tls.certificate: " in checked.stderr


def test_an_unreadable_users_file_is_named(tmp_path):
    cfg = config(tmp_path)
    (tmp_path / "users").mkdir()
    cfg["virtual_servers"][0]["auth"] = {"users": str(tmp_path / "users")}
    assert_one_line(start(tmp_path, cfg), 2, "virtual_servers[0].auth.users: ")
    assert_nothing_started(tmp_path, cfg)
    checked = check_config(tmp_path)
    assert checked.returncode == 2 and "virtual_servers[0].auth.users: " in checked.stderr


def test_a_spool_that_is_not_a_directory(tmp_path):
    spool = tmp_path / "spool"
    spool.write_text("not a folder\n")
    cfg = config(tmp_path)
    assert_one_line(start(tmp_path, cfg), 2, f"gateway.spool: {spool} is not a directory")
    assert spool.read_text() == "not a folder\n"
    checked = check_config(tmp_path)
    assert checked.returncode == 2 and checked.stderr.strip().endswith(f"gateway.spool: {spool} is not a directory")


def test_a_missing_spool_is_made_and_one_that_cannot_be_is_named(tmp_path):
    cfg = config(tmp_path, spool=str(tmp_path / "var" / "spool"))
    GatewayProcess(tmp_path, cfg).write_config()
    assert check_config(tmp_path).returncode == 0                 # it will be created
    (tmp_path / "var").write_text("a file\n")
    checked = check_config(tmp_path)
    assert checked.returncode == 2
    assert f"gateway.spool: {tmp_path}/var/spool cannot be created: {tmp_path}/var is not a directory" in checked.stderr
    assert_one_line(start(tmp_path, cfg), 2, f"gateway.spool: {tmp_path}/var/spool cannot be created")
    assert_nothing_started(tmp_path, cfg)


def test_an_unwritable_spool(tmp_path):
    spool = tmp_path / "spool"
    cfg = config(tmp_path)
    wrap = read_only(spool)
    assert_one_line(start(tmp_path, cfg, wrap), 2, f"gateway.spool: {spool} is not writable (read-only file system)")
    assert_nothing_started(tmp_path, cfg)
    checked = check_config(tmp_path, wrap)
    assert checked.returncode == 2
    assert f"gateway.spool: {spool} is not writable (read-only file system)" in checked.stderr
    missing = config(tmp_path, spool=str(spool / "inner"))          # cannot be created either
    assert_one_line(start(tmp_path, missing, wrap), 2, f"gateway.spool: {spool}/inner does not exist and cannot be created")
    checked = check_config(tmp_path, wrap)
    assert checked.returncode == 2 and f"{spool}/inner does not exist and cannot be created" in checked.stderr


def test_a_spool_the_service_user_cannot_write(tmp_path):
    """twistd -u: root could write the spool, the user the gateway runs as cannot; found before
    anything listens (binding happens as root, the spool is checked as that user)."""
    if os.geteuid() != 0:
        pytest.skip("changing user needs root")
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="smtpgw-startup-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        (work / "spool").mkdir(mode=0o700)                       # root's
        cfg = config(work)
        gw = GatewayProcess(work, cfg)
        gw.write_config()
        command = gw.command()
        command[command.index("smtpgw"):command.index("smtpgw")] = [f"--uid={nobody.pw_uid}",
                                                                     f"--gid={nobody.pw_gid}"]
        done = subprocess.run(command, cwd=work, env=gw.env(), capture_output=True, text=True, timeout=60)
        assert_one_line(done, 2, f"gateway.spool: {work}/spool/tmp: Permission denied")
        assert_nothing_started(work, cfg)
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


# -- what is taken: addresses, the spool ---------------------------------------------------------

def _hold(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(1)
    return sock


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_is_named_at_once(tmp_path, workers):
    cfg = config(tmp_path, workers=workers)
    cfg["virtual_servers"][0]["listen"] = [f"{HOST}:2526", f"{HOST}:2525"]
    with _hold((HOST, 2525)):
        began = time.monotonic()
        done = start(tmp_path, cfg)
        took = time.monotonic() - began
        assert_one_line(done, 1, f"virtual_servers[0].listen[1]: cannot listen on {HOST}:2525: address already in use")
        assert not port_open(HOST, 2526)
    assert took < 8, f"{took:.1f}s: it waited for the address"    # no 10 s wait for a stranger's socket
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "twistd.log").exists()


def test_a_metrics_port_in_use_is_named(tmp_path):
    cfg = config(tmp_path, metrics={"enabled": True, "listen": f"{HOST}:9125"})
    with _hold((HOST, 9125)):
        assert_one_line(start(tmp_path, cfg), 1, f"gateway.metrics.listen: cannot listen on {HOST}:9125")
    assert_nothing_started(tmp_path, cfg)


def test_a_second_gateway_on_the_same_spool_is_refused(gateway, tmp_path):
    first = gateway(config(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    cfg = config(other, port=2526, spool=str(tmp_path / "spool"))
    done = start(other, cfg)
    assert_one_line(done, 1, f"gateway.spool: {tmp_path / 'spool'} is in use by another gateway "
                             f"(pid {first.proc.pid})")
    assert not port_open(HOST, 2526) and not (other / "twistd.log").exists()
    assert port_open(HOST, 2525) and first.proc.poll() is None
    first.stop()
    assert first.proc.returncode in (0, -15)        # twistd ends by the signal it was stopped with
    assert start(other, cfg, wrap=("timeout", "-s", "TERM", "3")).returncode == 124, "now it may run"


def test_a_second_gateway_is_refused_by_a_gateway_with_workers(gateway, tmp_path):
    first = gateway(config(tmp_path, workers=2))
    assert wait_until(lambda: "worker 1 started" in first.log(), 30)
    other = tmp_path / "other"
    other.mkdir()
    done = start(other, config(other, port=2526, spool=str(tmp_path / "spool"), workers=2))
    assert_one_line(done, 1, f"is in use by another gateway (pid {first.proc.pid})")


def test_the_shipped_examples_run_together(tmp_path):
    """etc/gateway.yaml and etc/submission.yaml side by side in one directory (their addresses
    moved to this module's): separate spools, so both start."""
    from test_tls_e2e import submission_site

    submission_site(tmp_path)
    main = yaml.safe_load((REPO / "etc" / "gateway.yaml").read_text())
    main["virtual_servers"][0]["listen"] = [f"{HOST}:2525"]
    submission = yaml.safe_load((REPO / "etc" / "submission.yaml").read_text())
    submission["virtual_servers"][0]["listen"] = [f"{HOST}:587", {"address": f"{HOST}:465", "tls": True}]
    assert main["gateway"]["spool"] != submission["gateway"]["spool"]
    running = []
    try:
        for name, cfg in (("gateway.yaml", main), ("submission.yaml", submission)):
            gw = GatewayProcess(tmp_path, cfg)
            gw.config_path, gw.log_path = tmp_path / name, tmp_path / f"{name}.log"
            running.append(gw.start())
        assert all(gw.proc.poll() is None for gw in running)
        assert port_open(HOST, 2525) and port_open(HOST, 587) and port_open(HOST, 465)
        assert (tmp_path / "var" / "spool" / "gateway.lock").exists()
        assert (tmp_path / "var" / "spool-submission" / "gateway.lock").exists()
    finally:
        for gw in running:
            gw.stop()
