"""The files for running smtpgw on a real host: the systemd unit and the logrotate example.

The unit is checked by systemd itself (``systemd-analyze verify``), and its ExecStart is run as
written -- with the paths of this machine's programs, a test configuration and the ``nobody`` user in
place of ``smtpgw`` -- to show what it promises: twistd binds port 25 as root, then runs as the
unprivileged user, answers SMTP, reloads on the ExecReload signal and stops cleanly.
"""
from __future__ import annotations

import configparser
import os
import pwd
import shlex
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from gwprocess import REPO, base_config, port_open, wait_until

UNIT = REPO / "etc" / "systemd" / "smtpgw.service"
LOGROTATE = REPO / "etc" / "logrotate.d" / "smtpgw"
HOST = "127.0.0.37"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(UNIT)
    return parser


def here(command: str) -> list[str]:
    """A unit command line with /usr/local/bin/X replaced by where X is installed on this machine."""
    argv = shlex.split(command)
    found = Path(sys.executable).with_name(Path(argv[0]).name)
    argv[0] = str(found) if found.exists() else (shutil.which(Path(argv[0]).name) or argv[0])
    return argv


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed here")
    text = UNIT.read_text()
    for name in ("twistd", "smtpgw"):
        text = text.replace(f"/usr/local/bin/{name}", here(f"/usr/local/bin/{name}")[0])
    (tmp_path / "smtpgw.service").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "smtpgw.service")],
                       capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines() if "smtpgw.service" in line]
    assert r.returncode == 0 and problems == [], r.stdout + r.stderr


def test_unit_says_what_a_service_needs():
    service = unit()["Service"]
    assert "--nodaemon" in service["ExecStart"] and "--uid=smtpgw" in service["ExecStart"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert "check-config" in service["ExecStartPre"]
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


def test_execstart_as_written_binds_port_25_then_runs_as_the_unprivileged_user():
    if os.geteuid() != 0:
        pytest.skip("binding port 25 and changing user need root")
    work = Path(tempfile.mkdtemp(prefix="smtpgw-unit-", dir="/tmp"))
    os.chmod(work, 0o755)
    nobody = pwd.getpwnam("nobody")
    try:
        cfg = base_config(work, listen=f"{HOST}:25")
        (work / "spool").mkdir()
        os.chown(work / "spool", nobody.pw_uid, nobody.pw_gid)
        config = work / "gateway.yaml"
        config.write_text(yaml.safe_dump(cfg))
        service = unit()["Service"]
        argv = here(service["ExecStart"].replace("/etc/smtpgw/gateway.yaml", str(config))
                    .replace("--uid=smtpgw", "--uid=nobody").replace("--gid=smtpgw", "--gid=nogroup"))
        check = subprocess.run(here(service["ExecStartPre"].replace("/etc/smtpgw/gateway.yaml", str(config))),
                               capture_output=True, text=True, timeout=60,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        assert check.returncode == 0, check.stderr
        proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert wait_until(lambda: port_open(HOST, 25) or proc.poll() is not None, 30)
            assert proc.poll() is None

            def uids() -> list[str]:                                        # real, effective, saved, fs
                status = Path(f"/proc/{proc.pid}/status").read_text()
                return next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]

            # the port is bound first, as root (while twistd builds the service); then it drops root
            assert wait_until(lambda: uids() == [str(nobody.pw_uid)] * 4, 30), uids()
            with smtplib.SMTP(HOST, 25, timeout=10) as s:
                assert s.ehlo()[0] == 250
            proc.send_signal(signal.SIGHUP)                                   # ExecReload
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=30)
            # twistd ends by SIGTERM's default action once it has shut down: systemd counts that clean
            assert proc.returncode in (0, -signal.SIGTERM), out.decode(errors="replace")
            assert b"Server Shut Down." in out
            assert b"SIGHUP" in out and b"Traceback" not in out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_logrotate_example_parses(tmp_path):
    if shutil.which("logrotate") is None:
        pytest.skip("logrotate is not installed here")
    text = LOGROTATE.read_text().replace("/var/log/smtpgw", str(tmp_path)).replace("su smtpgw smtpgw", "su root root")
    (tmp_path / "diag.log").write_text("a line\n" * 10)
    conf = tmp_path / "smtpgw.conf"
    conf.write_text(text)
    os.chmod(conf, 0o644)
    r = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "diag.log").read_text() == ""                         # copytruncate
    assert (tmp_path / "diag.log.1").read_text() == "a line\n" * 10
