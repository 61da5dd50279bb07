"""Log events rendered once (``mta.io.rendered_log``): twistd's file observer writes them itself, and
the bytes must be exactly the ones Twisted's own formatting writes for the same event (the mail
log's lines are read by tools). End to end, tests/test_mail_log.py reads them in twistd.log."""
from __future__ import annotations

import io

from twisted.logger import LogPublisher, Logger, textFileLogObserver

from mta.io import rendered_log

LINES = ["0123ABCD: to=<a@b.test>, relay=mx.b.test[192.0.2.1]:25, delay=1.2, delays=0.1/0/0.5/0.6, "
         "dsn=2.0.0, status=sent (250 2.0.0 Ok {queued} as 42)",
         "NOQUEUE: reject: RCPT from unknown[192.0.2.7]: 550 5.7.1 Relaying denied; from=<c@d.test> proto=ESMTP",
         "a line\nwith a line feed", "{"]


def written(install: bool, time_format: str = "%Y-%m-%dT%H:%M:%S%z") -> tuple[str, int]:
    """What a twistd-style file observer writes for LINES (then one ordinary event) at fixed times."""
    out = io.StringIO()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out, timeFormat=time_format))
    changed = rendered_log.install(publisher) if install else 0
    events: list[dict] = []
    log = Logger(namespace="smtpgw.mail", observer=events.append)
    for text in LINES:
        rendered_log.emit(log, text, mail_event="delivery")
    log.info("plain {n}", n=1)                              # not rendered: Twisted's way
    for i, event in enumerate(events):
        publisher(dict(event, log_time=1.7e9 + i * 0.6))
    return out.getvalue(), changed


def test_rendered_lines_are_twisteds_bytes():
    fast, changed = written(install=True)
    plain, _ = written(install=False)
    assert changed == 1
    assert fast == plain
    assert "[smtpgw.mail#info] 0123ABCD: to=<a@b.test>," in fast
    assert "(250 2.0.0 Ok {queued} as 42)\n" in fast
    assert "a line\n\twith a line feed\n" in fast
    assert fast.rstrip().endswith("[smtpgw.mail#info] plain 1")


def test_sub_second_stamps_keep_twisteds_way():
    # a format with fractions of a second cannot be rendered once per second: left alone
    fast, changed = written(install=True, time_format="%H:%M:%S.%f")
    plain, _ = written(install=False, time_format="%H:%M:%S.%f")
    assert changed == 0
    assert fast == plain


class _Reactor:
    """What DelayedFlushFile uses of the reactor: a clock, ``running`` and the shutdown trigger."""

    def __init__(self) -> None:
        from twisted.internet import task
        self.clock = task.Clock()
        self.callLater = self.clock.callLater
        self.running = True
        self.triggers: list = []

    def addSystemEventTrigger(self, phase, event, fn) -> None:
        self.triggers.append(fn)


class _CountingFile(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: str) -> int:
        self.writes += 1
        return super().write(data)


def test_lines_leave_in_one_write_after_the_delay():
    reactor, out = _Reactor(), _CountingFile()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out))
    assert rendered_log.install(publisher, reactor=reactor) == 1
    log = Logger(namespace="smtpgw.mail", observer=publisher)
    for text in LINES:
        rendered_log.emit(log, text, batched=True)
    assert out.getvalue() == "" and out.writes == 0           # kept, not one write per line
    reactor.clock.advance(rendered_log.FLUSH_DELAY)
    assert out.writes == 1 and out.getvalue().count("[smtpgw.mail#info]") == len(LINES)
    reactor.running = False                                   # after shutdown: written at once
    rendered_log.emit(log, "late line", batched=True)
    assert out.writes == 2 and out.getvalue().endswith("late line\n")


def test_a_line_not_batched_is_written_at_once_after_those_waiting():
    reactor, out = _Reactor(), _CountingFile()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out))
    rendered_log.install(publisher, reactor=reactor)
    log = Logger(namespace="smtpgw.mail", observer=publisher)
    rendered_log.emit(log, LINES[1], batched=True)
    Logger(namespace="smtpgw.console", observer=publisher).info("console: admin logged in")
    assert out.writes == 1
    assert out.getvalue().index("NOQUEUE: reject") < out.getvalue().index("console: admin logged in")


def test_the_shutdown_trigger_writes_what_waits():
    reactor, out = _Reactor(), _CountingFile()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out))
    rendered_log.install(publisher, reactor=reactor)
    rendered_log.emit(Logger(namespace="smtpgw.mail", observer=publisher), LINES[0], batched=True)
    for trigger in reactor.triggers:
        trigger()
    assert out.getvalue().rstrip().endswith("status=sent (250 2.0.0 Ok {queued} as 42)")



def test_the_file_observer_alone_gets_the_line_directly_with_the_same_bytes(monkeypatch):
    reactor, out = _Reactor(), _CountingFile()
    publisher = LogPublisher()
    publisher.addObserver(textFileLogObserver(out))
    rendered_log.install(publisher, reactor=reactor)
    times = iter([1.7e9 + i * 0.6 for i in range(len(LINES) + 1)])
    monkeypatch.setattr(rendered_log.time, "time", lambda: next(times))
    seen: list[dict] = []
    publisher.addObserver(seen.append)           # a second observer: the ordinary event again
    log = Logger(namespace="smtpgw.mail", observer=publisher)
    rendered_log.emit(log, LINES[0], batched=True, mail_event="delivery")
    assert [e["mail_event"] for e in seen] == ["delivery"]
    publisher.removeObserver(seen.append)        # the file observer alone: written directly
    for text in LINES:
        rendered_log.emit(log, text, batched=True, mail_event="delivery")
    assert len(seen) == 1 and out.writes == 0
    reactor.clock.advance(rendered_log.FLUSH_DELAY)
    assert out.writes == 1
    monkeypatch.undo()
    # Twisted's own observer, given the ordinary events at the same times, writes the same bytes
    plain = io.StringIO()
    events: list[dict] = []
    plain_log = Logger(namespace="smtpgw.mail", observer=events.append)
    for i, text in enumerate([LINES[0], *LINES]):
        rendered_log.emit(plain_log, text)
        events[-1]["log_time"] = 1.7e9 + i * 0.6
    observer = textFileLogObserver(plain)
    for event in events:
        observer(event)
    assert out.getvalue() == plain.getvalue()
