"""DSN reflection closed (issue 13 F4): a client that may not relay names a victim as the sender with
RET=FULL and asks NOTIFY=SUCCESS for a local recipient; ``virtual_servers[].dsn.untrusted`` decides
what the success notice carries: the headers only (``headers``, the default), nothing (``off``), or
everything (``full``). Relay-allowed and authenticated clients keep RET as asked; failure notices
never change.

Addresses: this module's own 127.0.0.237-239 (gateway .237 on ports 2525-2527, the smart host that
takes the notices .238, the relay-allowed client .239); the untrusted client comes from .236.
"""
from __future__ import annotations

import re
import socket

from gwprocess import base_config, maildir_messages, wait_until
from mta.dsn.params import limit_untrusted
from mta.dsn.reports import NOTICES_HEADERS_ONLY
from mta.model.envelope import Envelope

GW = "127.0.0.237"
PORTS = {"headers": 2525, "full": 2526, "off": 2527}
PEER = "127.0.0.238"
TRUSTED, UNTRUSTED = "127.0.0.239", "127.0.0.236"


def config(tmp_path) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW}:{PORTS['headers']}")
    first = cfg["virtual_servers"][0]
    first["relay"]["allow"] = [f"{TRUSTED}/32"]
    for mode in ("full", "off"):
        cfg["virtual_servers"].append({**first, "name": f"dsn {mode}", "listen": [f"{GW}:{PORTS[mode]}"],
                                       "dsn": {"untrusted": mode}})
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    cfg["plugins"]["diag_logging"]["levels"]["ndr"] = "minimum"
    return cfg


def send(port: int, source: str, tag: str, notify: str = "SUCCESS") -> str:
    """One message from ``victim-<tag>@outside.test`` with RET=FULL to bob; returns its queue id."""
    with socket.create_connection((GW, port), timeout=30, source_address=(source, 0)) as s:
        f = s.makefile("rb")

        def reply(line: bytes | None = None) -> bytes:
            if line is not None:
                s.sendall(line + b"\r\n")
            while True:
                got = f.readline()
                if got[3:4] != b"-":
                    return got
        assert reply().startswith(b"220")
        assert reply(b"EHLO client.test").startswith(b"250")
        assert reply(f"MAIL FROM:<victim-{tag}@outside.test> RET=FULL".encode()).startswith(b"250")
        assert reply(f"RCPT TO:<bob@example.test> NOTIFY={notify}".encode()).startswith(b"250")
        assert reply(b"DATA").startswith(b"354")
        done = reply(f"Subject: {tag}\r\n\r\nSECRET-{tag}\r\n.".encode())
        reply(b"QUIT")
    assert done.startswith(b"250"), done
    return re.search(rb"queued as (\S+)", done).group(1).decode()


def notice_for(peer, tag: str) -> bytes:
    assert peer.wait_until(lambda: any(m.recipients == [f"victim-{tag}@outside.test"] for m in peer.messages), 30)
    return next(m.data for m in peer.messages if m.recipients == [f"victim-{tag}@outside.test"])


def test_untrusted_success_notices_follow_dsn_untrusted(gateway, peers, tmp_path):
    peer = peers(PEER)
    gw = gateway(config(tmp_path))

    send(PORTS["headers"], UNTRUSTED, "default")
    default = notice_for(peer, "default")
    assert b"text/rfc822-headers" in default and b"Subject: default" in default
    assert b"SECRET-default" not in default                    # the attacker's body stays here

    trusted_id = send(PORTS["headers"], TRUSTED, "trusted")
    trusted = notice_for(peer, "trusted")
    assert b"message/rfc822" in trusted and b"SECRET-trusted" in trusted    # RET=FULL as asked
    assert wait_until(lambda: f"{trusted_id}: sender delivery status notification" in gw.log())

    send(PORTS["full"], UNTRUSTED, "full")
    assert b"SECRET-full" in notice_for(peer, "full")

    queue_id = send(PORTS["off"], UNTRUSTED, "off")
    assert wait_until(lambda: f"{queue_id}: removed" in gw.log(), 30)
    assert any(b"SECRET-off" in m for m in maildir_messages(tmp_path / "mail", "bob"))
    assert f"{queue_id}: sender delivery status notification" not in gw.log()
    assert not [m for m in peer.messages if m.recipients == ["victim-off@outside.test"]]


def test_off_keeps_failure_notices_as_asked():
    envelope = Envelope(id="x", rcpt_params={"a@x": {"NOTIFY": "SUCCESS,FAILURE"}, "b@x": {"NOTIFY": "SUCCESS"},
                                             "c@x": {"NOTIFY": "DELAY"}, "d@x": {"NOTIFY": "NEVER"},
                                             "e@x": {"ORCPT": "rfc822;e@x"}, "f@x": {}})
    limit_untrusted(envelope, "off")
    assert {a: p.get("NOTIFY") for a, p in envelope.rcpt_params.items()} == {
        "a@x": "FAILURE", "b@x": "NEVER", "c@x": "NEVER", "d@x": "NEVER", "e@x": None, "f@x": None}


def test_headers_marks_only_a_full_return():
    full, hdrs = Envelope(id="x", mail_params={"RET": "FULL"}), Envelope(id="y", mail_params={"RET": "HDRS"})
    limit_untrusted(full, "headers")
    limit_untrusted(hdrs, "headers")
    assert full.extra == {NOTICES_HEADERS_ONLY: True} and hdrs.extra == {}
