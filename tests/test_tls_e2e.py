"""STARTTLS, implicit TLS, SIGHUP certificate reload and AUTH against the real daemon
(``twistd -n smtpgw``), with certificates made here by trustme, smtplib and swaks as clients.

Addresses: 127.0.0.70-79 belong to this module. One gateway (``gw``) serves most tests:
127.0.0.70:2525 (STARTTLS, AUTH, authenticated clients relay), 127.0.0.70:465 (implicit TLS),
127.0.0.74:2525 (tls.required), 127.0.0.75:2525 (AUTH, but relay.allow_authenticated: false).
127.0.0.71:25 is the smart host peer. Tests that start their own gateway: 127.0.0.72 (SIGHUP),
127.0.0.73 (broken certificate), 127.0.0.76 with its peer on 127.0.0.77 (etc/submission.yaml).
"""
from __future__ import annotations

import base64
import email
import os
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from gwprocess import REPO, GatewayProcess, base_config, maildir_messages, wait_until

trustme = pytest.importorskip("trustme")

HOSTNAME = "gw.example.test"
GW, IMPLICIT, STRICT, NO_AUTH_RELAY = ("127.0.0.70", 2525), ("127.0.0.70", 465), ("127.0.0.74", 2525), \
    ("127.0.0.75", 2525)
PEER = "127.0.0.71"
PASSWORD = "correct horse battery"


# -- helpers ----------------------------------------------------------------------------------------

def smtpgw_command() -> list[str]:
    exe = Path(sys.executable).with_name("smtpgw")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mta.cli.main"]


def add_user(path: Path, user: str, password: str) -> None:
    """As an administrator does it: ``smtpgw passwd -c --stdin FILE USER``."""
    done = subprocess.run([*smtpgw_command(), "passwd", "-c", "--stdin", str(path), user], input=password + "\n",
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def write_cert(ca, folder: Path, *names: str) -> tuple[Path, Path, bytes]:
    """Certificate chain and key files for ``names``; returns their paths and the leaf in DER."""
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(*names)
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    tmp_cert, tmp_key = folder / "cert.pem.new", folder / "key.pem.new"
    cert.cert_chain_pems[0].write_to_path(str(tmp_cert))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(tmp_cert), append=True)
    cert.private_key_pem.write_to_path(str(tmp_key))
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)
    return cert_path, key_path, ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def client_context(ca) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def read_reply(f) -> list[bytes]:
    lines = []
    while True:
        line = f.readline()
        assert line, "connection closed"
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def message(subject: str) -> str:
    return (f"From: alice@example.test\r\nTo: far@remote.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nHello.\r\n")


def plain(user: str, password: str) -> str:
    return "PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def starttls_smtp(address, context) -> smtplib.SMTP:
    s = smtplib.SMTP(*address, timeout=30)
    s._host = HOSTNAME                  # the name the certificate is checked against
    s.starttls(context=context)
    s.ehlo("client.test")
    return s


# -- the shared gateway -----------------------------------------------------------------------------

class Site:
    """What the shared gateway was started with."""

    def __init__(self, tmp: Path, ca, gw: GatewayProcess, peer) -> None:
        self.tmp, self.ca, self.gw, self.peer = tmp, ca, gw, peer
        self.context = client_context(ca)


def tls_config(tmp: Path, cert: Path, key: Path, users: Path, listen: str, **vs_over) -> dict:
    cfg = base_config(tmp, listen=listen)
    vs = cfg["virtual_servers"][0]
    vs["tls"] = {"certificate": str(cert), "key": str(key)}
    vs["auth"] = {"users": str(users), "max_failures": 3}
    vs.update(vs_over)
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    cfg["plugins"]["diag_logging"] = {"levels": {"smtp_protocol": "maximum", "authentication": "maximum",
                                                 "connection_manager": "maximum"}}
    return cfg


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from peers import SMTPPeer

    tmp = tmp_path_factory.mktemp("tls_e2e")
    ca = trustme.CA()
    cert, key, _ = write_cert(ca, tmp / "tls", HOSTNAME, IMPLICIT[0])     # smtplib.SMTP_SSL checks the IP
    users = tmp / "users"
    add_user(users, "alice", PASSWORD)
    cfg = tls_config(tmp, cert, key, users, f"{GW[0]}:{GW[1]}")
    cfg["virtual_servers"][0]["listen"].append({"address": f"{IMPLICIT[0]}:{IMPLICIT[1]}", "tls": True})
    strict = dict(cfg["virtual_servers"][0], name="Strict", listen=[f"{STRICT[0]}:{STRICT[1]}"],
                  tls={"certificate": str(cert), "key": str(key), "required": True})
    closed = dict(cfg["virtual_servers"][0], name="No relay for users", listen=[f"{NO_AUTH_RELAY[0]}:{NO_AUTH_RELAY[1]}"],
                  relay={"allow": [], "allow_authenticated": False})
    cfg["virtual_servers"] += [strict, closed]
    cfg["connectors"][0]["bridgeheads"] = [vs["name"] for vs in cfg["virtual_servers"]]
    peer = SMTPPeer(host=PEER, port=25).start()
    gw = GatewayProcess(tmp, cfg)
    try:
        gw.start()
        for address in (IMPLICIT, STRICT, NO_AUTH_RELAY):
            assert wait_until(lambda: _port_open(address))
        yield Site(tmp, ca, gw, peer)
    finally:
        gw.stop()
        peer.stop()


def _port_open(address) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


# -- STARTTLS ---------------------------------------------------------------------------------------

def test_starttls_injection_gets_no_reply(site):
    """``STARTTLS\\r\\nNOOP\\r\\n`` in one write: the NOOP is discarded, in plaintext and after the handshake."""
    with socket.create_connection(GW, timeout=30) as raw:
        f = raw.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw.sendall(b"EHLO client.test\r\n")
        assert read_reply(f)[-1] == b"250 STARTTLS\r\n"
        raw.sendall(b"STARTTLS\r\nNOOP\r\n")
        assert f.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        tls = site.context.wrap_socket(raw, server_hostname=HOSTNAME)
        tf = tls.makefile("rb")
        tls.sendall(b"EHLO client.test\r\n")
        ehlo = read_reply(tf)
        # had the NOOP been answered, "250 2.0.0 Ok" would come first
        assert ehlo[0].startswith(b"250-gw.example.test Hello client.test"), ehlo
        assert b"250-STARTTLS\r\n" not in ehlo and b"250 STARTTLS\r\n" not in ehlo
        assert b"250-AUTH PLAIN LOGIN\r\n" in ehlo or b"250 AUTH PLAIN LOGIN\r\n" in ehlo
        tls.sendall(b"MAIL FROM:<a@example.test>\r\nQUIT\r\n")
        assert read_reply(tf) == [b"250 2.1.0 Sender OK\r\n"]
        assert read_reply(tf) == [b"221 2.0.0 Bye\r\n"]
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_starttls_reply_is_alone_on_the_wire(site):
    """Nothing follows the 220 in plaintext: the pipelined command got no plaintext answer either."""
    with socket.create_connection(GW, timeout=30) as raw:
        banner = b""
        while not banner.endswith(b"\r\n"):
            banner += raw.recv(1024)
        raw.sendall(b"EHLO client.test\r\n")
        ehlo = b""
        while b"\r\n250 " not in ehlo:
            ehlo += raw.recv(4096)
        raw.sendall(b"STARTTLS\r\nNOOP\r\nRSET\r\n")
        got = b""
        while not got.endswith(b"\r\n"):
            got += raw.recv(1024)
        assert got == b"220 2.0.0 Ready to start TLS\r\n"
        tls = site.context.wrap_socket(raw, server_hostname=HOSTNAME)   # the handshake still works
        tls.sendall(b"NOOP\r\n")
        assert tls.recv(1024) == b"250 2.0.0 Ok\r\n"
        tls.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_old_tls_versions_are_refused(site):
    context = client_context(site.ca)
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    try:
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with socket.create_connection(IMPLICIT, timeout=30) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(raw, server_hostname=HOSTNAME)


def test_tls_required_refuses_mail_before_starttls(site):
    with smtplib.SMTP(*STRICT, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.mail("a@sender.test") == (530, b"5.7.0 Must issue a STARTTLS command first")
        s._host = HOSTNAME
        s.starttls(context=site.context)
        s.ehlo("client.test")
        assert s.mail("a@sender.test")[0] == 250
        assert s.rcpt("strict@example.test")[0] == 250
        assert s.data(message("strict"))[0] == 250
    assert wait_until(lambda: maildir_messages(site.tmp / "mail", "strict"))
    received = email.message_from_bytes(maildir_messages(site.tmp / "mail", "strict")[0])["Received"]
    assert " with ESMTPS id " in received


def test_help_lists_starttls_before_tls_and_auth_after(site):
    with smtplib.SMTP(*GW, timeout=30) as s:
        code, text = s.docmd("HELP")
        assert code == 214 and text.split(b"\n")[0].endswith(b" HELP STARTTLS")
        s.ehlo("client.test")
        s._host = HOSTNAME
        s.starttls(context=site.context)
        code, text = s.docmd("HELP")
        assert code == 214 and text.split(b"\n")[0].endswith(b" HELP AUTH"), text


# -- implicit TLS -----------------------------------------------------------------------------------

def test_implicit_tls_listener_with_auth(site):
    with smtplib.SMTP_SSL(*IMPLICIT, timeout=30, context=site.context, local_hostname="client.test") as s:
        s._host = HOSTNAME
        s.ehlo("client.test")
        assert not s.has_extn("starttls") and s.has_extn("auth")
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")
        assert s.login("alice", PASSWORD)[0] == 235
        s.sendmail("alice@example.test", ["implicit@example.test"], message("implicit"))
    assert wait_until(lambda: maildir_messages(site.tmp / "mail", "implicit"))
    received = email.message_from_bytes(maildir_messages(site.tmp / "mail", "implicit")[0])["Received"]
    assert "(Authenticated sender: alice)" in received and " with ESMTPSA id " in received


# -- AUTH -------------------------------------------------------------------------------------------

def test_auth_not_offered_before_starttls(site):
    with smtplib.SMTP(*GW, timeout=30) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.docmd("AUTH", plain("alice", PASSWORD))[0] == 538


def test_auth_success_and_failure(site):
    with starttls_smtp(GW, site.context) as s:
        assert s.esmtp_features["auth"].split() == ["PLAIN", "LOGIN"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice", "wrong")
        assert (e.value.smtp_code, e.value.smtp_error) == (535, b"5.7.8 Authentication credentials invalid")
    # Postfix's line, as fail2ban's postfix-sasl filter reads it
    assert wait_until(lambda: "] warning: unknown[127.0.0.1]: SASL PLAIN authentication failed: invalid credentials"
                      in site.gw.log()), site.gw.log()
    with starttls_smtp(GW, site.context) as s:
        assert s.login("alice", PASSWORD) == (235, b"2.7.0 Authentication successful")
        assert s.docmd("AUTH", plain("alice", PASSWORD))[0] == 503
    with starttls_smtp(GW, site.context) as s:        # LOGIN through its two challenges
        s.user, s.password = "alice", PASSWORD
        assert s.auth("LOGIN", s.auth_login, initial_response_ok=False)[0] == 235


def test_too_many_failures_421_and_close(site):
    with starttls_smtp(GW, site.context) as s:
        assert s.docmd("AUTH", plain("alice", "one"))[0] == 535
        assert s.docmd("AUTH", plain("mallory", "two"))[0] == 535
        assert s.docmd("AUTH", plain("alice", "three")) == (535, b"5.7.8 Authentication credentials invalid")
        code, text = s.getreply()
        assert (code, text) == (421, b"4.7.0 Too many failed authentication attempts, closing connection")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.noop()


def test_credentials_never_in_the_log(site):
    with starttls_smtp(GW, site.context) as s:
        s.login("alice", PASSWORD)
    assert wait_until(lambda: "authenticated" in site.gw.log())
    log = site.gw.log()
    assert "line=AUTH PLAIN ***" in log
    secret = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
    assert PASSWORD not in log and secret not in log


def test_authenticated_client_relays_to_the_peer(site):
    with starttls_smtp(GW, site.context) as s:
        s.mail("alice@example.test")
        assert s.rcpt("far@remote.test") == (550, b"5.7.1 Relaying denied")
        s.rset()
        s.login("alice", PASSWORD)
        s.sendmail("alice@example.test", ["far@remote.test"], message("relayed after auth"))
    assert wait_until(lambda: any(b"relayed after auth" in m.data for m in site.peer.messages))
    [m] = [m for m in site.peer.messages if b"relayed after auth" in m.data]
    assert m.recipients == ["far@remote.test"]
    received = email.message_from_bytes(m.data)["Received"]
    assert "(Authenticated sender: alice)" in received and " with ESMTPSA id " in received


def test_allow_authenticated_false_does_not_relay(site):
    with starttls_smtp(NO_AUTH_RELAY, site.context) as s:
        assert s.login("alice", PASSWORD)[0] == 235
        s.mail("alice@example.test")
        code, text = s.rcpt("far@remote.test")
        assert code == 550 and text.startswith(b"5.7.1")
        assert s.rcpt("local@example.test")[0] == 250


# -- certificates: reload and errors ----------------------------------------------------------------

def peer_certificate(address, context, implicit: bool) -> bytes:
    if implicit:
        with socket.create_connection(address, timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname=HOSTNAME) as tls:
                return tls.getpeercert(binary_form=True)
    with starttls_smtp(address, context) as s:
        return s.sock.getpeercert(binary_form=True)


def test_sighup_reloads_the_certificate(tmp_path, gateway):
    ca = trustme.CA()
    cert, key, first = write_cert(ca, tmp_path / "tls", HOSTNAME)
    users = tmp_path / "users"
    add_user(users, "alice", PASSWORD)
    cfg = tls_config(tmp_path, cert, key, users, "127.0.0.72:2525")
    cfg["virtual_servers"][0]["listen"].append({"address": "127.0.0.72:465", "tls": True})
    gw = gateway(cfg)
    assert wait_until(lambda: _port_open(("127.0.0.72", 465)))
    context = client_context(ca)
    assert peer_certificate(("127.0.0.72", 2525), context, False) == first
    assert peer_certificate(("127.0.0.72", 465), context, True) == first
    before = starttls_smtp(("127.0.0.72", 2525), context)          # a session that outlives the reload

    _, _, second = write_cert(ca, tmp_path / "tls", HOSTNAME)
    assert second != first
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: peer_certificate(("127.0.0.72", 2525), context, False) == second)
    assert peer_certificate(("127.0.0.72", 465), context, True) == second
    assert before.noop()[0] == 250
    before.quit()

    # a broken file on reload is logged, and the certificate in use stays
    (tmp_path / "tls" / "cert.pem").write_text("broken\n")
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "TLS reload failed" in gw.log())
    assert "tls.certificate" in gw.log()
    assert gw.proc.poll() is None
    assert peer_certificate(("127.0.0.72", 465), context, True) == second


def test_broken_certificate_is_a_config_error_at_start(tmp_path):
    ca = trustme.CA()
    cert, key, _ = write_cert(ca, tmp_path / "tls", HOSTNAME)
    cert.write_text("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
    cfg = base_config(tmp_path, listen="127.0.0.73:2525")
    cfg["virtual_servers"][0]["tls"] = {"certificate": str(cert), "key": str(key)}
    gw = GatewayProcess(tmp_path, cfg)
    gw.start(wait=False)
    try:
        assert gw.proc.wait(60) != 0
        out = gw.output()
        assert "virtual_servers[0].tls.certificate: " in out and "holds no valid PEM certificate" in out
        assert not _port_open(("127.0.0.73", 2525))
    finally:
        gw.stop()
    checked = subprocess.run([*smtpgw_command(), "check-config", "-c", str(gw.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2 and "virtual_servers[0].tls.certificate: " in checked.stderr


# -- the submission example (etc/submission.yaml) ---------------------------------------------------

def submission_site(tmp: Path) -> Path:
    """The files etc/submission.yaml expects, relative to the directory smtpgw starts in."""
    ca = trustme.CA()
    write_cert(ca, tmp / "var" / "tls", HOSTNAME, "mail.example.test")
    add_user(tmp / "var" / "users", "alice", PASSWORD)
    return tmp


def test_submission_example_passes_check_config(tmp_path):
    submission_site(tmp_path)
    done = subprocess.run([*smtpgw_command(), "check-config", "-c", str(REPO / "etc" / "submission.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "0.0.0.0:587, 0.0.0.0:465 (implicit TLS); relay: authenticated clients; STARTTLS required; " \
           "AUTH required (users var/users)" in done.stdout


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_submission_example_runs_with_swaks(tmp_path, peers):
    """The shipped file, moved to this module's addresses: swaks submits over STARTTLS (587) and
    implicit TLS (465) with AUTH; without AUTH nothing is accepted."""
    submission_site(tmp_path)
    cfg = yaml.safe_load((REPO / "etc" / "submission.yaml").read_text())
    vs = cfg["virtual_servers"][0]
    vs["listen"] = ["127.0.0.76:587", {"address": "127.0.0.76:465", "tls": True}]
    cfg["connectors"][0]["smart_hosts"] = ["[127.0.0.77]"]
    peer = peers("127.0.0.77")
    gw = GatewayProcess(tmp_path, cfg)
    gw.config_path = tmp_path / "submission.yaml"
    gw.start()
    try:
        assert wait_until(lambda: _port_open(("127.0.0.76", 465)))
        base = ["swaks", "--server", "127.0.0.76", "--from", "alice@example.test", "--to", "far@remote.test",
                "--helo", "client.test", "--timeout", "30"]
        anonymous = subprocess.run([*base, "--port", "587", "--tls"], capture_output=True, text=True, timeout=60)
        assert anonymous.returncode != 0 and "530 5.7.0 Authentication required" in anonymous.stdout
        plain_text = subprocess.run([*base, "--port", "587", "--auth", "PLAIN", "--auth-user", "alice",
                                     "--auth-password", PASSWORD], capture_output=True, text=True, timeout=60)
        assert plain_text.returncode != 0 and "did not advertise authentication" in plain_text.stderr
        for port, tls in (("587", "--tls"), ("465", "--tls-on-connect")):
            sent = subprocess.run([*base, "--port", port, tls, "--auth", "LOGIN", "--auth-user", "alice",
                                   "--auth-password", PASSWORD, "--header", f"Subject: via {port}"],
                                  capture_output=True, text=True, timeout=60)
            assert sent.returncode == 0, sent.stdout + sent.stderr
            assert "235 2.7.0 Authentication successful" in sent.stdout
        assert peer.wait_for(2, timeout=30)
        subjects = sorted(email.message_from_bytes(m.data)["Subject"] for m in peer.messages)
        assert subjects == ["via 465", "via 587"]
    finally:
        gw.stop()
