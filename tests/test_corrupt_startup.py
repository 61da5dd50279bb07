"""What a restart finds damaged in the spool is treated as a damaged message found at run time: one
log line naming the file and what is wrong, a 5.3.0 report to the sender and the postmaster when the
envelope can still be read, a corrupt row in ``smtpgw queue list``; and junk in any of the spool's
folders (empty files, binary noise, directories, FIFOs, links, strangers' names, a half-written
temporary file) is one line each, never a crash, a hang or a spinning queue."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import smtplib
import tempfile
import time
from pathlib import Path

import pytest

from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until
from test_cli_queue import entries, run

GW_HOST, GW_PORT = "127.0.0.124", 2525
SMART_HOST = "127.0.0.125"
IDLE = 5.0                      # seconds of watching the restarted gateway


def config(tmp_path):
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]"]
    cfg["gateway"]["queue"]["retry"] = ["1h"]
    return cfg


def send(to: str, subject: str) -> None:
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("alice@example.test", [to], f"Subject: {subject}\r\n\r\nHello.\r\n")


def log_lines(gw, text: str) -> list[str]:
    return [line for line in gw.log().splitlines() if text in line]


def assert_idle(gw) -> None:
    """Nothing spins: CPU and log stay flat over IDLE seconds."""
    cpu0, lines0, t0 = gw.cpu_seconds(), len(gw.log().splitlines()), time.monotonic()
    assert not wait_until(lambda: len(gw.log().splitlines()) > lines0 + 2, IDLE), gw.log().splitlines()[lines0:]
    assert time.monotonic() - t0 >= IDLE
    assert gw.cpu_seconds() - cpu0 < 0.5, f"{gw.cpu_seconds() - cpu0:.2f}s of CPU while idle"


def test_messages_found_damaged_at_start_are_logged_reported_and_listed(gateway, peers, tmp_path):
    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    gw = gateway(config(tmp_path))
    queue = gw.tmp / "spool" / "queue"
    for n, to in enumerate(("bob@remote.test", "carol@remote.test", "dave@remote.test")):
        send(to, f"doomed {n}")
    assert wait_until(lambda: sum(p.name.endswith(".st") for p in queue.iterdir()) == 3, 30), gw.log()
    ids = sorted((e["received_at"], e["id"]) for e in entries(gw))
    truncated, missing, garbled = [i for _, i in ids]
    gw.stop()

    with open(queue / truncated, "r+b") as f:               # disk trouble: the end of the file is gone
        f.truncate(os.path.getsize(queue / truncated) - 5)
    (queue / missing).unlink()                              # a careless rm; its state file stays
    (queue / garbled).write_bytes(os.urandom(300))          # noise over the header; the state file stays
    gw.start()

    expected = {
        truncated: "message file damaged: file is ",
        missing: "message file missing; moved to corrupt/; 1 recipient(s) not delivered, sender <alice@example.test>",
        garbled: "message file damaged: no spool header; moved to corrupt/; 1 recipient(s) not delivered",
    }
    for entry_id, text in expected.items():
        assert wait_until(lambda: log_lines(gw, f"queue {entry_id}: {text}"), 15), gw.log()
        assert len(log_lines(gw, f"queue {entry_id}: message file")) == 1, log_lines(gw, entry_id)
        assert not log_lines(gw, f"queue/{entry_id}"), log_lines(gw, entry_id)    # one line per message
    assert "(truncated); moved to corrupt/" in log_lines(gw, f"queue {truncated}:")[0]
    assert "Traceback" not in gw.log()

    mail = gw.tmp / "mail"
    assert wait_until(lambda: len(maildir_messages(mail, "alice")) == 3
                      and len(maildir_messages(mail, "postmaster")) == 3, 20), gw.log()
    for mailbox in ("alice", "postmaster"):
        reports = maildir_messages(mail, mailbox)
        for rcpt in (b"bob@remote.test", b"carol@remote.test", b"dave@remote.test"):
            [report] = [r for r in reports if rcpt in r]
            assert b"multipart/report" in report and b"5.3.0" in report and b"message lost in the queue" in report

    assert wait_until(lambda: len(entries(gw)) == 3, 15), entries(gw)     # the reports delivered
    rows = {r["id"]: r for r in json.loads(run(gw, "list", "--json").stdout)["entries"]}
    assert set(rows) == {truncated, missing, garbled}
    for entry_id, text in expected.items():
        assert rows[entry_id]["corrupt"] and rows[entry_id]["sender"] == "alice@example.test"
        assert rows[entry_id]["why_held"].startswith("corrupt: " + text.split(";")[0]), rows[entry_id]
    assert not any(queue.iterdir())
    assert_idle(gw)

    gw.stop()                                                 # a second restart finds nothing new
    gw.start()
    assert wait_until(lambda: gw.log().count("queue loaded") >= 2 or "entries=0" in gw.log(), 15)
    for entry_id in expected:
        assert len(log_lines(gw, f"queue {entry_id}: message file")) == 1
    assert len(maildir_messages(mail, "alice")) == 3


def test_junk_in_every_spool_folder_is_one_line_each_and_no_crash(gateway, tmp_path):
    spool = tmp_path / "spool"
    for sub in ("tmp", "queue", "corrupt", "maildrop"):
        (spool / sub).mkdir(parents=True, mode=0o700)
    queue, tmp, corrupt, maildrop = (spool / s for s in ("queue", "tmp", "corrupt", "maildrop"))
    (queue / "0a0a0a").write_bytes(b"")                                   # zero bytes
    (queue / "0b0b0b").write_bytes(os.urandom(2000))                      # binary junk
    (queue / "0c0c0c").mkdir()                                            # a directory for a file
    os.mkfifo(queue / "0d0d0d")                                           # would block a reader forever
    (queue / "0e0e0e").symlink_to("/etc/passwd")                          # points anywhere
    (queue / "notes for the admin.txt").write_text("hello")               # not a queue id
    (queue / "0f0f0f.st").write_bytes(b"\x00" * 40)                        # a state file alone, unreadable
    (tmp / "0a1b2c.3").write_bytes(b"smtpgw-spool 1 {\"len\": 9")         # kill -9 during a write
    (tmp / "olddir").mkdir()
    (corrupt / "empty").write_bytes(b"")
    os.mkfifo(corrupt / "pipe")
    (corrupt / "adir").mkdir()
    (maildrop / "1700000000.1.empty").write_bytes(b"")
    (maildrop / "1700000001.2.junk").write_bytes(os.urandom(500))
    os.mkfifo(maildrop / "1700000002.3.pipe")
    (maildrop / "1700000003.4.dir").mkdir()
    cfg = config(tmp_path)
    cfg["connectors"][0]["smart_hosts"] = []
    gw = gateway(cfg)

    want = {
        "queue/0a0a0a: message file damaged: no spool header; moved to corrupt/": 1,
        "queue/0b0b0b: message file damaged: no spool header; moved to corrupt/": 1,
        "queue/0c0c0c: message file damaged: a directory, not a spool file; moved to corrupt/": 1,
        "queue/0d0d0d: message file damaged: a named pipe, not a spool file; moved to corrupt/": 1,
        "queue/0e0e0e: message file damaged: a symbolic link, not a spool file; moved to corrupt/": 1,
        "queue/notes for the admin.txt: not a queue id: a file the gateway did not write; moved to corrupt/": 1,
        "queue/0f0f0f.st: message file missing, and its state file damaged: no state header; moved to corrupt/": 1,
        "tmp/0a1b2c.3: an unfinished write": 1,
        "tmp/olddir: a directory the gateway did not make; left in place": 1,
        "maildrop 1700000000.1.empty: unreadable, moved to": 1,
        "maildrop 1700000001.2.junk: unreadable, moved to": 1,
        "maildrop 1700000002.3.pipe: unreadable, moved to": 1,
        "maildrop 1700000003.4.dir: unreadable, moved to": 1,
    }
    assert wait_until(lambda: all(log_lines(gw, text) for text in want), 20), gw.log()
    assert {text: len(log_lines(gw, text)) for text in want} == want
    assert "Traceback" not in gw.log()
    assert sorted(p.name for p in queue.iterdir()) == []
    assert sorted(p.name for p in tmp.iterdir()) == ["olddir"]
    assert sorted(p.name for p in (maildrop / "corrupt").iterdir()) == sorted(
        ["1700000000.1.empty", "1700000001.2.junk", "1700000002.3.pipe", "1700000003.4.dir"])

    listed = run(gw, "list")                # reads corrupt/, FIFO and all, without hanging
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(run(gw, "list", "--json").stdout)["entries"]}
    assert {"0a0a0a", "0b0b0b", "0c0c0c", "0d0d0d", "0e0e0e", "notes for the admin.txt", "0f0f0f",
            "empty", "pipe", "adir"} <= set(rows)
    assert all(r["corrupt"] and r["sender"] is None for r in rows.values())

    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:              # the gateway still works
        s.sendmail("alice@example.test", ["bob@example.test"], "Subject: still here\r\n\r\nHi.\r\n")
    assert wait_until(lambda: maildir_messages(gw.tmp / "mail", "bob"), 15), gw.log()
    assert_idle(gw)


def test_a_write_torn_by_a_power_cut_is_set_aside_and_the_rest_delivered(gateway, tmp_path):
    """On ext4, xfs and btrfs a new message is one commit: renamed into queue/, then fsync'd
    (mta/spool/files.py). A power cut during that fsync can leave the name with a hole where data
    never reached the disk; that message was never acknowledged. The restarted gateway moves it to
    corrupt/ with one line and delivers the rest."""
    from mta.model.queue_entry import QueueEntry, RecipientState
    from mta.spool.files import checksum
    from mta.spool.store import encode_message_header

    queue = tmp_path / "spool" / "queue"
    queue.mkdir(parents=True, mode=0o700)
    for entry_id, to in (("0t0001", "bob"), ("0t0002", "carol"), ("0t0003", "dave")):
        body = f"Subject: {entry_id}\r\n\r\n".encode() + b"line of text\r\n" * 400
        entry = QueueEntry(id=entry_id, sender="alice@example.test", rcpts=[RecipientState(f"{to}@example.test")],
                           received_at=time.time(), size=len(body), virtual_server="", peer_host="localhost")
        (queue / entry_id).write_bytes(encode_message_header(entry, len(body), checksum([body])) + body)
    with open(queue / "0t0002", "r+b") as f:            # the right length, a block never written
        f.seek(-2048, os.SEEK_END)
        f.write(b"\0" * 1024)
    gw = gateway(config(tmp_path))

    mail = gw.tmp / "mail"
    assert wait_until(lambda: maildir_messages(mail, "bob") and maildir_messages(mail, "dave"), 20), gw.log()
    line = "queue 0t0002: message file damaged: the message does not match its checksum"
    assert wait_until(lambda: log_lines(gw, line), 15), gw.log()
    assert len(log_lines(gw, "0t0002: message file")) == 1, log_lines(gw, "0t0002")
    assert "moved to corrupt/" in log_lines(gw, line)[0]
    assert "Traceback" not in gw.log()
    assert maildir_messages(mail, "carol") == []
    assert b"Subject: 0t0001" in maildir_messages(mail, "bob")[0]
    assert sorted(p.name for p in (tmp_path / "spool" / "corrupt").iterdir()) == ["0t0002", "0t0002.st"]


def test_files_the_service_user_cannot_read_are_named_and_set_aside(tmp_path):
    """twistd -u nobody: a message file root left behind with mode 0600 cannot be read; the queue
    says so once and moves it to corrupt/. A folder of root's it cannot even move stays, named once."""
    if os.geteuid() != 0:
        pytest.skip("changing user needs root")
    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="smtpgw-perms-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        cfg = config(work)
        cfg["connectors"][0]["smart_hosts"] = []
        spool = work / "spool"
        for sub in ("", "tmp", "queue", "corrupt"):
            (spool / sub).mkdir(mode=0o700, exist_ok=True)
        (spool / "queue" / "0a0a0a").write_bytes(b"smtpgw-spool 1 {}\n")
        os.chmod(spool / "queue" / "0a0a0a", 0o600)                     # root's, unreadable to nobody
        (spool / "queue" / "0b0b0b").mkdir(mode=0o700)                    # root's, cannot be moved by nobody
        for path in [spool, *(spool / s for s in ("tmp", "queue", "corrupt"))]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        gw = GatewayProcess(work, cfg)
        gw.write_config()
        command = gw.command()
        command[command.index("smtpgw"):command.index("smtpgw")] = [f"--uid={nobody.pw_uid}",
                                                                     f"--gid={nobody.pw_gid}"]
        gw.command = lambda: command
        gw.start()
        try:
            unreadable = "spool: queue/0a0a0a: message file unreadable: Permission denied; moved to corrupt/"
            stuck = ("spool: queue/0b0b0b: message file unreadable: Permission denied; left in queue/: "
                     "cannot move it to corrupt/ (Permission denied)")
            assert wait_until(lambda: unreadable in gw.log() and stuck in gw.log(), 20), gw.log()
            assert "Traceback" not in gw.log()
            assert (spool / "corrupt" / "0a0a0a").exists() and (spool / "queue" / "0b0b0b").is_dir()
            with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:      # still answering
                assert s.ehlo()[0] == 250
            assert gw.proc.poll() is None
        finally:
            gw.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_files_where_the_spools_folders_and_socket_should_be(gateway, tmp_path):
    """A file for maildrop/, a directory for control.sock: one line each, and mail still flows."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "maildrop").write_bytes(b"junk")
    (spool / "control.sock").mkdir()
    cfg = config(tmp_path)
    cfg["connectors"][0]["smart_hosts"] = []
    gw = gateway(cfg)
    lines = [f"maildrop: cannot read {spool}/maildrop: Not a directory; mail from `smtpgw sendmail` waits",
             f"control socket {spool}/control.sock: something that is not a socket is in the way (a directory)"]
    assert wait_until(lambda: all(line in gw.log() for line in lines), 20), gw.log()
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("alice@example.test", ["bob@example.test"], "Subject: still here\r\n\r\nHi.\r\n")
    assert wait_until(lambda: maildir_messages(gw.tmp / "mail", "bob"), 15), gw.log()
    assert gw.log().count("maildrop: cannot read") == 1 and "Traceback" not in gw.log()
