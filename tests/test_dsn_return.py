"""What a DSN returns of the original message: RFC 3461 RET, Postfix's default (the whole message in a
failure report, headers in a delay notice), the size cap, and 8-bit content in message/rfc822."""
from __future__ import annotations

from dataclasses import replace

import pytest

from mta.config import Connector, ContentRestrictions, Limits, ListenAddress, VirtualServer
from mta.dsn.reports import RETURN_LIMIT, build_dsn, size_cap
from mta.queue.manager import deletion_report
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.smtp.reply import Reply
from tests.test_dsn import ORIGINAL, assert_wire_safe, config, entry, parse

FAILURE = Reply(550, "5.1.1", "User unknown")


def report(original: bytes = ORIGINAL, action: str = "failed", cfg=None, **extra) -> bytes:
    e = entry(**extra)
    return build_dsn(cfg or config(), e, [(e.rcpts[0], FAILURE)], action, original, now=1_700_000_600.0)


def parts(data: bytes) -> list:
    return list(parse(data).iter_parts())


def human(data: bytes) -> str:
    return parts(data)[0].get_content()


def with_limits(vs_limit: int | None = None, connector_limit: int | None = None):
    cfg = config()
    vss = (VirtualServer("vs", (ListenAddress("127.0.0.1", 25),), limits=Limits(max_message_size=vs_limit)),) \
        if vs_limit else ()
    connectors = (Connector("c", content_restrictions=ContentRestrictions(max_message_size=connector_limit)),) \
        if connector_limit else ()
    return replace(cfg, virtual_servers=vss, connectors=connectors)


def big_message(size: int) -> bytes:
    head = b"From: alice@client.test\r\nSubject: big\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * ((size - len(head)) // len(line) + 1)


def test_no_ret_returns_the_whole_message_like_postfix():
    data = report()
    assert_wire_safe(data)
    assert [p.get_content_type() for p in parts(data)] == ["text/plain", "message/delivery-status",
                                                           "message/rfc822"]
    returned = parts(data)[2]
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "quarterly numbers"
    assert inner.get_payload() == "Body that must not be returned.\r\n"
    assert ORIGINAL in data                         # byte for byte
    assert parse(data)["Content-Transfer-Encoding"] == "7bit"
    assert "returned below in full" in human(data)


@pytest.mark.parametrize("ret,kind", [("FULL", "message/rfc822"), ("full", "message/rfc822"),
                                      ("HDRS", "text/rfc822-headers"), ("Hdrs", "text/rfc822-headers")])
def test_ret_parameter_decides(ret, kind):
    data = report(mail_params={"RET": ret, "ENVID": "x"})
    assert parts(data)[2].get_content_type() == kind
    assert (b"Body that must not be returned" in data) == (kind == "message/rfc822")


def test_ret_hdrs_note_does_not_claim_a_size_problem():
    text = human(report(mail_params={"RET": "HDRS"}))
    assert "The headers of the message are returned below." in text
    assert "larger" not in text


def test_delay_notice_returns_headers_even_with_ret_full():
    data = report(action="delayed", mail_params={"RET": "FULL"})
    assert parts(data)[2].get_content_type() == "text/rfc822-headers"
    assert b"Body that must not be returned" not in data


def test_over_the_return_limit_only_headers_and_the_note_says_so():
    original = big_message(RETURN_LIMIT + 1)
    data = report(original, mail_params={"RET": "FULL"})
    assert parts(data)[2].get_content_type() == "text/rfc822-headers"
    assert len(data) < 10_000
    assert f"larger than the {RETURN_LIMIT} bytes" in " ".join(human(data).split())
    small = report(big_message(RETURN_LIMIT - 2000))
    assert parts(small)[2].get_content_type() == "message/rfc822"
    assert RETURN_LIMIT - 2000 <= len(small) < RETURN_LIMIT + 5000


@pytest.mark.parametrize("cfg", [with_limits(vs_limit=20_000), with_limits(connector_limit=20_000),
                                 with_limits(vs_limit=10**7, connector_limit=20_000)])
def test_report_never_exceeds_the_smallest_message_size_limit(cfg):
    assert size_cap(cfg) == 20_000
    for size in (18_700, 19_950, 25_000):           # the first two fit alone, not with the report around them
        data = report(big_message(size), cfg=cfg)
        assert len(data) <= 20_000
        assert parts(data)[2].get_content_type() == "text/rfc822-headers"
        assert "20000 bytes" in " ".join(human(data).split())
    fits = report(big_message(15_000), cfg=cfg)
    assert parts(fits)[2].get_content_type() == "message/rfc822" and len(fits) <= 20_000


def test_eight_bit_message_is_returned_as_8bit_message_rfc822():
    original = "From: jörg@client.test\r\nSubject: Grüße\r\n\r\nMit freundlichen Grüßen\r\n".encode()
    data = report(original)
    msg = parse(data)
    assert msg["Content-Transfer-Encoding"] == "8bit"             # the report may not claim 7bit
    returned = list(msg.iter_parts())[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert original in data
    # everything but the returned message stays 7-bit, CRLF, short lines
    assert_wire_safe(data.replace(original, b""))


def test_nul_or_overlong_line_means_headers_only():
    for original in (b"Subject: a\r\n\r\nNUL\x00here\r\n", b"Subject: a\r\n\r\n" + b"y" * 1200 + b"\r\n"):
        data = report(original)
        assert parts(data)[2].get_content_type() == "text/rfc822-headers"
        assert_wire_safe(data)
        assert "998 bytes" in " ".join(human(data).split())


def test_administrator_deletion_report_returns_the_message():
    e = QueueEntry(id="0003", sender="alice@client.test", rcpts=[RecipientState("bob@far.test")],
                   received_at=0.0, size=len(ORIGINAL))
    to, data, _ = deletion_report(config(), e, ORIGINAL, 1_700_000_000.0)
    assert to == "alice@client.test"
    assert parts(data)[2].get_content_type() == "message/rfc822"
    assert ORIGINAL in data
