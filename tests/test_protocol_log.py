"""W3C Extended protocol logs (mta.smtp.server.protocol_log): files written by real sessions and parsed back field
by field, rotation by period (injected clock) and by size, directives in every new file, the last lines
written on a clean shutdown. Addresses: 127.0.0.100-102."""
from __future__ import annotations

import calendar
import os
import shutil
import smtplib
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest as trial

from mta.config import PROTOCOL_LOG_FIELDS, ConfigError, ProtocolLogConfig, parse_config
from mta.model.envelope import Session
from mta.smtp.server.protocol_log import (ProtocolLog, ProtocolLogService, field_row, period_file_name, site_name,
                              w3c_value)
from mta.smtp.reply import Reply
from mta.smtp import replies as R
from mta.smtp.server.session import SMTPServerFactory
from server_fakes import FakeGateway, make_config

SERVER_IP = "127.0.0.100"
CLIENT_IP = "127.0.0.101"
E2E_IP = "127.0.0.102"

MESSAGE = b"From: a@remote.test\r\nSubject: w3c\r\n\r\nHello\r\n"
T0 = calendar.timegm((2026, 3, 31, 23, 59, 58))      # a Tuesday, two seconds before April


def parse_w3c(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """What a W3C log analyzer does: directives, then each line split on spaces by #Fields."""
    directives, rows, fields = [], [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            directives.append(line)
            if line.startswith("#Fields: "):
                fields = line[len("#Fields: "):].split(" ")
            continue
        values = line.split(" ")
        assert fields is not None and len(values) == len(fields), line
        rows.append(dict(zip(fields, values)))
    return directives, rows


def assert_directives_first(path: Path, fields: tuple[str, ...] = PROTOCOL_LOG_FIELDS) -> None:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#Software: smtpgw")
    assert lines[1] == "#Version: 1.0"
    assert lines[2].startswith("#Date: ") and len(lines[2]) == len("#Date: 2026-03-31 23:59:58")
    assert lines[3] == "#Fields: " + " ".join(fields)


def session(**over) -> Session:
    s = Session(id="S1", virtual_server="Test", peer_host="192.0.2.7", peer_port=40000,
                local_host="192.0.2.1", local_port=25, helo="client.test")
    for k, v in over.items():
        setattr(s, k, v)
    return s


def clock_log(tmp_path: Path, **cfg) -> tuple[ProtocolLog, task.Clock]:
    clock = task.Clock()
    clock.advance(T0)
    config = ProtocolLogConfig(enabled=True, directory=str(tmp_path), **cfg)
    return ProtocolLog(config, "SMTPSVC1", "gw.example.test", clock, delay=5.0), clock


def log_one(plog: ProtocolLog, verb: str = "NOOP", line: str | None = None, code: int = 250) -> None:
    plog.command(session(), verb, line or verb, Reply(code, "2.0.0", "Ok"), len(line or verb) + 2, 14, 0.0)


# -- field formats ---------------------------------------------------------------------------------

def test_every_configurable_field_has_a_value():
    row = field_row("d", "t", session(), "SMTPSVC1", "gw", "MAIL", " FROM:<>", 250, 1, 2, 3)
    assert len(row) == len(PROTOCOL_LOG_FIELDS)
    assert dict(zip(PROTOCOL_LOG_FIELDS, row))["cs-uri-query"] == " FROM:<>"


def test_values_are_escaped_the_iis_way():
    assert w3c_value(None) == "-" and w3c_value("") == "-"
    assert w3c_value(" FROM:<a@b.test> SIZE=10") == "+FROM:<a@b.test>+SIZE=10"
    assert w3c_value("a\tb\x01c") == "a+b%01c"
    assert w3c_value(250) == "250"


def test_file_names_follow_iis():
    t = calendar.timegm((2026, 3, 31, 23, 59, 58))
    assert period_file_name("hourly", t, False) == "ex26033123.log"
    assert period_file_name("daily", t, False) == "ex260331.log"
    assert period_file_name("monthly", t, False) == "ex2603.log"
    # March 2026 starts on a Sunday: the 31st (a Tuesday) is in its fifth week; April 1st starts week 1
    assert period_file_name("weekly", t, False) == "ex260305.log"
    assert period_file_name("weekly", t + 2, False) == "ex260401.log"
    # April 2026 starts on a Wednesday: Sunday the 5th starts week 2
    assert period_file_name("weekly", calendar.timegm((2026, 4, 4, 12, 0, 0)), False) == "ex260401.log"
    assert period_file_name("weekly", calendar.timegm((2026, 4, 5, 0, 0, 0)), False) == "ex260402.log"


def test_local_time_names_files_by_local_time(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")          # UTC+9, no daylight saving
    import time
    time.tzset()
    try:
        assert period_file_name("daily", T0, True) == "ex260401.log"
        assert period_file_name("daily", T0, False) == "ex260331.log"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_site_name_is_the_virtual_servers_position():
    config = parse_config({"gateway": {"hostname": "gw.example.test"},
                           "virtual_servers": [{"name": "A", "listen": ["127.0.0.1:25"]},
                                               {"name": "B", "listen": ["127.0.0.1:587"]}]})
    assert [site_name(config, vs) for vs in config.virtual_servers] == ["SMTPSVC1", "SMTPSVC2"]


# -- rotation ----------------------------------------------------------------------------------------

def test_daily_rollover_with_an_injected_clock(tmp_path):
    plog, clock = clock_log(tmp_path, period="daily")
    log_one(plog, "EHLO", "EHLO client.test")
    clock.advance(1)
    log_one(plog, "MAIL", "MAIL FROM:<a@remote.test>")
    clock.advance(1)                     # 2026-04-01 00:00:00
    log_one(plog, "RCPT", "RCPT TO:<b@example.test>")
    assert not (tmp_path / "SMTPSVC1").exists()            # buffered, off the session's path
    clock.advance(5.0)                   # the buffer's timer
    march, april = tmp_path / "SMTPSVC1" / "ex260331.log", tmp_path / "SMTPSVC1" / "ex260401.log"
    for path in (march, april):
        assert_directives_first(path)
    _, rows = parse_w3c(march)
    assert [(r["date"], r["time"], r["cs-method"]) for r in rows] == [
        ("2026-03-31", "23:59:58", "EHLO"), ("2026-03-31", "23:59:59", "MAIL")]
    directives, rows = parse_w3c(april)
    assert "#Date: 2026-04-01 00:00:00" in directives
    assert [(r["date"], r["time"], r["cs-method"], r["cs-uri-query"]) for r in rows] == [
        ("2026-04-01", "00:00:00", "RCPT", "+TO:<b@example.test>")]


@pytest.mark.parametrize("period, names", [
    ("hourly", ["ex26033123.log", "ex26040100.log", "ex26040101.log"]),
    ("weekly", ["ex260305.log", "ex260401.log"]),
    ("monthly", ["ex2603.log", "ex2604.log"]),
    ("unlimited", ["extend1.log"]),
])
def test_other_periods(tmp_path, period, names):
    plog, clock = clock_log(tmp_path, period=period)
    for step in (0, 10, 3600):
        clock.advance(step)
        log_one(plog)
    plog.flush()
    folder = tmp_path / "SMTPSVC1"
    assert sorted(os.listdir(folder)) == names
    for name in names:
        assert_directives_first(folder / name)
    assert sum(len(parse_w3c(folder / n)[1]) for n in names) == 3


def test_size_rollover_starts_new_files_with_directives(tmp_path):
    plog, clock = clock_log(tmp_path, period=1024)
    for i in range(40):
        clock.advance(1)
        log_one(plog, "RCPT", f"RCPT TO:<user{i:02d}@example.test>")
    plog.flush()
    folder = tmp_path / "SMTPSVC1"
    names = sorted(os.listdir(folder), key=lambda n: int(n[6:-4]))
    assert len(names) >= 3 and names[0] == "extend1.log"
    assert names == [f"extend{i}.log" for i in range(1, len(names) + 1)]
    seen = []
    for name in names:
        assert_directives_first(folder / name)
        assert (folder / name).stat().st_size <= 1024
        seen += [r["cs-uri-query"] for r in parse_w3c(folder / name)[1]]
    assert seen == [f"+TO:<user{i:02d}@example.test>" for i in range(40)]      # nothing lost, in order

    # a new process goes on from the last file (its own directives first), within the same size
    again, _ = clock_log(tmp_path, period=1024)
    log_one(again, "QUIT")
    again.flush()
    names = sorted(os.listdir(folder), key=lambda n: int(n[6:-4]))
    assert all((folder / n).stat().st_size <= 1024 for n in names)
    assert parse_w3c(folder / names[-1])[1][-1]["cs-method"] == "QUIT"
    assert (folder / names[-1]).read_text().count("#Fields: ") in (1, 2)


def test_restart_writes_the_directives_again(tmp_path):
    first, _ = clock_log(tmp_path)
    log_one(first)
    first.flush()
    second, _ = clock_log(tmp_path)
    log_one(second, "QUIT")
    second.flush()
    path = tmp_path / "SMTPSVC1" / "ex260331.log"
    text = path.read_text()
    assert text.count("#Fields: ") == 2 and text.count("#Version: 1.0") == 2
    assert [r["cs-method"] for r in parse_w3c(path)[1]] == ["NOOP", "QUIT"]


def test_chosen_fields_only(tmp_path):
    fields = ("time", "c-ip", "cs-method", "sc-status")
    plog, _ = clock_log(tmp_path, fields=fields)
    log_one(plog, "DATA", "DATA", 554)
    plog.flush()
    path = tmp_path / "SMTPSVC1" / "ex260331.log"
    assert_directives_first(path, fields)
    assert parse_w3c(path)[1] == [{"time": "23:59:58", "c-ip": "192.0.2.7", "cs-method": "DATA", "sc-status": "554"}]


def test_unwritable_directory_is_reported_not_raised(tmp_path):
    (tmp_path / "SMTPSVC1").write_text("a file where the folder should be")
    plog, _ = clock_log(tmp_path)
    log_one(plog)
    plog.flush()                # logged by the buffer; the session never sees it
    assert (tmp_path / "SMTPSVC1").is_file()


# -- configuration ------------------------------------------------------------------------------------

def vs_config(protocol_log: dict) -> dict:
    return {"gateway": {"hostname": "gw.example.test"},
            "virtual_servers": [{"name": "A", "listen": ["127.0.0.1:25"], "protocol_log": protocol_log}]}


def test_configuration_keys():
    pl = parse_config(vs_config({"enabled": True, "period": "10MB", "local_time": True,
                                 "fields": ["date", "time", "cs-method"]})).virtual_servers[0].protocol_log
    assert (pl.enabled, pl.period, pl.local_time, pl.fields) == (True, 10 * 1024 * 1024, True,
                                                                 ("date", "time", "cs-method"))
    pl = parse_config(vs_config({"period": "Unlimited"})).virtual_servers[0].protocol_log
    assert pl.period == "unlimited" and pl.fields == PROTOCOL_LOG_FIELDS and pl.local_time is False


@pytest.mark.parametrize("value, message", [
    ({"period": "fortnightly"}, "virtual_servers[0].protocol_log.period: expected one of hourly, daily, weekly, "
                                "monthly, unlimited, or a size such as 10MB, got 'fortnightly'"),
    ({"period": 0}, "virtual_servers[0].protocol_log.period: expected one of"),
    ({"fields": ["date", "cs(User-Agent)"]}, "virtual_servers[0].protocol_log.fields[1]: expected one of date, time"),
    ({"fields": []}, "virtual_servers[0].protocol_log.fields: expected at least 1 entry"),
    ({"fields": ["date", "date"]}, "virtual_servers[0].protocol_log.fields[1]: 'date' is listed twice"),
    ({"local_time": "yes"}, "virtual_servers[0].protocol_log.local_time: expected true or false"),
])
def test_configuration_errors_name_the_key(value, message):
    with pytest.raises(ConfigError) as e:
        parse_config(vs_config(value))
    assert str(e.value).startswith(message)


# -- a real session over TCP --------------------------------------------------------------------------

def smtp_session(port: int) -> list[int]:
    """A client from CLIENT_IP: EHLO, a refused and an accepted RCPT, a message, an unknown verb, QUIT."""
    codes = []
    with smtplib.SMTP(SERVER_IP, port, source_address=(CLIENT_IP, 0), timeout=10) as s:
        codes.append(s.ehlo("client.test")[0])
        codes.append(s.mail("a@remote.test")[0])
        codes.append(s.rcpt("b@elsewhere.test")[0])
        codes.append(s.rcpt("b@example.test")[0])
        codes.append(s.data(MESSAGE)[0])
        codes.append(s.docmd("XYZZY", "plugh")[0])
        codes.append(s.docmd("AUTH", "PLAIN c2VjcmV0")[0])
    return codes


class RealSessionTest(trial.TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpgw-diag-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        config = make_config()
        vs = replace(config.virtual_servers[0],
                     protocol_log=ProtocolLogConfig(enabled=True, directory=str(self.tmp), period="daily"))
        self.config = replace(config, virtual_servers=(vs,))
        self.gateway = FakeGateway(self.config, reactor=reactor)
        self.factory = SMTPServerFactory(self.gateway, vs)
        self.port = reactor.listenTCP(0, self.factory, interface=SERVER_IP)
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_one_line_per_command_parsed_back_field_by_field(self):
        port = self.port.getHost().port
        codes = yield threads.deferToThread(smtp_session, port)
        assert codes == [250, 250, 550, 250, 250, 500, 503]
        yield self.factory.protocol_log.flush()
        files = list((self.tmp / "SMTPSVC1").iterdir())
        assert len(files) == 1 and files[0].name.startswith("ex") and len(files[0].name) == len("ex260331.log")
        assert_directives_first(files[0])
        directives, rows = parse_w3c(files[0])
        assert directives[0].startswith("#Software: smtpgw ")
        assert [r["cs-method"] for r in rows] == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "XYZZY", "AUTH", "QUIT"]
        assert [r["sc-status"] for r in rows] == ["250", "250", "550", "250", "250", "500", "503", "221"]
        for r in rows:
            assert r["c-ip"] == CLIENT_IP and r["s-ip"] == SERVER_IP and r["s-port"] == str(port)
            assert r["s-sitename"] == "SMTPSVC1" and r["s-computername"] == "mx.example.test"
            assert r["cs-username"] == "client.test" and r["cs-host"] == "client.test"
            assert r["cs-uri-stem"] == "-" and r["sc-win32-status"] == "0" and r["cs-version"] == "SMTP"
            assert int(r["time-taken"]) >= 0
            assert files[0].name == f"ex{r['date'][2:4]}{r['date'][5:7]}{r['date'][8:10]}.log"
        ehlo, mail, rcpt1, rcpt2, data, unknown, auth, quit_ = rows
        assert ehlo["cs-uri-query"] == "+client.test"
        assert mail["cs-uri-query"] == "+FROM:<a@remote.test>" and mail["cs-bytes"] == str(len(b"mail FROM:<a@remote.test>\r\n"))
        assert mail["sc-bytes"] == str(len(R.SENDER_OK.to_bytes()))
        assert quit_["sc-bytes"] == str(len(R.BYE.to_bytes())) and quit_["cs-bytes"] == str(len(b"quit\r\n"))
        assert rcpt1["cs-uri-query"] == "+TO:<b@elsewhere.test>"
        # DATA: the command, the 354, the message and the final 250 are one line
        assert data["cs-uri-query"] == f"+<Q{self.gateway.queue.submitted[0].envelope.id}>"    # the queue id
        assert int(data["cs-bytes"]) == len(b"data\r\n") + len(MESSAGE) + len(b".\r\n")
        assert int(data["sc-bytes"]) > len(b"354 \r\n") + len(b"250 \r\n")
        assert unknown["cs-uri-query"] == "+plugh"
        assert auth["cs-uri-query"] == "+PLAIN+***"          # the initial response is never logged
        assert "c2VjcmV0" not in files[0].read_text()
        assert quit_["cs-uri-query"] == "-"

    @defer.inlineCallbacks
    def test_last_lines_are_written_when_the_service_stops(self):
        self.factory.protocol_log.buffer.delay = 3600          # only the shutdown can write them
        port = self.port.getHost().port
        yield threads.deferToThread(smtp_session, port)
        folder = self.tmp / "SMTPSVC1"
        assert not folder.exists() or not list(folder.iterdir())
        svc = ProtocolLogService(self.factory.protocol_log)
        svc.startService()
        yield svc.stopService()
        [path] = list(folder.iterdir())
        assert [r["cs-method"] for r in parse_w3c(path)[1]][-1] == "QUIT"


# -- the daemon ---------------------------------------------------------------------------------------

def test_twistd_gateway_writes_protocol_log_and_flushes_on_stop(gateway, tmp_path):
    from gwprocess import base_config, maildir_messages, wait_until

    cfg = base_config(tmp_path, listen=f"{E2E_IP}:25")
    cfg["virtual_servers"][0]["protocol_log"] = {"enabled": True, "directory": str(tmp_path / "w3c"),
                                                 "period": "hourly"}
    gw = gateway(cfg)
    with smtplib.SMTP(E2E_IP, 25, source_address=(CLIENT_IP, 0), timeout=10) as s:
        s.ehlo("e2e.test")
        s.sendmail("a@remote.test", ["bob@example.test"], MESSAGE)
    assert wait_until(lambda: maildir_messages(tmp_path / "mail", "bob"))
    gw.stop()                                   # SIGTERM: a clean shutdown writes what is buffered
    folder = tmp_path / "w3c" / "SMTPSVC1"
    assert wait_until(lambda: folder.is_dir() and list(folder.iterdir()), 5)
    [path] = list(folder.iterdir())
    assert_directives_first(path)
    rows = parse_w3c(path)[1]
    assert [r["cs-method"] for r in rows] == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert [r["sc-status"] for r in rows] == ["250", "250", "250", "250", "221"]
    assert {r["s-ip"] for r in rows} == {E2E_IP} and {r["s-port"] for r in rows} == {"25"}
    assert {r["c-ip"] for r in rows} == {CLIENT_IP}
    queued = rows[3]["cs-uri-query"][2:-1]
    assert f"id {queued}".encode() in maildir_messages(tmp_path / "mail", "bob")[0]     # its Received header
