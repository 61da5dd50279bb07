"""The test peer itself, driven by smtplib and raw sockets (so client tests can trust it)."""
from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from peers import SMTPPeer, free_port      # tests/ is on sys.path (conftest.py)

HOST = "127.0.0.30"


@pytest.fixture
def peer():
    with SMTPPeer(HOST) as p:
        yield p


def raw_dialog(payload: bytes, expect_lines: int, host: str = HOST, port: int = 25) -> list[bytes]:
    """Send ``payload`` in one write after the greeting and read ``expect_lines`` reply lines."""
    with socket.create_connection((host, port), timeout=5) as s:
        f = s.makefile("rb")
        greeting = f.readline()
        s.sendall(payload)
        return [greeting] + [f.readline() for _ in range(expect_lines)]


def test_smtplib_delivery_records_message(peer):
    with smtplib.SMTP(HOST, 25, local_hostname="client.test") as c:
        c.sendmail("a@x.test", ["b@y.test", "c@y.test"], b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n")
    assert peer.wait_for(1)
    m = peer.messages[0]
    assert (m.sender, m.recipients, m.helo, m.peer_ip) == ("a@x.test", ["b@y.test", "c@y.test"],
                                                           "client.test", "127.0.0.1")
    assert m.data == b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n"
    assert b"..leading dot" in peer.transcript
    assert peer.connections == 1


def test_pipelined_commands_and_two_transactions(peer):
    payload = (b"EHLO c.test\r\nMAIL FROM:<a@x.test> SIZE=10\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"
               b"..x\r\n.\r\nMAIL FROM:<>\r\nRCPT TO:<c@y.test>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n")
    lines = raw_dialog(payload, 5 + 4 + 4 + 1)
    assert lines[0].startswith(b"220 ")
    assert lines[-1].startswith(b"221 ")
    assert peer.wait_for(2)
    assert [m.data for m in peer.messages] == [b".x\r\n", b"hi\r\n"]
    assert peer.messages[0].mail_params == "SIZE=10"
    assert peer.messages[1].sender == ""


def test_rset_ends_transaction(peer):
    lines = raw_dialog(b"HELO c\r\nMAIL FROM:<a@x>\r\nRSET\r\nRCPT TO:<b@y>\r\n", 4)
    assert [l[:3] for l in lines] == [b"220", b"250", b"250", b"250", b"503"]


def test_set_reply_callable_and_reset(peer):
    peer.set_reply("rcpt", lambda r: "550 5.1.1 unknown" if r.startswith("bad") else None)
    with smtplib.SMTP(HOST, 25) as c:
        refused = c.sendmail("a@x.test", ["good@y.test", "bad@y.test"], b"x\r\n")
    assert refused == {"bad@y.test": (550, b"5.1.1 unknown")}
    assert peer.wait_for(1)
    assert peer.messages[0].recipients == ["good@y.test"]
    peer.set_reply("rcpt", None)
    with smtplib.SMTP(HOST, 25) as c:
        assert c.sendmail("a@x.test", ["bad@y.test"], b"x\r\n") == {}


def test_dot_reply_rejects_message(peer):
    peer.set_reply("dot", "554 5.7.1 spam")
    with smtplib.SMTP(HOST, 25) as c:
        with pytest.raises(smtplib.SMTPDataError):
            c.sendmail("a@x.test", ["b@y.test"], b"x\r\n")
    assert peer.messages == []


def test_greeting_421_closes(peer):
    peer.set_reply("connect", "421 4.3.2 go away")
    lines = raw_dialog(b"", 1)
    assert lines[0].startswith(b"421 4.3.2")
    assert lines[1] == b""


def test_greeting_554_waits_for_quit(peer):
    peer.set_reply("connect", "554 5.7.1 no")
    lines = raw_dialog(b"EHLO c\r\nQUIT\r\n", 2)
    assert [l[:3] for l in lines] == [b"554", b"503", b"221"]


def test_size_limit_enforced():
    with SMTPPeer(HOST, extensions=("SIZE 10",)) as p:
        lines = raw_dialog(b"EHLO c\r\nMAIL FROM:<a@x> SIZE=11\r\n", 3)
    assert lines[-1].startswith(b"552 5.3.4")


def test_refuse_connections(peer):
    peer.refuse_connections()
    with socket.create_connection((HOST, 25), timeout=5) as s:
        assert s.recv(100) == b""


def test_free_port_is_refused():
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, free_port(HOST)), timeout=5)


def test_starttls(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("peer.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with SMTPPeer(HOST, extensions=("STARTTLS", "PIPELINING"), tls_context=server_ctx) as p:
        with smtplib.SMTP(HOST, 25) as c:
            c.starttls(context=_named(client_ctx))
            c.sendmail("a@x.test", ["b@y.test"], b"secret\r\n")
        assert p.wait_for(1)
        assert p.messages[0].tls is True


def _named(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.check_hostname = False       # smtplib passes the connect host (an IP) as server_hostname
    return ctx
