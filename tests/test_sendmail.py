"""``smtpgw sendmail`` and the ``sendmail`` program: local programs' mail, with the gateway up and down.

Each test runs the real command as a program would (message on stdin, exit status read), and looks
for the message where a user would: in the recipient's Maildir, or waiting in the spool's maildrop.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from gwprocess import REPO, GatewayProcess, base_config, maildir_messages, wait_until

MESSAGE = b"Subject: nightly report\nTo: bob@example.test\n\nall good\n.\nafter the dot\n"


def run_sendmail(args: list[str], stdin: bytes, env_config: Path | None = None,
                 program: str = "smtpgw") -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if env_config is not None:
        env["SMTPGW_CONFIG"] = str(env_config)
    if program == "sendmail":           # the program named sendmail: configuration from $SMTPGW_CONFIG
        cmd = [sys.executable, "-m", "mta.cli.sendmail", *args]
    else:
        cmd = [sys.executable, "-m", "mta.cli.main", "sendmail", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, env=env, timeout=60)


def delivered(tmp: Path, mailbox: str) -> list[bytes]:
    return maildir_messages(tmp / "mail", mailbox)


def test_running_gateway_delivers_at_once_and_adds_the_missing_headers(gateway, tmp_path):
    gw = gateway()
    r = run_sendmail(["-c", str(gw.config_path), "-f", "cron@example.test", "-F", "Cron Daemon",
                      "bob@example.test"], MESSAGE)
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"" and r.stderr == b""
    assert wait_until(lambda: delivered(tmp_path, "bob"), 15), gw.log()
    text = delivered(tmp_path, "bob")[0]
    assert b'From: "Cron Daemon" <cron@example.test>' in text
    assert b"\nDate: " in text and b"\nMessage-ID: <" in text
    assert b"Received: by gw.example.test (smtpgw sendmail, from userid" in text
    assert b"all good" in text and b"after the dot" not in text     # a lone "." ends the message
    assert os.listdir(tmp_path / "spool" / "maildrop") == []        # picked up and removed


def test_dash_i_keeps_the_lone_dot_and_dash_t_reads_recipients_and_drops_bcc(gateway, tmp_path):
    gw = gateway()
    message = b"To: bob@example.test\nCc: carol@example.test\nBcc: dave@example.test\nSubject: x\n\na\n.\nb\n"
    r = run_sendmail(["-c", str(gw.config_path), "-t", "-oi", "-f", "app@example.test"], message)
    assert r.returncode == 0, r.stderr
    for box in ("bob", "carol", "dave"):
        assert wait_until(lambda: delivered(tmp_path, box), 15), (box, gw.log())
    text = delivered(tmp_path, "dave")[0]
    assert b"Bcc:" not in text
    assert b"\na\n.\nb" in text.replace(b"\r\n", b"\n")


def test_gateway_down_the_message_waits_in_the_maildrop_and_goes_at_start(tmp_path):
    gw = GatewayProcess(tmp_path, base_config(tmp_path))
    gw.write_config()
    r = run_sendmail(["-f", "backup@example.test", "bob@example.test"], b"Subject: while down\n\nqueued\n",
                     env_config=gw.config_path, program="sendmail")
    assert r.returncode == 0, r.stderr
    waiting = [n for n in os.listdir(tmp_path / "spool" / "maildrop") if not n.startswith(".")]
    assert len(waiting) == 1
    assert oct(os.stat(tmp_path / "spool" / "maildrop").st_mode & 0o7777) == "0o1733"
    with gw:
        assert wait_until(lambda: delivered(tmp_path, "bob"), 20), gw.log()
    assert b"queued" in delivered(tmp_path, "bob")[0]
    assert os.listdir(tmp_path / "spool" / "maildrop") == []


def test_usage_and_temporary_failures_use_sysexits(tmp_path):
    cfg = base_config(tmp_path)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = run_sendmail(["-c", str(path)], b"Subject: nobody\n\nx\n")
    assert r.returncode == 64 and b"no recipients" in r.stderr
    r = run_sendmail(["-c", str(path), "not an address"], b"x\n")
    assert r.returncode == 64 and b"is not a mail address" in r.stderr
    (tmp_path / "file").write_text("a file where the spool should be")
    cfg["gateway"]["spool"] = str(tmp_path / "file" / "spool")
    path.write_text(yaml.safe_dump(cfg))
    r = run_sendmail(["-c", str(path), "bob@example.test"], b"x\n")
    assert r.returncode == 75 and b"nothing was sent, try again" in r.stderr
    r = run_sendmail(["-c", str(tmp_path / "missing.yaml"), "bob@example.test"], b"x\n")
    assert r.returncode == 78 and b"missing.yaml" in r.stderr


def test_an_unreadable_maildrop_file_is_set_aside_once(gateway, tmp_path):
    drop = tmp_path / "spool" / "maildrop"
    drop.mkdir(parents=True)
    (drop / "0001.bad").write_bytes(b"this is no maildrop file")
    gw = gateway()
    assert wait_until(lambda: (drop / "corrupt" / "0001.bad").exists(), 15), gw.log()
    assert gw.log().count("0001.bad: unreadable, moved to") == 1
