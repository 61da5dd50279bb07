"""A spool writer that cannot start (mta/spool/link.py): ``twistd smtpgw`` says so in one line naming
``gateway.spool``, the cause and what to do, at start-up (on its terminal and in its log; it still starts,
and tries the writer again for each message, so fixing the cause needs no restart), and each message is
answered ``451 4.3.0`` with one line in the log saying why, never a traceback.

The writer is the gateway's own Python running ``-m mta.spool.writer`` as the gateway's user. Two real
ways to break it: ``--uid nobody`` where that user cannot run the interpreter (here it lives under
/root, mode 0700), and a writer process that dies as it starts -- made by a ``sitecustomize`` module on
the gateway's PYTHONPATH that raises in the writer's interpreter only (the gateway's own is untouched).
Gateway on 127.0.0.170:2525."""
from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from gwprocess import GatewayProcess, base_config, wait_until

GW_HOST, GW_PORT = "127.0.0.170", 2525
CAUSE = "RuntimeError: the writer's interpreter is broken for this test"


def broken_writer(tmp_path: Path, also_check: bool) -> Path:
    """A folder whose sitecustomize makes the writer's interpreter die as it starts, with a traceback
    ending in :data:`CAUSE` (as a failing import would), at start-up's ``--check`` too when
    ``also_check``; it reads the process's own command line, so the gateway's interpreter goes on."""
    folder = tmp_path / "broken-writer"
    folder.mkdir()
    check = "" if also_check else ' and b"--check" not in argv'
    (folder / "sitecustomize.py").write_text(
        "import os, traceback\n"
        'with open("/proc/self/cmdline", "rb") as f:\n'
        '    argv = f.read().split(b"\\0")\n'
        f'if b"mta.spool.writer" in argv{check}:\n'
        "    try:\n"
        f'        raise RuntimeError("{CAUSE.split(": ", 1)[1]}")\n'
        "    except RuntimeError:\n"
        "        traceback.print_exc()\n"
        "    os._exit(1)\n")
    return folder


def gateway_with(tmp_path: Path, site: Path | None, extra: list[str] = (), spool: Path | None = None) -> GatewayProcess:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    if spool is not None:
        cfg["gateway"]["spool"] = str(spool)
    gw = GatewayProcess(tmp_path, cfg)
    env = gw.env()
    if site is not None:
        env["PYTHONPATH"] = f"{site}{os.pathsep}{env['PYTHONPATH']}"
    gw.env = lambda: env
    command = gw.command()
    gw.command = lambda: command[:-3] + list(extra) + command[-3:]       # twistd options before "smtpgw"
    return gw


def first_line(gw: GatewayProcess, timeout: float = 30) -> str:
    """What the gateway wrote on its terminal (stdout and stderr) before its log took over."""
    import select

    ready, _, _ = select.select([gw.proc.stdout], [], [], timeout)
    return gw.proc.stdout.readline().decode(errors="replace").rstrip("\n") if ready else ""


def refused_451(host: str = GW_HOST) -> None:
    with smtplib.SMTP(host, GW_PORT, timeout=30) as s:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("a@sender.test", ["b@example.test"], "Subject: x\r\n\r\nHello.\r\n")
    assert refused.value.smtp_code == 451 and refused.value.smtp_error.startswith(b"4.3.0 ")


def one_line_each(log: str, text: str) -> list[str]:
    assert "Traceback" not in log and "Failure:" not in log, log
    return [line for line in log.splitlines() if text in line]


def test_start_up_says_in_one_line_that_the_writer_cannot_start_and_mail_gets_451(tmp_path):
    gw = gateway_with(tmp_path, broken_writer(tmp_path, also_check=True)).start()
    try:
        said = first_line(gw)
        assert said.startswith(f"{gw.config_path}: gateway.spool: the spool writer cannot start: it ended at once "
                               f"(exit status 1): {CAUSE}; the gateway runs as "), said
        assert f"must be able to run {sys.executable}" in said and said.endswith("every message is answered 451 4.3.0")
        assert wait_until(lambda: said in gw.log(), 10), gw.log()       # and in the log, once
        refused_451()
        assert wait_until(lambda: "queueing" in gw.log(), 10)
        lines = one_line_each(gw.log(), CAUSE)
        assert len(lines) == 2 and "failed: the spool writer cannot start: it ended at once" in lines[1], lines
    finally:
        gw.stop()


def test_a_writer_that_stops_starting_later_gets_451_and_one_line(tmp_path):
    gw = gateway_with(tmp_path, broken_writer(tmp_path, also_check=False)).start()
    try:
        refused_451()
        assert wait_until(lambda: "queueing" in gw.log() and CAUSE in gw.log(), 10), gw.log()
        [line] = one_line_each(gw.log(), CAUSE)
        assert ("failed: the spool writer cannot start: it ended at once (exit status 1): "
                f"{CAUSE}; the gateway runs as") in line, line
    finally:
        gw.stop()
    assert "the spool writer cannot start" not in gw.output().split("\n", 1)[0]     # nothing at start-up


def nobody_can_run_python() -> bool:
    try:
        return subprocess.run([sys.executable, "-c", "pass"], user="nobody", capture_output=True,
                              timeout=60).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="--uid needs root")
def test_uid_nobody_who_cannot_run_the_interpreter_is_named_at_start_up(tmp_path):
    if nobody_can_run_python():
        pytest.skip(f"nobody can run {sys.executable} on this machine: nothing to refuse")
    import pwd

    nobody = pwd.getpwnam("nobody")
    home = Path(tempfile.mkdtemp(prefix="smtpgw-nobody-"))     # the test's own folder is root's alone
    gw = None
    try:
        home.chmod(0o755)
        spool = home / "spool"
        spool.mkdir()
        os.chown(spool, nobody.pw_uid, nobody.pw_gid)
        gw = gateway_with(home, None, ["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)], spool).start()
        said = first_line(gw)
        assert said.startswith(f"{gw.config_path}: gateway.spool: the spool writer cannot start: "), said
        assert "Permission denied" in said and "the gateway runs as nobody, who must be able to run" in said, said
        refused_451()
        assert wait_until(lambda: "queueing" in gw.log(), 10), gw.log()
        lines = one_line_each(gw.log(), "the spool writer cannot start")
        assert len(lines) == 2 and "Permission denied" in lines[1], lines
    finally:
        if gw is not None:
            gw.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_writer_runs_this_checkout_whatever_the_working_directory(tmp_path):
    """The writer command (``mta.spool.link.child_command``) run from a folder that holds another
    ``mta`` package: this checkout's writer answers (its ``--check`` of a real queue folder succeeds),
    the other one never runs (it would leave a marker file)."""
    from mta.spool.link import child_command

    other = tmp_path / "elsewhere"
    (other / "mta" / "spool").mkdir(parents=True)
    (other / "mta" / "__init__.py").write_text("")
    (other / "mta" / "spool" / "__init__.py").write_text("")
    marker = tmp_path / "wrong-writer-ran"
    (other / "mta" / "spool" / "writer.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise SystemExit(7)\n")
    queue_dir = tmp_path / "queue"
    queue_dir.mkdir()
    exe, args, env = child_command()
    done = subprocess.run([*args, "--check", str(queue_dir)], cwd=other, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert not marker.exists()
