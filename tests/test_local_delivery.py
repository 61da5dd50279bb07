"""Local domains as mail programs and their users meet them: recipients known or refused at RCPT,
aliases (local and remote), ``+tag`` addresses, Return-Path and Delivered-To on top, LF line ends,
mailbox names that cannot leave the mail root, and submission sender checks.

All over SMTP against the running gateway; the outcome is read in the Maildirs and at a real peer.
"""
from __future__ import annotations

import os
import smtplib
from pathlib import Path

from gwprocess import base_config, maildir_messages, wait_until
from mta.smtp.server.users import hash_password

PEER = "127.0.0.36"


def local_config(tmp_path: Path, **domain) -> dict:
    cfg = base_config(tmp_path)
    cfg["gateway"]["local_domains"]["example.test"].update(domain)
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    return cfg


def send(gw, sender: str, rcpts: list[str], body: str = "hello\r\nsecond line\r\n") -> dict:
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        return s.sendmail(sender, rcpts, f"Subject: test\r\n\r\n{body}")


def rcpt_reply(gw, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("someone@client.test")
        return s.rcpt(rcpt)


def mail(tmp_path: Path, box: str) -> list[bytes]:
    return maildir_messages(tmp_path / "mail", box)


def test_unknown_recipient_refused_at_rcpt_known_and_tagged_delivered(gateway, tmp_path):
    gw = gateway(local_config(tmp_path, recipients=["alice", "Bob"]))
    code, text = rcpt_reply(gw, "nobody@example.test")
    assert code == 550
    assert text == b"5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
    assert rcpt_reply(gw, "BOB@example.test")[0] == 250                # case-insensitive
    send(gw, "x@client.test", ["alice+news@example.test"])
    assert wait_until(lambda: mail(tmp_path, "alice"), 15), gw.log()
    assert not (tmp_path / "mail" / "alice+news").exists()


def test_final_delivery_adds_return_path_and_delivered_to_with_lf_line_ends(gateway, tmp_path):
    gw = gateway(local_config(tmp_path))
    send(gw, "sender@client.test", ["carol@example.test"])
    assert wait_until(lambda: mail(tmp_path, "carol"), 15), gw.log()
    text = mail(tmp_path, "carol")[0]
    assert text.startswith(b"Return-Path: <sender@client.test>\nDelivered-To: carol@example.test\n")
    assert b"\r" not in text
    assert text.endswith(b"hello\nsecond line\n")


def test_a_bounce_delivered_locally_shows_the_null_sender(gateway, tmp_path):
    gw = gateway(local_config(tmp_path))
    send(gw, "", ["dave@example.test"])
    assert wait_until(lambda: mail(tmp_path, "dave"), 15), gw.log()
    assert mail(tmp_path, "dave")[0].startswith(b"Return-Path: <>\n")


def test_alias_fans_out_to_a_mailbox_and_a_remote_address(gateway, peers, tmp_path):
    peer = peers(PEER)
    gw = gateway(local_config(tmp_path, recipients=["alice"],
                              aliases={"sales": ["alice", "bob@partner.test"], "info": "sales"}))
    send(gw, "customer@client.test", ["info@example.test"])
    assert wait_until(lambda: mail(tmp_path, "alice"), 15), gw.log()
    assert peer.wait_for(1, 15), gw.log()
    got = peer.messages[0]
    assert got.recipients == ["bob@partner.test"]
    assert got.sender == "customer@client.test"                         # forwarded with its sender
    assert b"Delivered-To: info@example.test" in got.data
    assert b"Delivered-To: info@example.test\n" in mail(tmp_path, "alice")[0]
    assert not (tmp_path / "mail" / "sales").exists() and not (tmp_path / "mail" / "info").exists()


def test_catch_all_takes_unknown_local_parts(gateway, tmp_path):
    gw = gateway(local_config(tmp_path, recipients=["alice"], catch_all="alice"))
    send(gw, "x@client.test", ["typo@example.test"])
    assert wait_until(lambda: mail(tmp_path, "alice"), 15), gw.log()


def test_recipient_file_is_read_again_when_it_changes(gateway, tmp_path):
    listing = tmp_path / "recipients.txt"
    listing.write_text("# the staff\nalice\n")
    gw = gateway(local_config(tmp_path, recipients=str(listing)))
    assert rcpt_reply(gw, "erin@example.test")[0] == 550
    listing.write_text("alice\nerin   # new this week\n")
    os.utime(listing, (1, 2_000_000_000))
    assert wait_until(lambda: rcpt_reply(gw, "erin@example.test")[0] == 250, 20), gw.log()
    assert "recipients read again from" in gw.log()


NASTY = ['"../escape"', '".."', '"a/b"', '"john doe"', '"x\\\\y"', "..x", '"tab\\\there"', "zo\u00eb", '"\u2215etc"']


def test_no_mailbox_name_leaves_the_mail_root(gateway, tmp_path):
    cfg = local_config(tmp_path)
    cfg["plugins"]["enabled"] = []              # the core alone: no relay_acl refusal at RCPT to hide behind
    gw = gateway(cfg)
    accepted = []
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("x@client.test", ["SMTPUTF8"])
        for local in NASTY:
            if s.rcpt(f"{local}@example.test")[0] == 250:
                accepted.append(local)
        assert s.rcpt("ok@example.test")[0] == 250
        s.data("Subject: t\r\n\r\nx\r\n".encode())
    assert len(accepted) >= 5                   # most reach delivery: the Maildir code is what is tested
    assert wait_until(lambda: mail(tmp_path, "ok"), 15), gw.log()   # the same attempt as every other one
    root = (tmp_path / "mail").resolve()
    boxes = {p.parent for p in tmp_path.rglob("new") if p.is_dir()}
    assert all(b.resolve().parent == root for b in boxes), boxes
    names = {b.name for b in boxes}
    assert "ok" in names
    assert not any(n.startswith(".") or set(n) & set('/\\" \t') for n in names), names


def test_authenticated_user_may_send_only_as_their_own_addresses(gateway, tmp_path):
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('wonderland', ln=4)}\n")
    cfg = local_config(tmp_path)
    cfg["virtual_servers"][0]["auth"] = {"users": str(users), "allow_plaintext": True,
                                         "senders": {"alice": ["alice@example.test", "@example.org"]}}
    gw = gateway(cfg)
    with smtplib.SMTP(*gw.address, timeout=10) as s:
        s.ehlo("client.test")
        s.login("alice", "wonderland")
        code, text = s.mail("ceo@example.test")
        assert (code, text) == (553, b"5.7.1 Sender address rejected: not owned by user alice")
        s.rset()
        assert s.mail("Alice@Example.test")[0] == 250
        s.rset()
        assert s.mail("anyone@example.org")[0] == 250
        s.rset()
        assert s.mail("")[0] == 250                                     # bounces have no owner
    with smtplib.SMTP(*gw.address, timeout=10) as s:                    # not logged in: no check
        s.ehlo("client.test")
        assert s.mail("ceo@example.test")[0] == 250
