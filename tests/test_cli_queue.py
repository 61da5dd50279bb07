"""``smtpgw queue`` as an administrator runs it: against a running gateway (through its control
socket) with deferred and held mail, and against a stopped one (on the spool files)."""
from __future__ import annotations

import email
import json
import os
import shutil
import smtplib
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.trial import unittest as trial_unittest

from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until
from test_queue import OK as OK_REPLY, TEMP, FakeGateway, dsn_fields, envelope, reports, submit

GW_HOST, GW_PORT = "127.0.0.110", 2525
SMART_HOST = "127.0.0.111"


def smtpgw_command() -> list[str]:
    beside = Path(sys.executable).with_name("smtpgw")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("smtpgw")
    return [found] if found else [sys.executable, "-m", "mta.cli.main"]


def queue_config(tmp_path: Path) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["gateway"]["queue"]["retry"] = ["1h"]              # deferred mail waits for `queue retry`
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]"]
    return cfg


def run(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess:
    """The installed console script, in its own process, as an administrator types it."""
    return subprocess.run([*smtpgw_command(), "queue", "-c", str(gw.config_path), *args],
                          env=gw.env(), cwd=str(gw.tmp), capture_output=True, text=True, timeout=120)


def run_json(gw: GatewayProcess, *args: str, status: int = 0) -> dict:
    r = run(gw, *args, "--json")
    assert r.returncode == status, (r.stdout, r.stderr)
    return json.loads(r.stdout)


class InProcess:
    """The same command through ``mta.cli.main`` in the test process: no interpreter start-up per
    call, so the many small checks stay fast; ``run`` above covers the console script itself."""

    def __init__(self, gw: GatewayProcess, capsys) -> None:
        self.gw, self.capsys = gw, capsys

    def __call__(self, *args: str) -> subprocess.CompletedProcess:
        from mta.cli.main import main

        self.capsys.readouterr()
        status = main(["queue", "-c", str(self.gw.config_path), *args])
        out, err = self.capsys.readouterr()
        return subprocess.CompletedProcess(args, status, out, err)

    def json(self, *args: str, status: int = 0) -> dict:
        r = self(*args, "--json")
        assert r.returncode == status, (r.stdout, r.stderr)
        return json.loads(r.stdout)


def send(subject: str, rcpt: str = "bob@remote.test", sender: str = "alice@example.test") -> None:
    msg = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nHello.\r\n")
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail(sender, [rcpt], msg)


def entries(gw: GatewayProcess) -> list[dict]:
    """The queue as `smtpgw queue list --json` shows it, asked in-process (cheap enough to poll)."""
    from mta.cli.queue import run_request
    from mta.config import load_config

    reply = run_request(load_config(str(gw.config_path)), {"op": "list"})
    assert reply["ok"], reply
    return reply["entries"]


def deferred_ids(gw: GatewayProcess, count: int) -> list[str]:
    """Wait until ``count`` messages have failed once (451 at the smart host); their ids, oldest first."""
    found: list[dict] = []

    def ready() -> bool:
        found[:] = [e for e in entries(gw) if e["last_error"] and not e["dsn"]]
        return len(found) >= count

    assert wait_until(ready, 30), entries(gw)
    return [e["id"] for e in found]


def subject_of(data: bytes) -> str:
    return email.message_from_bytes(data)["Subject"]


def test_running_gateway_list_hold_retry_release_delete(gateway, peers, tmp_path, capsys):
    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    gw = gateway(queue_config(tmp_path))
    cli = InProcess(gw, capsys)
    sock = tmp_path / "spool" / "control.sock"
    # Twisted binds the socket, then sets its mode: wait for the mode, not only the name
    assert wait_until(lambda: sock.exists() and stat.S_IMODE(sock.stat().st_mode) == 0o600)
    assert stat.S_ISSOCK(sock.stat().st_mode)
    send("first")
    send("second")
    first, second = deferred_ids(gw, 2)

    listed = run_json(gw, "list")                      # the console script, through the control socket
    assert listed["gateway"] == "running"
    row = next(e for e in listed["entries"] if e["id"] == first)
    assert row["sender"] == "alice@example.test" and row["recipients_pending"] == ["bob@remote.test"]
    assert row["last_error"].startswith("451") and row["next_attempt"] > 0 and row["size"] > 0
    table = cli("list")
    assert table.returncode == 0 and "NEXT ATTEMPT" in table.stdout and first in table.stdout

    assert run_json(gw, "hold", first)["results"] == [{"id": first, "result": "done"}]
    assert cli.json("hold", first)["results"] == [{"id": first, "result": "unchanged"}]
    held = next(e for e in entries(gw) if e["id"] == first)
    assert held["held"] and held["why_held"] == "held by the administrator" and held["next_attempt"] is None

    peer.set_reply("rcpt", None)                       # the smart host takes mail again
    retried = cli.json("retry", "--all")["results"]
    assert {r["id"]: r["result"] for r in retried} == {first: "held (release it first)", second: "done"}
    assert peer.wait_for(1, 20)
    assert [subject_of(m.data) for m in peer.messages] == ["second"]
    assert wait_until(lambda: [e["id"] for e in entries(gw)] == [first])
    assert cli("retry", first).returncode == 1         # named and held: nothing happens, and it says so

    assert cli.json("release", first)["results"] == [{"id": first, "result": "done"}]
    assert peer.wait_for(2, 20)
    assert subject_of(peer.messages[1].data) == "first"
    assert wait_until(lambda: entries(gw) == [])

    # delete with a DSN: the sender (a local mailbox here) gets the failure report
    peer.set_reply("rcpt", "451 4.3.0 try later")
    send("third")
    (third,) = deferred_ids(gw, 1)
    shown = cli.json("show", third)["entry"]
    assert ["Subject", "third"] in shown["headers"]
    assert shown["recipients"][0]["status"] == "pending" and shown["recipients"][0]["attempts"] == 1
    assert "Subject: third" in cli("show", third).stdout

    deleted = run_json(gw, "delete", "--dsn", third)["results"]
    assert deleted[0]["id"] == third and deleted[0]["result"] == "done" and deleted[0]["dsn"]
    assert wait_until(lambda: maildir_messages(tmp_path / "mail", "alice"), 20)
    report = maildir_messages(tmp_path / "mail", "alice")[0]
    assert b"Status: 5.3.0" in report and b"deleted from the queue by the administrator" in report
    assert b"Subject: third" in report
    assert wait_until(lambda: entries(gw) == [])
    assert len(peer.messages) == 2

    missing = cli("delete", "no-such-id")
    assert missing.returncode == 1 and "not in the queue" in missing.stdout


def test_stopped_gateway_works_on_the_spool(gateway, peers, tmp_path, capsys):
    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    gw = gateway(queue_config(tmp_path))
    cli = InProcess(gw, capsys)
    send("keep me held")
    send("delete me")
    held_id, doomed = deferred_ids(gw, 2)
    gw.stop()
    assert not (tmp_path / "spool" / "control.sock").exists()

    listed = run_json(gw, "list")
    assert listed["gateway"] == "stopped"
    assert [e["id"] for e in listed["entries"]] == [held_id, doomed]
    assert cli.json("hold", held_id)["results"] == [{"id": held_id, "result": "done"}]
    deleted = cli.json("delete", "--dsn", doomed)["results"]
    assert deleted[0]["result"] == "done" and deleted[0]["dsn"]
    after = cli.json("list")["entries"]
    assert {e["id"]: e["held"] for e in after} == {held_id: True, deleted[0]["dsn"]: False}
    assert not (tmp_path / "spool" / "queue" / doomed).exists()

    peer.set_reply("rcpt", None)
    gw.start()                                          # the DSN goes out; the held one stays
    assert wait_until(lambda: maildir_messages(tmp_path / "mail", "alice"), 20)
    assert b"Status: 5.3.0" in maildir_messages(tmp_path / "mail", "alice")[0]
    assert cli.json("list")["gateway"] == "running"
    assert wait_until(lambda: [e["id"] for e in entries(gw)] == [held_id])
    assert peer.messages == []

    assert cli.json("release", held_id)["results"] == [{"id": held_id, "result": "done"}]
    assert peer.wait_for(1, 20)
    assert subject_of(peer.messages[0].data) == "keep me held"


def test_usage_errors(tmp_path, capsys):
    cfg = GatewayProcess(tmp_path, queue_config(tmp_path))
    cfg.write_config()
    cli = InProcess(cfg, capsys)
    assert cli("retry").returncode == 2                            # names nothing
    assert cli("retry", "x", "--all").returncode == 2              # names two ways
    assert cli().returncode == 2                                   # no action
    assert cli.json("list") == {"ok": True, "entries": [], "gateway": "stopped"}


@pytest.mark.parametrize("args", [["--json", "list"], ["list", "--json"]])
def test_json_option_either_side_of_the_action(tmp_path, capsys, args):
    cfg = GatewayProcess(tmp_path, queue_config(tmp_path))
    cfg.write_config()
    r = InProcess(cfg, capsys)(*args)
    assert r.returncode == 0 and json.loads(r.stdout)["entries"] == []


def test_control_socket_key_and_length_check(tmp_path):
    from mta.config import ConfigError, parse_config

    cfg = queue_config(tmp_path)
    assert parse_config(cfg).gateway.control_socket_path == str(tmp_path / "spool" / "control.sock")
    cfg["gateway"]["control_socket"] = str(tmp_path / "gw.sock")
    assert parse_config(cfg).gateway.control_socket_path == str(tmp_path / "gw.sock")
    cfg["gateway"]["control_socket"] = None
    cfg["gateway"]["spool"] = str(tmp_path / ("x" * 120))
    with pytest.raises(ConfigError, match=r"^gateway.spool: the control socket .* longer than"):
        parse_config(cfg)


# -- the queue manager's side, with a fake clock and an in-memory spool -----------------------------


class QueueAdministration(trial_unittest.TestCase):
    def setUp(self):
        from mta.queue.manager import QueueManager

        self.gw = FakeGateway()
        self.qm = self.gw.queue = QueueManager(self.gw)
        self.qm.start()

    def deferred_once(self) -> str:
        self.gw.deliverer.answer("bob@far.test", TEMP)
        entry_id = submit(self.qm, envelope())
        self.gw.reactor.advance(0)
        assert len(self.gw.deliverer.calls_for(entry_id)) == 1
        return entry_id

    @defer.inlineCallbacks
    def test_hold_survives_restart_and_release_attempts_now(self):
        from mta.queue.manager import QueueManager

        entry_id = self.deferred_once()
        self.assertTrue((yield defer.ensureDeferred(self.qm.hold(entry_id))))
        self.assertTrue(self.gw.spool.get(entry_id).extra["held"])
        self.gw.reactor.advance(2 * 3600)                 # retries, delay notice: none while held
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), 1)
        self.assertEqual(reports(self.gw), [])

        yield self.qm.stop()
        self.qm = QueueManager(self.gw)                   # a restart reads the hold back
        yield self.qm.start()
        self.gw.reactor.advance(3600)                     # (expiry still counts from arrival: 4h)
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), 1)
        self.assertEqual(self.qm.wake(), 0)               # ETRN / retry --all skip it

        self.gw.deliverer.answer("bob@far.test", OK_REPLY)
        self.assertTrue((yield defer.ensureDeferred(self.qm.release(entry_id))))
        self.gw.reactor.advance(0)
        self.assertEqual(len(self.gw.deliverer.calls_for(entry_id)), 2)
        self.assertNotIn(entry_id, self.gw.spool.messages)

    @defer.inlineCallbacks
    def test_delete_waits_for_the_attempt_in_flight_then_reports(self):
        self.gw.deliverer.pending = True
        self.gw.deliverer.answer("bob@far.test", TEMP)
        entry_id = submit(self.qm, envelope())
        self.gw.reactor.advance(0)
        done = defer.ensureDeferred(self.qm.delete(entry_id, notify_sender=True))
        self.assertNoResult(done)                          # the attempt is still running
        self.gw.deliverer.pending = False
        self.gw.deliverer.release()
        dsn_id = yield done
        self.assertNotIn(entry_id, self.gw.spool.messages)
        self.assertIn(dsn_id, self.gw.spool.messages)
        (_, msg), = [r for r in reports(self.gw) if r[0] == dsn_id]
        fields = dsn_fields(msg)
        self.assertEqual(fields[0]["Status"], "5.3.0")
        self.assertIn("deleted from the queue by the administrator", fields[0]["Diagnostic-Code"])
        self.assertIsNone(self.qm.get(entry_id))
        with self.assertRaises(KeyError):
            yield defer.ensureDeferred(self.qm.delete(entry_id))

    @defer.inlineCallbacks
    def test_delete_honours_notify_never(self):
        self.gw.deliverer.answer("bob@far.test", TEMP)
        env = envelope(rcpt_params={"bob@far.test": {"NOTIFY": "NEVER"}})
        entry_id = submit(self.qm, env)
        self.gw.reactor.advance(0)
        self.assertIsNone((yield defer.ensureDeferred(self.qm.delete(entry_id, notify_sender=True))))
        self.assertEqual(self.gw.spool.messages, {})



def test_summary_cat_requeue_prefixes_and_a_retry_that_keeps_the_schedule(gateway, peers, tmp_path, capsys):
    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    gw = gateway(queue_config(tmp_path))
    cli = InProcess(gw, capsys)
    send("to remote", rcpt="bob@remote.test")
    send("to elsewhere", rcpt="carol@elsewhere.test")
    first, second = deferred_ids(gw, 2)
    before = {e["id"]: e["next_attempt"] for e in entries(gw)}

    shape = cli.json("summary")
    assert shape["total"]["messages"] == 2 and shape["buckets_minutes"][0] == "5"
    assert {d["domain"]: d["by_age"][0] for d in shape["domains"]} == {"remote.test": 1, "elsewhere.test": 1}
    text = cli("summary").stdout.splitlines()
    assert text[0].split() == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280", "1280+"]
    assert text[1].split()[:3] == ["TOTAL", "2", "2"]

    cat = run(gw, "cat", first[:12])                          # a unique prefix is enough
    assert cat.returncode == 0 and "Subject: to remote\n" in cat.stdout and "\r" not in cat.stdout

    common = os.path.commonprefix([first, second])
    ambiguous = cli("show", common)
    assert ambiguous.returncode == 2 and "give more of the id" in ambiguous.stderr

    # a manual retry that fails again leaves the retry schedule where it was (1h ahead)
    def rcpts_to(address: str) -> int:
        return sum(1 for line in peer.transcript
                   if line.upper().startswith(b"RCPT TO:") and address.encode() in line)

    assert rcpts_to("bob@remote.test") == 1
    assert cli.json("retry", first)["results"] == [{"id": first, "result": "done"}]
    assert wait_until(lambda: rcpts_to("bob@remote.test") == 2, 20)
    assert wait_until(lambda: not next(e for e in entries(gw) if e["id"] == first).get("active"), 20)
    again = cli.json("show", first)["entry"]["recipients"][0]
    assert again["attempts"] == 1
    assert abs(next(e for e in entries(gw) if e["id"] == first)["next_attempt"] - before[first]) < 1

    # requeue starts the schedule over: attempted now, and delivered once the smart host takes mail
    peer.set_reply("rcpt", None)
    assert cli.json("requeue", second)["results"] == [{"id": second, "result": "done"}]
    assert peer.wait_for(1, 20)
    assert wait_until(lambda: [e["id"] for e in entries(gw)] == [first], 20)


def test_list_into_a_pipe_cuts_no_column(gateway, peers, tmp_path):
    peer = peers(SMART_HOST)
    long_error = "451 4.3.0 " + "the smart host explains at length " * 4
    peer.set_reply("rcpt", long_error)
    gw = gateway(queue_config(tmp_path))
    send("long error")
    deferred_ids(gw, 1)
    r = run(gw, "list")                                        # stdout is a pipe here
    assert r.returncode == 0 and "…" not in r.stdout
    assert "the smart host explains at length " * 3 in r.stdout
