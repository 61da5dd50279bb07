"""The gateway's budget for message bytes held in memory while received (``gateway.message_memory``):
the budget itself, the server over an in-memory transport (DATA and BDAT), and the real daemon."""
from __future__ import annotations

import smtplib
import socket

import pytest

from gwprocess import base_config, wait_until
from mta.plugin.hookspecs import hookimpl
from mta.smtp.server.message_memory import MessageMemory, recipient_cost
from mta.smtp.reply import Reply
from mta.smtp.server.session import SMTPServerFactory
from server_fakes import Code, Dialog, FakeGateway

KB = 1024
ENVELOPE = b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\n"
RCPT = recipient_cost("TO:<u@example.test>", 0)      # what its one recipient holds
TXN = recipient_cost("TO:<user@example.test>", 0)    # the recipient of Dialog.start_transaction


def body(size: int, mark: bytes = b"x") -> bytes:
    """``size`` bytes of 100-byte CRLF lines (no dots, so stored as sent)."""
    lines, rest = divmod(size, 100)
    return (mark * 98 + b"\r\n") * lines + (mark * (rest - 2) + b"\r\n" if rest else b"")


def bdat(payload: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(payload), b" LAST" if last else b"") + payload


def status(answer) -> tuple[int, str]:
    return answer.code, answer.lines[-1].split(" ", 1)[0]


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    @hookimpl
    def smtpgw_event(self, category, level, message, fields):
        self.seen.append((message, fields))


def budget_gateway(limit: int) -> tuple[FakeGateway, MessageMemory, SMTPServerFactory]:
    gw = FakeGateway()
    memory = gw.message_memory = MessageMemory(limit)
    return gw, memory, SMTPServerFactory(gw, gw.config.virtual_servers[0])


INSUFFICIENT = (Code.INSUFFICIENT_STORAGE, "4.3.1")


# -- the budget ----------------------------------------------------------------------------------

def test_reserve_within_the_limit_and_refuse_past_it():
    m = MessageMemory(100)
    assert m.reserve(60) and m.held == 60 and m.free == 40
    assert not m.reserve(41) and m.held == 60 and m.refusals == 1
    assert m.reserve(40) and m.free == 0
    m.release(100)
    assert m.held == 0 and m.free == 100


def test_release_never_goes_negative():
    m = MessageMemory(10)
    m.release(5)
    assert m.held == 0 and m.free == 10


def test_one_budget_per_gateway_from_the_configuration():
    gw = FakeGateway()
    memory = gw.message_memory
    assert memory.limit == gw.config.gateway.message_memory == 256 * KB * KB
    a = SMTPServerFactory(gw, gw.config.virtual_servers[0])
    b = SMTPServerFactory(gw, gw.config.virtual_servers[0])
    assert a.memory is b.memory is memory


def test_with_several_workers_each_takes_its_share():
    from mta.workers.identity import WorkerInfo

    gw = FakeGateway()
    assert MessageMemory.for_worker(gw.config.gateway.message_memory, WorkerInfo(index=1, count=3)).limit \
        == -(-256 * KB * KB // 3)


# -- DATA ----------------------------------------------------------------------------------------

def test_second_session_past_the_budget_gets_452_then_a_third_gets_through():
    gw, memory, factory = budget_gateway(64 * KB)
    events = Events()
    gw.hooks.register(events)
    first, second = Dialog(gw, factory), Dialog(gw, factory)
    message = body(50 * KB)
    first.start_transaction()
    assert first.send(message) == []
    assert memory.held == len(message) + TXN
    second.start_transaction()
    for piece in range(0, len(message), 10000):         # refused at its second piece; read on all the same
        assert second.send(message[piece:piece + 10000]) == []
        assert memory.held == len(message) + TXN + (10000 + TXN if piece == 0 else 0)
    [answer] = second.send(b".\r\n")
    assert status(answer) == INSUFFICIENT
    assert answer.lines[-1] == "4.3.1 Insufficient system storage"
    assert any(m == "message memory full" for m, _ in events.seen)
    assert second.codes(b"RCPT TO:<u@example.test>\r\n") == [Code.BAD_SEQUENCE]   # transaction reset
    [answer] = first.send(b".\r\n")
    assert answer.code == Code.OK and memory.held == 0
    assert first.submitted[0].message.endswith(message)
    third = Dialog(gw, factory)
    third.start_transaction()
    assert third.codes(message + b".\r\n") == [Code.OK]
    assert memory.held == 0 and len(gw.queue.submitted) == 2


def test_the_refused_session_can_send_again_once_memory_is_free():
    gw, memory, factory = budget_gateway(64 * KB)
    first, second = Dialog(gw, factory), Dialog(gw, factory)
    first.start_transaction()
    first.send(body(50 * KB))
    second.start_transaction()
    assert [status(a) for a in second.send(body(50 * KB) + b".\r\n")] == [INSUFFICIENT]
    assert first.codes(b".\r\n") == [Code.OK]
    assert second.codes(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n") == [
        Code.OK, Code.OK, Code.START_INPUT]
    assert second.codes(body(50 * KB) + b".\r\n") == [Code.OK]


def mid_message(size: int) -> tuple[MessageMemory, "Dialog"]:
    """A session of a 64 KB budget that has sent ``size`` bytes of its message, all of them held."""
    gw, memory, factory = budget_gateway(64 * KB)
    d = Dialog(gw, factory)
    d.start_transaction()
    d.send(body(size))
    assert memory.held == size + TXN
    return memory, d


def test_connection_lost_mid_data_gives_the_memory_back():
    memory, d = mid_message(30 * KB)
    d.protocol.connectionLost(None)
    assert memory.held == 0


def test_memory_is_held_until_the_queue_has_the_message():
    gw, memory, factory = budget_gateway(64 * KB)
    gw.queue.hold = True
    d = Dialog(gw, factory)
    d.start_transaction()
    assert d.send(body(20 * KB) + b".\r\n") == []
    assert memory.held == 20 * KB + TXN
    d.protocol.connectionLost(None)         # the spool write goes on: the bytes are still in memory
    assert memory.held == 20 * KB + TXN
    d.submitted[0].answer.callback("Q1")
    assert memory.held == 0


def test_a_message_refused_for_content_gives_its_memory_back_at_once():
    memory, d = mid_message(10 * KB)
    d.send(b"bare\nLF\r\n" + body(10 * KB))
    assert memory.held == 0
    assert d.codes(b".\r\n") == [Code.MAILBOX_UNAVAILABLE]


def test_a_message_the_data_hook_refuses_gives_its_memory_back():
    class Refuse:
        @hookimpl
        def smtpgw_data(self, message):
            return Reply(550, "5.7.1", "no thanks")

    gw, memory, factory = budget_gateway(64 * KB)
    gw.hooks.register(Refuse())
    d = Dialog(gw, factory)
    d.start_transaction()
    assert d.codes(body(10 * KB) + b".\r\n") == [Code.MAILBOX_UNAVAILABLE]
    assert memory.held == 0


def test_declared_size_over_the_free_room_gets_452_at_data():
    gw, memory, factory = budget_gateway(64 * KB)
    holder, d = Dialog(gw, factory), Dialog(gw, factory)
    holder.start_transaction()
    holder.send(body(40 * KB))
    answers = d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test> SIZE=30000\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    assert [a.code for a in answers[:3]] == [Code.OK] * 3 and status(answers[3]) == INSUFFICIENT
    assert d.codes(b"RCPT TO:<u@example.test>\r\n") == [Code.BAD_SEQUENCE]     # the transaction is reset
    assert d.codes(b"MAIL FROM:<a@remote.test> SIZE=20000\r\nRCPT TO:<u@example.test>\r\nDATA\r\n") == [
        Code.OK, Code.OK, Code.START_INPUT]
    assert memory.held == 40 * KB + TXN + RCPT


def test_declared_size_over_the_whole_budget_is_refused_before_any_byte():
    gw, memory, factory = budget_gateway(64 * KB)
    d = Dialog(gw, factory)
    answers = d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test> SIZE=100000\r\nRCPT TO:<u@example.test>\r\nDATA\r\n")
    assert status(answers[-1]) == INSUFFICIENT and memory.refusals == 1


# -- the envelope ------------------------------------------------------------------------------------

def test_recipients_count_against_the_memory_and_past_it_get_452():
    gw, memory, factory = budget_gateway(4 * KB)
    d = Dialog(gw, factory)
    d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\n")
    args = [f"TO:<u{i}@example.test> NOTIFY=SUCCESS ORCPT=rfc822;{'x' * 400}" for i in range(6)]
    costs = [recipient_cost(a, 2) for a in args]
    fit = max(n for n in range(len(costs) + 1) if sum(costs[:n]) <= memory.limit)
    assert 0 < fit < len(args)
    answers = d.send("".join(f"RCPT {a}\r\n" for a in args).encode())
    assert [status(a) for a in answers] == [(Code.OK, "2.1.5")] * fit + [INSUFFICIENT] * (len(args) - fit)
    assert memory.held == sum(costs[:fit])
    assert d.codes(b"RCPT TO:<u0@example.test>\r\n") == [Code.OK]    # already counted: no second charge
    assert memory.held == sum(costs[:fit])
    assert d.codes(b"RSET\r\n") == [Code.OK] and memory.held == 0


def test_the_envelope_is_held_until_the_queue_has_the_message():
    gw, memory, factory = budget_gateway(64 * KB)
    gw.queue.hold = True
    d = Dialog(gw, factory)
    d.send(ENVELOPE + b"RCPT TO:<v@example.test> NOTIFY=NEVER\r\nDATA\r\n")
    assert memory.held == RCPT + recipient_cost("TO:<v@example.test> NOTIFY=NEVER", 1)
    d.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert memory.held > 0
    d.submitted[0].answer.callback("Q1")
    assert memory.held == 0


# -- BDAT ----------------------------------------------------------------------------------------

def test_bdat_chunk_past_the_budget_is_read_off_and_answered_452():
    gw, memory, factory = budget_gateway(64 * KB)
    first, second = Dialog(gw, factory), Dialog(gw, factory)
    first.send(ENVELOPE)
    assert first.codes(bdat(body(50 * KB))) == [Code.OK]
    assert memory.held == 50 * KB + RCPT
    second.send(ENVELOPE)
    assert second.codes(bdat(body(10 * KB))) == [Code.OK]
    chunk = body(20 * KB)
    assert second.send(bdat(chunk)[:12 * KB]) == []
    assert memory.held == 50 * KB + RCPT      # refused mid-chunk: released at once
    answers = second.send(bdat(chunk)[12 * KB:] + b"NOOP\r\n")
    assert [status(a) for a in answers] == [INSUFFICIENT, (Code.OK, "2.0.0")]   # octets counted off
    assert first.codes(bdat(b"", last=True)) == [Code.OK] and memory.held == 0
    assert second.codes(ENVELOPE[len(b"EHLO client.test\r\n"):] + bdat(chunk, last=True)) == [
        Code.OK, Code.OK, Code.OK]


def test_bdat_declared_size_over_the_free_room_is_refused_at_the_first_chunk():
    gw, memory, factory = budget_gateway(64 * KB)
    d = Dialog(gw, factory)
    d.send(b"EHLO c\r\nMAIL FROM:<a@remote.test> SIZE=70000\r\nRCPT TO:<u@example.test>\r\n")
    answers = d.send(bdat(body(1 * KB), last=True) + b"NOOP\r\n")
    assert [status(a) for a in answers] == [INSUFFICIENT, (Code.OK, "2.0.0")]
    assert memory.held == 0 and d.submitted == []


def test_bdat_connection_lost_between_and_inside_chunks():
    gw, memory, factory = budget_gateway(64 * KB)
    a, b = Dialog(gw, factory), Dialog(gw, factory)
    a.send(ENVELOPE + bdat(body(10 * KB)))
    b.send(ENVELOPE + bdat(body(10 * KB)) + bdat(body(10 * KB))[:5 * KB])
    assert memory.held == 10 * KB + 10 * KB + 5 * KB - len(b"BDAT 10240\r\n") + 2 * RCPT
    a.protocol.connectionLost(None)
    assert memory.held == 15 * KB - len(b"BDAT 10240\r\n") + RCPT
    b.protocol.connectionLost(None)
    assert memory.held == 0


def test_rset_between_chunks_releases():
    gw, memory, factory = budget_gateway(64 * KB)
    d = Dialog(gw, factory)
    d.send(ENVELOPE + bdat(body(10 * KB)))
    assert memory.held == 10 * KB + RCPT
    assert d.codes(b"RSET\r\n") == [Code.OK] and memory.held == 0


# -- the real daemon -----------------------------------------------------------------------------

GW_HOST, GW_PORT = "127.0.0.170", 2525
PEER = "127.0.0.171"


def read_reply(sock: socket.socket) -> bytes:
    data = b""
    while not (data.endswith(b"\r\n") and data.split(b"\r\n")[-2][3:4] == b" "):
        more = sock.recv(4096)
        if not more:
            break
        data += more
    return data


def test_e2e_a_message_past_the_memory_is_452_then_its_retry_arrives(gateway, tmp_path, peers):
    peer = peers(PEER)
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["gateway"]["message_memory"] = "64KB"
    cfg["virtual_servers"][0].setdefault("limits", {})["max_message_size"] = "60KB"
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    gateway(cfg)
    held = body(50 * KB, b"h")
    msg = b"From: a@sender.test\r\nTo: b@remote.test\r\nSubject: retried\r\n\r\n" + body(50 * KB, b"r")
    with socket.create_connection((GW_HOST, GW_PORT), timeout=30) as first:
        read_reply(first)
        for line in (b"EHLO c.test", b"MAIL FROM:<a@sender.test>", b"RCPT TO:<b@remote.test>", b"DATA"):
            first.sendall(line + b"\r\n")
            assert read_reply(first)[:1] in (b"2", b"3")
        first.sendall(b"Subject: held open\r\n\r\n" + held)        # the message stays open mid-DATA
        with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("a@sender.test", ["b@remote.test"], msg)
        assert refused.value.smtp_code == 452 and refused.value.smtp_error.startswith(b"4.3.1")
        first.sendall(b".\r\n")
        assert read_reply(first).startswith(b"250 ")
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("a@sender.test", ["b@remote.test"], msg)      # the client's retry
    assert peer.wait_for(2, timeout=30)
    assert wait_until(lambda: any(m.data.endswith(msg) for m in peer.messages))
