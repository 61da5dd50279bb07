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
