"""Connector delivery options as an administrator meets them: ``twistd smtpgw`` on a YAML file with a
smart host, outbound settings and an oversize schedule; small mail flows, large mail is held with its
reason on disk (what ``smtpgw queue`` shows). Gateway on 127.0.0.90:2525, smart host on 127.0.0.91:25.
"""
from __future__ import annotations

import smtplib

from gwprocess import base_config, wait_until
from mta.spool.store import Spool

GW_HOST, GW_PORT = "127.0.0.90", 2525
SMART = "127.0.0.91"


def message(subject: str, body: str = "Hello.\r\n") -> str:
    return f"From: a@sender.test\r\nTo: b@far.test\r\nSubject: {subject}\r\n\r\n{body}"


def test_large_mail_held_for_the_oversize_window_while_small_mail_goes(gateway, peers, tmp_path):
    smart = peers(SMART)
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0].update({
        "smart_hosts": [f"[{SMART}]"],
        "max_connections": 10,
        "max_connections_per_host": 2,
        "outbound": {"tls": "opportunistic", "helo": "ehlo", "connect_timeout": "10s"},
        "content_restrictions": {"max_message_size": "1MB"},
        "delivery": {"schedule": "always", "timezone": "Europe/Paris",
                     "oversize": {"threshold": "10KB", "schedule": "never"}},
    })
    gateway(cfg)
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        s.sendmail("a@sender.test", ["big@far.test"], message("big", ("y" * 76 + "\r\n") * 200))
        s.sendmail("a@sender.test", ["small@far.test"], message("small"))
    assert smart.wait_for(1, 20)
    assert smart.messages[0].recipients == ["small@far.test"]

    def held():
        entries = Spool(str(tmp_path / "spool")).scan_sync()
        return [e for e in entries if e.rcpts[0].held_reason]

    assert wait_until(lambda: held(), 20)
    [entry] = held()
    state = entry.rcpts[0]
    assert state.address == "big@far.test" and state.attempts == 0
    assert state.held_reason.startswith("held: connector 'Internet SMTP connector' oversize schedule (message ")
    assert state.held_reason.endswith("> 10KB) is never open")
    assert len(smart.messages) == 1
