"""Protocol strictness that protects others, against the real daemon over loopback: the EHLO/HELO
argument (RFC 5321 4.1.1.1) and what ``Received:`` records of it, input pipelined after DATA before
its 354 (RFC 2920 3.1; Postfix 3.9's smtpd_forbid_unauth_pipelining), and HELP's list.

Addresses: 127.0.0.200:2525 belongs to this module (HELP with TLS is in tests/test_tls_e2e.py).
"""
from __future__ import annotations

import email
import hashlib
import socket

import pytest

from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until

GW = ("127.0.0.200", 2525)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("strict")
    cfg = base_config(tmp, listen=f"{GW[0]}:{GW[1]}")
    cfg["plugins"]["diag_logging"] = {"levels": {"smtp_protocol": "minimum"}}
    process = GatewayProcess(tmp, cfg)
    try:
        process.start()
        yield process
    finally:
        process.stop()


class Client:
    """A raw SMTP client: what we write goes out exactly as written, in one write."""

    def __init__(self) -> None:
        self.sock = socket.create_connection(GW, timeout=30)
        self.file = self.sock.makefile("rb")
        assert self.reply()[0].startswith(b"220 ")

    def reply(self) -> list[bytes]:
        lines = []
        while True:
            line = self.file.readline()
            assert line, f"connection closed after {lines!r}"
            lines.append(line)
            if line[3:4] != b"-":
                return lines

    def ask(self, data: bytes) -> list[bytes]:
        self.sock.sendall(data)
        return self.reply()

    def closed(self) -> bool:
        """The server closed the connection (EOF, no more replies)."""
        return self.file.readline() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


BAD_NAMES = [b"evil.test (forged) by mx.google.com", b"x;y", "caf\u00e9.example".encode(), b"\xff\xfe.test",
             b"[300.1.1.1]", b"[IPv6:zz::1]", b"-lead.test", b"a..b", b"<host>", b"a" * 64 + b".test"]


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_helo_argument_is_refused(gw, verb, name):
    c = Client()
    try:
        answer = c.ask(verb + b" " + name + b"\r\n")
        if name.startswith(b"\xff"):     # not UTF-8 at all: refused as a command before its argument is read
            assert answer[0].startswith(b"500 5.5.2 "), answer
        else:
            assert answer == [b"501 5.5.2 Syntax: EHLO/HELO needs a domain name or an address literal "
                              b"(mail.example.com, [192.0.2.1], [IPv6:2001:db8::1])\r\n"]
        # the session is still waiting for a proper greeting
        assert c.ask(b"MAIL FROM:<a@sender.test>\r\n")[0].startswith(b"503 5.5.1 ")
    finally:
        c.close()


@pytest.mark.parametrize("name", [b"client.example.test", b"localhost", b"PC_01", b"mail.example.test.",
                                  b"[192.0.2.1]", b"[IPv6:2001:db8::1]", b"1.2.3.4"])
def test_good_helo_argument_is_taken_and_recorded_as_is(gw, name):
    user = "helo" + hashlib.sha1(name).hexdigest()[:8]
    c = Client()
    try:
        assert c.ask(b"EHLO " + name + b"\r\n")[0].startswith(b"250-gw.example.test Hello " + name + b" ")
        assert c.ask(b"MAIL FROM:<a@sender.test>\r\n")[0].startswith(b"250 ")
        assert c.ask(f"RCPT TO:<{user}@example.test>\r\n".encode())[0].startswith(b"250 ")
        assert c.ask(b"DATA\r\n")[0].startswith(b"354 ")
        assert c.ask(b"Subject: helo\r\n\r\nhi\r\n.\r\n")[0].startswith(b"250 ")
    finally:
        c.close()
    mail = gw.tmp / "mail"
    assert wait_until(lambda: maildir_messages(mail, user))
    received = email.message_from_bytes(maildir_messages(mail, user)[0])["Received"]
    assert received.startswith(f"from {name.decode()} ([127.0.0.1])")


def test_content_before_the_354_is_refused_and_the_connection_closed(gw):
    c = Client()
    try:
        c.ask(b"EHLO client.test\r\n")
        c.sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<early@example.test>\r\nDATA\r\n"
                       b"Subject: early\r\n\r\nsent before the 354\r\n.\r\n")
        assert c.reply()[0].startswith(b"250 2.1.0")
        assert c.reply()[0].startswith(b"250 2.1.5")
        assert c.reply() == [b"554 5.5.0 Error: improper command pipelining after DATA\r\n"]
        assert c.closed()
    finally:
        c.close()
    assert wait_until(lambda: "improper command pipelining after DATA from 127.0.0.1: Subject: early" in gw.log())
    assert maildir_messages(gw.tmp / "mail", "early") == []


def test_commands_after_a_refused_data_are_not_run(gw):
    """A DATA that is refused anyway (no valid recipient) with a message pipelined behind it: the message's
    lines would run as commands (its own MAIL/RCPT/DATA a second transaction); the connection closes instead."""
    c = Client()
    try:
        c.ask(b"EHLO client.test\r\n")
        c.sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<x@elsewhere.test>\r\nDATA\r\n"
                       b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<inner@example.test>\r\nDATA\r\n"
                       b"Subject: inner\r\n\r\n.\r\n")
        assert c.reply()[0].startswith(b"250 2.1.0")
        assert c.reply()[0].startswith(b"550 5.7.1")
        assert c.reply()[0].startswith(b"554 5.5.0 ")
        assert c.closed()
    finally:
        c.close()
    assert maildir_messages(gw.tmp / "mail", "inner") == []


def test_data_last_in_a_pipelined_group_and_bdat_still_pipeline(gw):
    c = Client()
    try:
        c.ask(b"EHLO client.test\r\n")
        c.sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<piped@example.test>\r\nDATA\r\n")
        assert [c.reply()[0][:3] for _ in range(3)] == [b"250", b"250", b"354"]
        c.sock.sendall(b"Subject: piped\r\n\r\none\r\n.\r\nMAIL FROM:<a@sender.test>\r\n"
                       b"RCPT TO:<piped@example.test>\r\nBDAT 5\r\nhello" + b"BDAT 2 LAST\r\n\r\nNOOP\r\n")
        assert [c.reply()[0][:3] for _ in range(6)] == [b"250"] * 6
    finally:
        c.close()
    assert wait_until(lambda: len(maildir_messages(gw.tmp / "mail", "piped")) == 2)


def test_help_lists_what_is_offered_without_tls(gw):
    c = Client()
    try:
        assert c.ask(b"HELP\r\n") == [b"214-2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP\r\n",
                                      b"214 2.0.0 See RFC 5321\r\n"]
    finally:
        c.close()
