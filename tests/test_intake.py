"""The intake gate (mta/smtp/server/intake.py): a MAIL waits, unanswered, while the process has its
limit of open transactions, and is answered as soon as one closes, or after the longest wait."""
from __future__ import annotations

from mta.smtp.server import intake
from mta.smtp.server.session import SMTPServerFactory

from tests.server_fakes import Code, Dialog, FakeGateway

MESSAGE = b"Subject: t\r\n\r\nhello\r\n"
MAIL = b"MAIL FROM:<sender@remote.test>\r\n"


def two_sessions(limit: int = 1) -> tuple[FakeGateway, Dialog, Dialog]:
    gateway = FakeGateway()
    gateway.intake = intake.Intake(gateway.reactor, limit=limit)
    factory = SMTPServerFactory(gateway, gateway.config.virtual_servers[0])
    first, second = Dialog(gateway, factory), Dialog(gateway, factory)
    first.ehlo()
    second.ehlo()
    return gateway, first, second


def test_mail_waits_until_a_transaction_ends():
    gateway, first, second = two_sessions()
    assert first.codes(MAIL) == [Code.OK]
    assert second.send(MAIL) == [] and second.paused
    assert second.codes(b"NOOP\r\n") == []              # input stays in order behind the MAIL
    assert first.codes(b"RSET\r\n") == [Code.OK]
    gateway.reactor.advance(0)
    assert [a.code for a in second.read()] == [Code.OK, Code.OK]
    assert not second.paused
    assert first.send(MAIL) == []                       # now the second one holds the room


def test_other_commands_are_not_held():
    _, first, second = two_sessions()
    assert first.codes(MAIL) == [Code.OK]
    assert second.codes(b"NOOP\r\nHELP\r\n") == [Code.OK, Code.HELP]


def test_transaction_stays_open_until_its_message_is_queued():
    gateway, first, second = two_sessions()
    gateway.queue.hold = True
    first.start_transaction()
    assert first.send(MESSAGE + b".\r\n") == []
    assert second.send(MAIL) == []
    gateway.reactor.advance(0)
    assert second.read() == []
    gateway.queue.submitted[0].answer.callback("QID1")
    assert [a.code for a in first.read()] == [Code.OK]
    gateway.reactor.advance(0)
    assert [a.code for a in second.read()] == [Code.OK]


def test_refused_message_and_lost_connection_close_the_transaction():
    gateway, first, second = two_sessions(limit=2)
    first.start_transaction()
    assert first.codes(b"Received: x\r\n" * 31 + MESSAGE + b".\r\n")[0] >= 500    # too many hops
    assert second.codes(MAIL) == [Code.OK]
    assert gateway.intake.open == 1
    second.protocol.connectionLost(None)
    assert gateway.intake.open == 0


def test_a_mail_waits_no_longer_than_max_wait():
    gateway, first, second = two_sessions()
    assert first.codes(MAIL) == [Code.OK]
    assert second.send(MAIL) == []
    for _ in range(int(intake.MAX_WAIT) - 1):
        gateway.reactor.advance(1)
    assert second.read() == []
    gateway.reactor.advance(1)
    assert [a.code for a in second.read()] == [Code.OK]
    assert gateway.intake.open == 2 and gateway.intake.waiting == 0


def test_closed_connection_leaves_the_queue_of_waiters():
    gateway, first, second = two_sessions()
    third = Dialog(gateway, first.factory)
    third.ehlo()
    assert first.codes(MAIL) == [Code.OK]
    assert second.send(MAIL) == [] and third.send(MAIL) == []
    second.protocol.connectionLost(None)
    assert first.codes(b"RSET\r\n") == [Code.OK]
    gateway.reactor.advance(0)
    assert second.read() == []
    assert [a.code for a in third.read()] == [Code.OK]
    assert gateway.intake.open == 1
