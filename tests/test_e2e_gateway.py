"""End to end, as an administrator meets it: twistd smtpgw on a YAML file, SMTP over loopback, a real
dnsmasq for MX, real SMTP peers on 127.0.0.x:25, Maildirs on disk, kill -9 and restart."""
from __future__ import annotations

import email
import smtplib
import socket
import subprocess
import threading
import time
import uuid

import pytest

from gwprocess import GatewayProcess, base_config, maildir_messages, wait_until

GW = "127.0.0.10:2525"
GW_HOST, GW_PORT = "127.0.0.10", 2525


def relay_config(tmp_path, dns_server=None, **over):
    cfg = base_config(tmp_path, listen=GW)
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    if dns_server is not None:
        host, port = dns_server.address
        cfg["gateway"]["dns"]["nameservers"] = [f"{host}:{port}"]
    cfg.update(over)
    return cfg


def message(subject: str, body: str = "Hello.\r\n") -> str:
    return (f"From: a@sender.test\r\nTo: b@remote.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@sender.test>\r\n\r\n{body}")


def send(sender: str, rcpts: list[str], msg: str, host: str = GW_HOST, port: int = GW_PORT) -> None:
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.sendmail(sender, rcpts, msg)


def subjects(peer) -> list[str]:
    return [email.message_from_bytes(m.data)["Subject"] for m in peer.messages]


def spool_empty(tmp_path) -> bool:
    """No queued message left (only the spool's own bookkeeping folders)."""
    root = tmp_path / "spool"
    return not any(p.is_file() and p.parent.name not in ("tmp", "corrupt") and p.suffix != ".lock" for p in root.rglob("*"))


# -- receiving -----------------------------------------------------------------------------------

def test_local_delivery_lands_in_maildir(gateway, tmp_path):
    gateway(base_config(tmp_path, listen=GW))
    send("someone@outside.test", ["Bob@example.test"], message("local one"))
    assert wait_until(lambda: maildir_messages(tmp_path / "mail", "bob"))
    data = maildir_messages(tmp_path / "mail", "bob")[0]
    parsed = email.message_from_bytes(data)
    assert parsed["Subject"] == "local one"
    assert "by gw.example.test" in parsed["Received"]
    assert b"\r\n" in data or b"\n" in data


def test_banner_and_ehlo_keywords(gateway, tmp_path):
    gateway(base_config(tmp_path, listen=GW))
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10) as s:
        code, banner = s.ehlo("client.test")
        assert code == 250
        assert s.has_extn("pipelining") and s.has_extn("8bitmime") and s.has_extn("enhancedstatuscodes")
        assert s.esmtp_features["size"] == str(1024 * 1024)


def test_relay_denied_for_client_not_in_list(gateway, tmp_path, peers):
    gateway(base_config(tmp_path, listen=GW))
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("victim@elsewhere.test")
    assert code == 550 and text.startswith(b"5.7.1")


def test_size_and_recipient_limits(gateway, tmp_path):
    cfg = base_config(tmp_path, listen=GW)
    cfg["virtual_servers"][0]["limits"]["max_recipients"] = 2
    gateway(cfg)
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10) as s:
        s.ehlo("client.test")
        code, text = s.mail("a@sender.test", ["SIZE=5000000"])
        assert code == 552 and text.startswith(b"5.3.4")
        assert s.mail("a@sender.test")[0] == 250
        assert s.rcpt("u1@example.test")[0] == 250
        assert s.rcpt("u2@example.test")[0] == 250
        code, text = s.rcpt("u3@example.test")
        assert code == 452 and text.startswith(b"4.5.3")
        code, text = s.data(message("too big", "x" * 998 + "\r\n") * 1 + ("y" * 900 + "\r\n") * 1300)
        assert code == 552 and text.startswith(b"5.3.4")
    assert maildir_messages(tmp_path / "mail", "u1") == []


@pytest.mark.parametrize("sequence", [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n.\n"])
def test_smuggling_sequences_never_split_a_message(gateway, tmp_path, sequence):
    gateway(base_config(tmp_path, listen=GW))
    smuggled = (b"MAIL FROM:<evil@sender.test>\r\nRCPT TO:<smuggled@example.test>\r\nDATA\r\n"
                b"Subject: smuggled\r\n\r\nboo\r\n.\r\n")
    with socket.create_connection((GW_HOST, GW_PORT), timeout=10) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220")
        s.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        s.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"250")
        assert f.readline().startswith(b"354")
        # the smuggled part carries the only real CRLF.CRLF: the whole is one (refused) message
        s.sendall(b"Subject: first\r\n\r\nhello" + sequence + smuggled)
        final = f.readline()
        assert final[:1] == b"5", final
        s.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221")
    assert maildir_messages(tmp_path / "mail", "smuggled") == []
    assert maildir_messages(tmp_path / "mail", "victim") == []


def test_loop_detection_refuses_too_many_hops(gateway, tmp_path):
    gateway(base_config(tmp_path, listen=GW))
    hops = "".join(f"Received: from hop{i}.test by hop{i + 1}.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n"
                   for i in range(30))
    with pytest.raises(smtplib.SMTPDataError) as err:
        send("a@sender.test", ["loop@example.test"], hops + message("looping"))
    assert err.value.smtp_code == 554 and err.value.smtp_error.startswith(b"5.4.6")


def test_bad_config_is_refused_naming_the_key(tmp_path):
    cfg = base_config(tmp_path, listen=GW)
    cfg["virtual_servers"][0]["limits"]["max_recipients"] = "lots"
    gw = GatewayProcess(tmp_path, cfg)
    gw.write_config()
    out = subprocess.run(gw.command(), cwd=tmp_path, env=gw.env(), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "virtual_servers[0].limits.max_recipients" in out.stdout + out.stderr


# -- routing and delivery --------------------------------------------------------------------------

def test_mx_lowest_preference_first(gateway, tmp_path, peers, dns_server):
    dns_server.add_mx("remote.test", "mx1.remote.test", 10)
    dns_server.add_mx("remote.test", "mx2.remote.test", 20)
    dns_server.add_a("mx1.remote.test", "127.0.0.11")
    dns_server.add_a("mx2.remote.test", "127.0.0.12")
    dns_server.start()
    p1, p2 = peers("127.0.0.11"), peers("127.0.0.12")
    gateway(relay_config(tmp_path, dns_server))
    send("a@sender.test", ["b@remote.test"], message("mx order"))
    assert p1.wait_for(1)
    assert subjects(p1) == ["mx order"] and p2.messages == []


def test_mx_falls_back_to_higher_preference(gateway, tmp_path, peers, dns_server):
    dns_server.add_mx("remote.test", "mx1.remote.test", 10)
    dns_server.add_mx("remote.test", "mx2.remote.test", 20)
    dns_server.add_a("mx1.remote.test", "127.0.0.11")   # nothing listens there
    dns_server.add_a("mx2.remote.test", "127.0.0.12")
    dns_server.start()
    p2 = peers("127.0.0.12")
    gateway(relay_config(tmp_path, dns_server))
    send("a@sender.test", ["b@remote.test"], message("fallback"))
    assert p2.wait_for(1)
    assert subjects(p2) == ["fallback"]


def test_implicit_mx_uses_the_address_record(gateway, tmp_path, peers, dns_server):
    dns_server.add_a("implicit.test", "127.0.0.13")
    dns_server.start()
    p = peers("127.0.0.13")
    gateway(relay_config(tmp_path, dns_server))
    send("a@sender.test", ["b@implicit.test"], message("implicit"))
    assert p.wait_for(1)
    assert p.messages[0].recipients == ["b@implicit.test"]


def test_equal_preferences_spread_the_load(gateway, tmp_path, peers, dns_server):
    dns_server.add_mx("spread.test", "a.spread.test", 10)
    dns_server.add_mx("spread.test", "b.spread.test", 10)
    dns_server.add_a("a.spread.test", "127.0.0.14")
    dns_server.add_a("b.spread.test", "127.0.0.15")
    dns_server.start()
    pa, pb = peers("127.0.0.14"), peers("127.0.0.15")
    gateway(relay_config(tmp_path, dns_server))
    for i in range(16):
        send("a@sender.test", [f"u{i}@spread.test"], message(f"spread {i}"))
    assert wait_until(lambda: len(pa.messages) + len(pb.messages) == 16, 30)
    assert pa.messages and pb.messages      # 2 * 0.5**16 chance of a false failure


def test_connector_by_address_space_and_cost_with_failover(gateway, tmp_path, peers):
    cheap = peers("127.0.0.16")
    dear = peers("127.0.0.17")
    cfg = relay_config(tmp_path)
    cfg["connectors"] = [
        {"name": "dial-up", "address_spaces": [{"domain": "*.corp.test", "cost": 50}],
         "smart_hosts": ["[127.0.0.17]"], "bridgeheads": ["Default SMTP Virtual Server"]},
        {"name": "leased line", "address_spaces": [{"domain": "*.corp.test", "cost": 1}],
         "smart_hosts": ["[127.0.0.16]"], "bridgeheads": ["Default SMTP Virtual Server"]},
        {"name": "Internet", "address_spaces": [{"domain": "*", "cost": 1}],
         "smart_hosts": ["[127.0.0.19]"], "bridgeheads": ["Default SMTP Virtual Server"]},
    ]
    gw = gateway(cfg)
    send("a@sender.test", ["u@a.corp.test"], message("cheapest"))
    assert cheap.wait_for(1)
    assert subjects(cheap) == ["cheapest"] and dear.messages == []
    cheap.stop()                                  # the leased line goes down: fail over by cost
    send("a@sender.test", ["u@b.corp.test"], message("failover"))
    assert dear.wait_for(1)
    assert subjects(dear) == ["failover"]
    assert gw.proc.poll() is None


def test_failure_dsn_reaches_the_sender(gateway, tmp_path, peers):
    p = peers("127.0.0.18")
    p.set_reply("rcpt", "550 5.1.1 no such user here")
    cfg = relay_config(tmp_path)
    cfg["connectors"][0]["smart_hosts"] = ["[127.0.0.18]"]
    gateway(cfg)
    send("alice@example.test", ["ghost@remote.test"], message("will bounce"))
    assert wait_until(lambda: maildir_messages(tmp_path / "mail", "alice"), 30)
    dsn = email.message_from_bytes(maildir_messages(tmp_path / "mail", "alice")[0])
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    status = [part for part in dsn.walk() if part.get_content_type() == "message/delivery-status"]
    assert status and "5.1.1" in status[0].as_string() and "ghost@remote.test" in status[0].as_string()
    assert p.messages == []


def test_retry_after_4xx_delivers_exactly_once(gateway, tmp_path, peers):
    p = peers("127.0.0.19")
    tries = []

    def first_time_busy(arg):
        tries.append(arg)
        return "451 4.3.0 busy, try later" if len(tries) == 1 else None

    p.set_reply("rcpt", first_time_busy)
    cfg = relay_config(tmp_path)
    cfg["connectors"][0]["smart_hosts"] = ["[127.0.0.19]"]
    gateway(cfg)
    send("a@sender.test", ["b@remote.test"], message("retried"))
    assert p.wait_for(1, 30)
    assert wait_until(lambda: spool_empty(tmp_path), 15)
    assert subjects(p) == ["retried"] and len(tries) == 2


def test_every_accepted_message_survives_kill_9(gateway, tmp_path, peers):
    cfg = relay_config(tmp_path)
    cfg["connectors"][0]["smart_hosts"] = ["[127.0.0.20]"]     # the smart host is down at first
    gw = gateway(cfg)
    accepted: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for i in range(200):
            subject = f"crash {n}-{i}"
            try:
                send("a@sender.test", ["b@remote.test"], message(subject))
            except (OSError, smtplib.SMTPException):
                return
            with lock:
                accepted.append(subject)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(accepted) >= 20, 30)
    gw.kill9()
    for t in threads:
        t.join(30)
    got = list(accepted)
    peer = peers("127.0.0.20")
    gateway(cfg)                                   # restart on the same spool
    assert wait_until(lambda: set(got) <= set(subjects(peer)), 60), \
        f"lost: {sorted(set(got) - set(subjects(peer)))[:10]}"


# -- site hooks ----------------------------------------------------------------------------------

LOCAL_POLICY = '''
from mta.plugin.hookspecs import hookimpl
from mta.smtp.reply import Reply

@hookimpl
def smtpgw_mail_from(session, sender, params):
    if sender.endswith("@spammer.example"):
        return Reply(550, "5.7.1", "Sender refused by local policy")
    if sender.startswith("crash@"):
        raise RuntimeError("a bug in local policy")
    return None
'''


def test_local_hook_from_the_readme_decides_and_a_crashing_hook_gets_451(gateway, tmp_path):
    policy = tmp_path / "local_policy.py"
    policy.write_text(LOCAL_POLICY)
    cfg = base_config(tmp_path, listen=GW)
    cfg["plugins"]["local"] = [str(policy)]
    gw = gateway(cfg)
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("bulk@spammer.example") == (550, b"5.7.1 Sender refused by local policy")
        code, text = s.mail("crash@sender.test")
        assert code == 451 and text.startswith(b"4.3.0")
        assert s.mail("friend@sender.test")[0] == 250          # the session goes on
        assert s.rcpt("bob@example.test")[0] == 250
    assert "a bug in local policy" in gw.log()
