"""diag_logging: the same session at none, minimum, medium and maximum gives exactly the expected lines;
targets (file, stdout, syslog, the daemon's log) and formats; levels follow SIGHUP; one transaction
followed by its ids from connect to delivery in the real daemon. Addresses: 127.0.0.103-104."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import smtplib
import socket
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial import unittest as trial

from mta.config import ConfigError, PluginsConfig, parse_config
from mta.config.loader import DIAG_CATEGORIES, _diag_logging_settings
from mta.app.reload_config import ConfigReload
from mta.plugin.hookspecs import hookimpl
from server_fakes import Dialog, FakeGateway, make_config
from smtpgw_plugins.diag_logging import DiagLogging
from smtpgw_plugins.diag_logging.sinks import (FileSink, StdoutSink, SyslogSink, format_json, format_text,
                                               iso_time, make_sink)
from smtpgw_plugins.relay_acl import RelayACL

E2E_IP = "127.0.0.103"
CLIENT_IP = "127.0.0.104"

SESSION = (b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
           b"RCPT TO:<user@example.test>\r\nDATA\r\n")
MESSAGE = b"Subject: diag\r\n\r\nhello\r\n.\r\nQUIT\r\n"

DENY = ("smtp_protocol", "minimum", "relay decision")
MINIMUM = [DENY, DENY]
MEDIUM = [("connection_manager", "medium", "connect"), DENY, DENY,
          ("smtp_protocol", "medium", "message accepted"), ("connection_manager", "medium", "disconnect")]


def protocol(message: str) -> tuple[str, str, str]:
    return ("smtp_protocol", "maximum", message)


STATE, REPLY, COMMAND = protocol("state"), protocol("reply"), protocol("command")
MAXIMUM = [("connection_manager", "medium", "connect"), STATE, REPLY,                       # banner
           COMMAND, STATE, REPLY,                                                          # EHLO
           COMMAND, STATE, REPLY,                                                          # MAIL
           COMMAND, DENY, REPLY,                                                           # RCPT refused
           COMMAND, DENY, STATE, REPLY,                                                    # RCPT accepted
           COMMAND, STATE, REPLY,                                                          # DATA, 354
           STATE, ("smtp_protocol", "medium", "message accepted"), REPLY,                  # 250 queued
           COMMAND, REPLY, STATE,                                                          # QUIT
           ("connection_manager", "medium", "disconnect")]


def diag_settings(level: str | dict, path: Path, fmt: str = "json", target: str = "file") -> dict:
    levels = level if isinstance(level, dict) else {c: level for c in DIAG_CATEGORIES}
    return _diag_logging_settings({"levels": levels, "target": target, "path": str(path), "format": fmt},
                                  "plugins.diag_logging")


def with_diag(settings: dict):
    return replace(make_config(), plugins=PluginsConfig(enabled=("relay_acl", "diag_logging"),
                                                        settings={"diag_logging": settings}))


class Site:
    """An in-process gateway (clock reactor, so file writes happen at flush) with relay_acl and diag_logging."""

    def __init__(self, settings: dict) -> None:
        self.config = with_diag(settings)
        self.gateway = FakeGateway(self.config)
        self.diag = DiagLogging()
        for plugin in (RelayACL(), self.diag):
            self.gateway.hooks.register(plugin)
            plugin.smtpgw_configure(config=self.config, services=self.gateway)

    def session(self) -> Dialog:
        d = Dialog(self.gateway)
        assert [a.code for a in d.send(SESSION)] == [250, 250, 550, 250, 354]
        assert [a.code for a in d.send(MESSAGE)] == [250, 221]
        d.protocol.connectionLost(None)
        self.diag.sink.flush()
        return d

    def records(self) -> list[dict]:
        path = Path(self.diag.settings["path"])
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("level, expected", [("none", []), ("minimum", MINIMUM), ("medium", MEDIUM),
                                             ("maximum", MAXIMUM)])
def test_same_session_at_each_level_gives_exactly_the_expected_lines(tmp_path, level, expected):
    site = Site(diag_settings(level, tmp_path / "diag.log"))
    d = site.session()
    records = site.records()
    assert [(r["category"], r["level"], r["message"]) for r in records] == expected
    assert {r["session"] for r in records} <= {d.protocol.session.id}       # every line names the session
    if level == "none":
        assert not (tmp_path / "diag.log").exists()


def test_maximum_shows_every_command_and_reply_in_order(tmp_path):
    site = Site(diag_settings("maximum", tmp_path / "diag.log"))
    site.session()
    records = site.records()
    assert [r["line"] for r in records if r["message"] == "command"] == [
        "EHLO client.test", "MAIL FROM:<a@remote.test>", "RCPT TO:<x@elsewhere.test>",
        "RCPT TO:<user@example.test>", "DATA", "QUIT"]
    assert [r["reply"][:3] for r in records if r["message"] == "reply"] == [
        "220", "250", "250", "550", "250", "354", "250", "221"]
    deny, accept = [r for r in records if r["message"] == "relay decision"]
    assert (deny["recipient"], deny["decision"]) == ("x@elsewhere.test", "deny")
    assert "not in relay.allow and not authenticated" in deny["reason"]          # which rule refused
    assert (accept["decision"], accept["reason"]) == ("accept", "local domain example.test")
    [accepted] = [r for r in records if r["message"] == "message accepted"]
    assert accepted["id"].startswith("Q") and accepted["recipients"] == 1       # the session -> message link


def test_levels_are_per_category(tmp_path):
    levels = {c: "none" for c in DIAG_CATEGORIES}
    levels["connection_manager"] = "maximum"
    site = Site(diag_settings(levels, tmp_path / "diag.log"))
    site.session()
    assert [r["message"] for r in site.records()] == ["connect", "disconnect"]


def test_per_command_events_are_not_even_built_when_nobody_writes_them(tmp_path):
    site = Site(diag_settings("minimum", tmp_path / "diag.log"))
    seen = []

    class Counter:
        def wants_event(self, category, level):
            return level != "maximum"

        @hookimpl
        def smtpgw_event(self, category, level, message, fields):
            seen.append((category, level, message))

    site.gateway.hooks.register(Counter())
    site.session()
    assert ("smtp_protocol", "minimum", "relay decision") in seen
    assert not [e for e in seen if e[1] == "maximum"]


def test_an_event_nobody_takes_reaches_nobody_and_one_without_takes_event_gets_all():
    from mta.plugin.manager import Hooks
    hooks, kept, seen = Hooks(), [], []

    class Choosy:                       # like the queue traces: keeps one category
        def takes_event(self, category, level):
            return category == "queuing_engine"

        @hookimpl
        def smtpgw_event(self, category, level, message, fields):
            kept.append(message)

    hooks.register(Choosy())
    hooks.event("smtp_protocol", "minimum", "relay decision", session="S1")
    hooks.event("queuing_engine", "maximum", "queued", id="Q1")
    assert kept == ["queued"]
    assert not hooks.takes_event("smtp_protocol", "minimum")

    class All:                          # says nothing: takes everything, as before
        @hookimpl
        def smtpgw_event(self, category, level, message, fields):
            seen.append((category, message, dict(fields)))

    hooks.register(All())
    hooks.event("smtp_protocol", "minimum", "relay decision", session="S1")
    assert seen == [("smtp_protocol", "relay decision", {"session": "S1"})]
    assert kept == ["queued", "relay decision"]     # once one takes it, every listener gets it, as before


def test_auth_arguments_never_reach_the_log(tmp_path):
    site = Site(diag_settings("maximum", tmp_path / "diag.log"))
    d = Dialog(site.gateway)
    d.send(b"EHLO client.test\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    site.diag.sink.flush()
    text = (tmp_path / "diag.log").read_text()
    assert "AGFsaWNlAHNlY3JldA==" not in text and '"line": "AUTH PLAIN ***"' in text


def test_text_format_and_json_format():
    fields = {"recipient": "x@y.test", "session": "S1", "reply": "250-a\n250 b"}
    assert format_text("smtp_protocol", "minimum", "relay decision", fields) == \
        "[smtp_protocol/minimum] relay decision session=S1 recipient=x@y.test reply=250-a\\n250 b"
    record = json.loads(format_json(1.5, "ndr", "minimum", "failed report queued",
                                    {"id": "Q1", "time": "clash", "to": "a@b.test"}))
    assert record == {"time": "1970-01-01T00:00:01.500Z", "category": "ndr", "level": "minimum",
                      "message": "failed report queued", "id": "Q1", "time_": "clash", "to": "a@b.test"}
    assert iso_time(0) == "1970-01-01T00:00:00.000Z"


def test_text_file_lines_carry_time_and_ids(tmp_path):
    site = Site(diag_settings("minimum", tmp_path / "diag.log", fmt="text"))
    d = site.session()
    lines = (tmp_path / "diag.log").read_text().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"1970-01-01T00:00:00.000Z [smtp_protocol/minimum] relay decision "
                               f"session={d.protocol.session.id} recipient=x@elsewhere.test decision=deny reason=")


def test_stdout_target():
    clock = task.Clock()
    out = io.StringIO()
    sink = StdoutSink("text", clock, stream=out)
    sink.emit(2.0, "routing_engine", "medium", "hops", {"id": "Q1"})
    assert out.getvalue() == ""                             # buffered
    clock.advance(1)
    assert out.getvalue() == "1970-01-01T00:00:02.000Z [routing_engine/medium] hops id=Q1\n"


def test_syslog_target_writes_to_the_syslog_socket(tmp_path):
    """A real datagram socket where the syslog daemon's /dev/log would be."""
    address = str(tmp_path / "log")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    sink = SyslogSink("json", task.Clock(), address)
    sink.emit(0, "ndr", "minimum", "failed report queued", {"id": "Q2"})
    sink.emit(0, "smtp_protocol", "maximum", "command", {"session": "S", "line": "NOOP"})
    sink.close()
    first, second = receiver.recv(4096).decode(), receiver.recv(4096).decode()
    receiver.close()
    prefix = f"smtpgw[{os.getpid()}]: "
    assert first.startswith(f"<{2 * 8 + 5}>{prefix}") and second.startswith(f"<{2 * 8 + 7}>{prefix}")
    assert json.loads(first.split(prefix, 1)[1])["id"] == "Q2"


def test_syslog_target_without_a_syslog_daemon_says_so_once(tmp_path):
    address = str(tmp_path / "log")                      # nobody listens there (no /dev/log)
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        clock = task.Clock()
        sink = SyslogSink("text", clock, address)
        for i in range(5):
            sink.emit(0, "ndr", "minimum", f"event {i}", {})
            clock.advance(1)
        errors = [e for e in seen if "cannot write to syslog" in (e.get("log_format") or "")]
        assert len(errors) == 1 and errors[0]["address"] == address and errors[0]["why"]
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)    # the daemon comes up
        receiver.bind(address)
        sink.emit(0, "ndr", "minimum", "back", {})
        clock.advance(1)
        assert b"back" in receiver.recv(4096)
        assert [e for e in seen if "to syslog at {address} again" in (e.get("log_format") or "")]
        receiver.close()
        sink.close()
    finally:
        globalLogPublisher.removeObserver(seen.append)


def test_make_sink_defaults_to_the_daemons_log(tmp_path):
    from smtpgw_plugins.diag_logging.sinks import TwistdLogSink
    assert isinstance(make_sink({}, task.Clock()), TwistdLogSink)
    assert isinstance(make_sink({"target": "file", "path": str(tmp_path / "x")}, task.Clock()), FileSink)


def test_file_sink_failure_is_logged_not_raised(tmp_path):
    (tmp_path / "blocked").write_text("a file, not a folder")
    sink = FileSink("text", task.Clock(), str(tmp_path / "blocked" / "diag.log"))
    sink.emit(0, "ndr", "minimum", "x", {})
    sink.flush()            # the error goes to the daemon's log; the caller is not interrupted


# -- SIGHUP ------------------------------------------------------------------------------------------

def test_reload_changes_levels_without_restart(tmp_path):
    site = Site(diag_settings("none", tmp_path / "diag.log"))
    site.session()
    assert site.records() == []
    louder = with_diag(diag_settings("maximum", tmp_path / "diag.log"))
    site.gateway.hooks.reload(louder)
    site.session()
    records = site.records()
    assert (records[0]["category"], records[0]["message"]) == ("diag_logging", "levels changed")
    assert records[0]["smtp_protocol"] == "maximum"
    assert [(r["category"], r["level"], r["message"]) for r in records[1:]] == MAXIMUM
    site.gateway.hooks.reload(louder)        # no change: no line
    site.diag.sink.flush()
    assert len(site.records()) == len(records)


class ConfigReloadTest(trial.TestCase):
    """The SIGHUP target reads the file in a thread; a broken file changes nothing."""

    def setUp(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpgw-diag-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.path = self.tmp / "gateway.yaml"
        self.write("none")
        settings = diag_settings("none", self.tmp / "diag.log")
        self.gateway = FakeGateway(replace(with_diag(settings), path=str(self.path)), reactor=reactor)
        self.diag = DiagLogging()
        self.gateway.hooks.register(self.diag, name="diag_logging")     # as plugins.enabled registers it
        self.diag.smtpgw_configure(config=self.gateway.config, services=self.gateway)

    def write(self, level: str, **extra) -> None:
        data = {"gateway": {"hostname": "gw.example.test", "spool": str(self.tmp / "spool")},
                "virtual_servers": [{"name": "A", "listen": ["127.0.0.103:25"]}],
                "plugins": {"enabled": ["diag_logging"],
                            "diag_logging": {"levels": {"smtp_protocol": level}, "target": "file",
                                             "path": str(self.tmp / "diag.log"), "format": "json", **extra}}}
        self.path.write_text(yaml.safe_dump(data))

    @defer.inlineCallbacks
    def test_reload_applies_levels_and_keeps_them_on_a_bad_file(self):
        self.write("maximum")
        yield ConfigReload(self.gateway).reload(reactor)
        assert self.diag.levels["smtp_protocol"] == 3 and self.diag.levels["ndr"] == 1
        self.write("loud")
        yield ConfigReload(self.gateway).reload(reactor)
        assert self.diag.levels["smtp_protocol"] == 3
        self.flushLoggedErrors()
        yield self.diag.sink.close()


# -- configuration -----------------------------------------------------------------------------------

def plugins_config(section: dict) -> dict:
    return {"gateway": {"hostname": "gw.example.test"},
            "virtual_servers": [{"name": "A", "listen": ["127.0.0.1:25"]}],
            "plugins": {"enabled": ["diag_logging"], "diag_logging": section}}


def test_configuration_defaults():
    s = parse_config(plugins_config({})).plugins.settings["diag_logging"]
    assert (s["target"], s["path"], s["format"]) == ("log", "var/log/smtpgw-diag.log", "text")
    assert s["levels"] == {c: "minimum" for c in DIAG_CATEGORIES}
    assert {"categorizer", "transport_security"} <= set(s["levels"])


@pytest.mark.parametrize("section, message", [
    ({"target": "eventlog"}, "plugins.diag_logging.target: expected one of log, file, syslog, stdout, got 'eventlog'"),
    ({"format": "xml"}, "plugins.diag_logging.format: expected one of text, json, got 'xml'"),
    ({"levels": {"smtp_protcol": "maximum"}}, "plugins.diag_logging.levels.smtp_protcol: unknown category"),
    ({"colour": "blue"}, "plugins.diag_logging.colour: unknown key (known: format, levels, path, target)"),
    ({"path": ""}, "plugins.diag_logging.path: expected a non-empty string"),
])
def test_configuration_errors_name_the_key(section, message):
    with pytest.raises(ConfigError) as e:
        parse_config(plugins_config(section))
    assert str(e.value).startswith(message)


# -- the daemon: SIGHUP, and one transaction followed from connect to delivery ------------------------

def test_daemon_follows_a_transaction_and_obeys_sighup(gateway, tmp_path):
    from gwprocess import base_config, maildir_messages, wait_until

    log = tmp_path / "diag.jsonl"
    cfg = base_config(tmp_path, listen=f"{E2E_IP}:25")
    cfg["plugins"]["diag_logging"] = {"levels": {c: "none" for c in DIAG_CATEGORIES}, "target": "file",
                                      "path": str(log), "format": "json"}
    gw = gateway(cfg)

    def send(subject: str) -> None:
        with smtplib.SMTP(E2E_IP, 25, source_address=(CLIENT_IP, 0), timeout=10) as s:
            s.sendmail("a@remote.test", ["bob@example.test"], f"Subject: {subject}\r\n\r\nhi\r\n")

    send("quiet")
    assert wait_until(lambda: len(maildir_messages(tmp_path / "mail", "bob")) == 1)

    cfg["plugins"]["diag_logging"]["levels"] = {c: "maximum" for c in DIAG_CATEGORIES}
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)

    def records() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    assert wait_until(lambda: any(r["message"] == "levels changed" for r in records()))
    assert records()[0]["message"] == "levels changed"          # nothing was written at none
    send("loud")
    assert wait_until(lambda: any(r["message"] == "message delivered" for r in records()))
    gw.stop()
    rs = records()
    [connect] = [r for r in rs if r["message"] == "connect"]
    assert connect["peer"] == CLIENT_IP
    session = connect["session"]
    [accepted] = [r for r in rs if r["message"] == "message accepted"]
    assert accepted["session"] == session
    message_id = accepted["id"]
    trail = [(r["category"], r["message"]) for r in rs if r.get("session") == session or r.get("id") == message_id]
    assert trail[0] == ("connection_manager", "connect")
    for step in [("smtp_protocol", "command"), ("smtp_protocol", "relay decision"),
                 ("smtp_protocol", "message accepted"), ("queuing_engine", "message queued"),
                 ("categorizer", "example.test: local domain"), ("queuing_engine", "message delivered"),
                 ("connection_manager", "disconnect")]:
        assert step in trail, step
    [delivered] = [r for r in rs if r["message"] == "message delivered"]
    assert delivered["recipient"] == "bob@example.test" and delivered["level"] == "medium"
    assert os.path.getsize(log) > 0


def test_daemon_with_syslog_target_and_no_syslog_daemon_says_so_once(gateway, tmp_path):
    """``target: syslog`` where no syslog daemon listens (a container without /dev/log): the mail
    still flows, and the daemon's log says once that diagnostic lines are dropped, not per line."""
    from gwprocess import base_config, maildir_messages, wait_until

    missing = tmp_path / "no-syslog" / "log"
    cfg = base_config(tmp_path, listen=f"{E2E_IP}:25")
    cfg["plugins"]["diag_logging"] = {"levels": {c: "maximum" for c in DIAG_CATEGORIES}, "target": "syslog",
                                      "path": str(missing)}
    gw = gateway(cfg)
    for i in range(3):
        with smtplib.SMTP(E2E_IP, 25, source_address=(CLIENT_IP, 0), timeout=10) as s:
            s.sendmail("a@remote.test", ["bob@example.test"], f"Subject: {i}\r\n\r\nhi\r\n")
        assert wait_until(lambda: len(maildir_messages(tmp_path / "mail", "bob")) == i + 1)
    assert wait_until(lambda: "cannot write to syslog" in gw.log())
    gw.stop()
    lines = [line for line in gw.log().splitlines() if "cannot write to syslog" in line]
    assert len(lines) == 1, lines
    assert f"at {missing} (No such file or directory); diagnostic lines are dropped until it can" in lines[0]
