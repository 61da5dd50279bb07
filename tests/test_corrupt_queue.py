"""A queued message whose files vanish under a running gateway: moved to ``corrupt/`` once, reported
to its sender and the postmaster, listed as corrupt, and the queue manager stays idle (it used to
retry it at once, thousands of times a second)."""
from __future__ import annotations

import json
import smtplib
import time

from gwprocess import base_config, maildir_messages, wait_until
from test_cli_queue import entries, run

GW_HOST, GW_PORT = "127.0.0.122", 2525
SMART_HOST = "127.0.0.123"
WINDOW = 10.0                   # seconds of watching an idle gateway


def corrupt_config(tmp_path):
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]"]
    cfg["gateway"]["queue"]["retry"] = ["1s"]
    return cfg


def queued_after_one_deferral(gw) -> str:
    """Send one message the smart host defers; its queue id once its state file is on disk."""
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("alice@example.test", ["bob@remote.test", "carol@remote.test"],
                   "Subject: doomed\r\n\r\nHello.\r\n")
    queue = gw.tmp / "spool" / "queue"
    assert wait_until(lambda: any(p.name.endswith(".st") for p in queue.iterdir()), 30), gw.log()
    [message] = [p for p in queue.iterdir() if not p.name.endswith(".st")]
    return message.name


def test_missing_message_file_goes_to_corrupt_once_and_the_queue_stays_idle(gateway, peers, tmp_path):
    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    gw = gateway(corrupt_config(tmp_path))
    entry_id = queued_after_one_deferral(gw)
    (gw.tmp / "spool" / "queue" / entry_id).unlink()            # a careless rm

    moved = f"queue {entry_id}: message file missing; moved to "
    assert wait_until(lambda: moved in gw.log(), 15), gw.log()
    mail = gw.tmp / "mail"
    assert wait_until(lambda: maildir_messages(mail, "alice") and maildir_messages(mail, "postmaster"), 15)
    # the reports are done with (their last log lines written) once only the corrupt row is listed
    assert wait_until(lambda: [e["id"] for e in entries(gw)] == [entry_id], 15), entries(gw)

    # a window of WINDOW seconds, measured from its first sample to its last
    cpu0, lines0, t0 = gw.cpu_seconds(), len(gw.log().splitlines()), time.monotonic()
    assert not wait_until(lambda: len(gw.log().splitlines()) > lines0 + 2, WINDOW), gw.log().splitlines()[lines0:]
    cpu1, lines1, t1 = gw.cpu_seconds(), len(gw.log().splitlines()), time.monotonic()
    assert t1 - t0 >= WINDOW
    assert cpu1 - cpu0 < 0.5, f"{cpu1 - cpu0:.2f}s of CPU in {t1 - t0:.1f}s while idle"
    assert lines1 - lines0 <= 2, gw.log().splitlines()[lines0:]
    assert gw.log().count(entry_id + ": message file missing") == 1

    for mailbox in ("alice", "postmaster"):
        [report] = maildir_messages(mail, mailbox)
        assert b"multipart/report" in report and b"message lost in the queue" in report, report
        assert b"bob@remote.test" in report and b"carol@remote.test" in report
        assert b"5.3.0" in report
    corrupt = gw.tmp / "spool" / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == [entry_id + ".st"]
    assert not any((gw.tmp / "spool" / "queue").iterdir())

    listed = run(gw, "list")
    assert listed.returncode == 0, listed.stderr
    [row] = [line for line in listed.stdout.splitlines() if line.startswith(entry_id)]
    assert "<alice@example.test>" in row and "corrupt: message file missing" in row
    assert "0 messages in the queue; 1 corrupt" in listed.stdout
    rows = json.loads(run(gw, "list", "--json").stdout)["entries"]
    assert [(r["id"], r["corrupt"], r["files"]) for r in rows] == [(entry_id, True, [f"corrupt/{entry_id}.st"])]

    gw.stop()                                           # stopped: the same list, from the spool files
    stopped = run(gw, "list")
    [again] = [line for line in stopped.stdout.splitlines() if line.startswith(entry_id)]
    assert "<alice@example.test>" in again and "corrupt: message file missing" in again
