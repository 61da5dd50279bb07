"""Issue 13 item 7, against the running gateway: untrusted text reaches the administrator's terminal
escaped (``smtpgw queue list/show``: headers, a next hop's error text), the control socket answers
any malformed request with ``ok: false`` and logs no traceback, and log files and folders get their
modes whatever the umask. Addresses: 127.0.0.210-212."""
from __future__ import annotations

import json
import os
import smtplib
import socket
import stat
import subprocess
from pathlib import Path

from gwprocess import base_config, maildir_messages, wait_until
from test_cli_queue import InProcess, smtpgw_command

GW = "127.0.0.210"
SMART_HOST = "127.0.0.211"
HOSTILE = "\x1b]0;pwned\x07\x1b[2J"


def test_queue_list_and_show_escape_control_characters(gateway, peers, tmp_path, capsys):
    """F10: escape sequences in a Subject and in a next hop's error text come out as \\x1b."""
    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", f"451 4.3.0 busy{HOSTILE}")
    cfg = base_config(tmp_path, listen=f"{GW}:25")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["gateway"]["queue"]["retry"] = ["1h"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]"]
    gw = gateway(cfg)
    with smtplib.SMTP(GW, 25, timeout=30) as s:
        s.sendmail("a@example.test", ["b@remote.test"],
                   f"Subject: hi{HOSTILE}\u202egnp.exe\r\n\r\nbody\r\n".encode())
    cli = InProcess(gw, capsys)
    assert wait_until(lambda: any(e["last_error"] for e in cli.json("list")["entries"]), 30)
    [entry] = cli.json("list")["entries"]
    for args in (["list"], ["show", entry["id"]]):
        out = cli(*args).stdout
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, out
        assert "\\x1b]0;pwned\\x07" in out, out
    shown = cli("show", entry["id"]).stdout
    assert "Subject: hi\\x1b]0;pwned\\x07\\x1b[2J\\u202egnp.exe" in shown
    # the console script as an administrator runs it, into a pipe
    r = subprocess.run([*smtpgw_command(), "queue", "-c", str(gw.config_path), "show", entry["id"]],
                       env=gw.env(), cwd=str(gw.tmp), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "\x1b" not in r.stdout and "\\x1b[2J" in r.stdout, r


def control_answers(path: Path, lines: list[bytes]) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(b"".join(line + b"\n" for line in lines))
        f = s.makefile("rb")
        return [json.loads(f.readline()) for _ in lines]


def test_control_socket_answers_malformed_input_without_a_traceback(gateway, tmp_path):
    """F11: deeply nested JSON used to raise RecursionError out of the protocol."""
    gw = gateway(base_config(tmp_path, listen=f"{GW}:25"))
    bad = [b"[" * 60000, b"{" * 30000, b'{"a":' * 10000, b'{"op": 5}', b"[]", b'"op"', b"null",
           b'{"op": "show", "id": {"a": [1]}}', b'{"op": "delete", "ids": [[1], {}]}', b'{"op": "delete"}',
           b'{"op": "retry", "all": true, "ids": 7}', b'{"op": "hold", "domain": 5}', b'{"op": "cat", "id": 1e999}',
           b"\xff\xfe", b'{"op": "__init__"}', b'{"op": "list", "x": ' + b"[" * 900 + b"]" * 900 + b"}"]
    sock = tmp_path / "spool" / "control.sock"
    assert wait_until(sock.exists)
    answers = control_answers(sock, bad + [b'{"op": "ping"}'])
    for line, answer in zip(bad[:-1], answers):
        assert answer["ok"] is False and answer["error"], (line[:40], answer)
    assert answers[-1]["ok"] is True
    assert "Traceback" not in gw.log()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_log_files_and_folders_get_their_modes_whatever_the_umask(gateway, tmp_path):
    """F12: under umask 000 the protocol and diagnostic logs used to be 0666 and their folders and
    the mail root 0777."""
    cfg = base_config(tmp_path, listen=f"{GW}:25")
    cfg["gateway"]["local_domains"]["example.test"]["maildir"] = str(tmp_path / "var" / "mail")
    cfg["virtual_servers"][0]["protocol_log"] = {"enabled": True, "directory": str(tmp_path / "logs" / "smtp"),
                                                 "period": "unlimited"}
    cfg["plugins"]["diag_logging"] = {"levels": {"smtp_protocol": "medium"}, "target": "file",
                                      "path": str(tmp_path / "diag" / "smtpgw-diag.log")}
    old = os.umask(0)
    try:
        gw = gateway(cfg)
    finally:
        os.umask(old)
    with smtplib.SMTP(GW, 25, timeout=30) as s:
        s.sendmail("a@remote.test", ["bob@example.test"], "Subject: modes\r\n\r\nhi\r\n")
    assert wait_until(lambda: maildir_messages(tmp_path / "var" / "mail", "bob"))
    plog = tmp_path / "logs" / "smtp" / "SMTPSVC1" / "extend1.log"
    diag = tmp_path / "diag" / "smtpgw-diag.log"
    assert wait_until(lambda: plog.exists() and diag.exists())
    for log in (plog, diag, gw.log_path):
        assert mode(log) == 0o640, (log, oct(mode(log)))
    for folder in (tmp_path / "logs", tmp_path / "logs" / "smtp", plog.parent, diag.parent,
                   tmp_path / "var", tmp_path / "var" / "mail"):
        assert mode(folder) == 0o750, (folder, oct(mode(folder)))
    mailbox = tmp_path / "var" / "mail" / "bob"
    assert mode(mailbox) & ~0o750 == 0 and mode(next((mailbox / "new").iterdir())) & 0o007 == 0
