"""AUTH: the users file and its hashes, `smtpgw passwd`, the SASL PLAIN/LOGIN exchange as the server
speaks it (in memory), and the configuration keys that go with them."""
from __future__ import annotations

import base64
import io
import os
import stat
from dataclasses import replace

import pytest
import yaml
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer

from mta.cli import main as cli
from mta.smtp.server.users import (
    PasswordHash, UsersFile, UsersFileChecker, UsersFileError, hash_password, parse_users, read_users,
    set_user_line, verify_password,
)
from mta.config import AuthConfig, ConfigError, TlsConfig
from mta.app.preflight import load_checked as load
from mta.config.loader import build
from mta.plugin.hookspecs import hookimpl
from mta.smtp.reply import Reply
from mta.smtp.server.session import SMTPServerFactory
from mta.smtp.server.auth import ServerAuth, mask_auth_command
from server_fakes import Code, Dialog, FakeGateway, make_config

FAST = {"ln": 4}            # scrypt parameters cheap enough for tests (the file format is the same)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def run_now(f, *args) -> defer.Deferred:
    """Runs the password check at once instead of in a thread (tests over an in-memory transport)."""
    return defer.maybeDeferred(f, *args)


def users_file(tmp_path, **users: str) -> str:
    path = tmp_path / "users"
    path.write_text("# test users\n" + "".join(f"{u}:{hash_password(p, **FAST)}\n" for u, p in users.items()))
    return str(path)


# -- hashes and the users file ---------------------------------------------------------------------

def test_scrypt_hash_round_trip_and_salt():
    first, second = hash_password("s3cret", **FAST), hash_password("s3cret", **FAST)
    assert first.startswith("scrypt$ln=4,r=8,p=1$") and first != second      # a new salt each time
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret ", first) and not verify_password("", first)


def test_default_scrypt_parameters_are_the_slow_ones():
    h = PasswordHash.parse(hash_password("x"))
    assert (h.scheme, h.params, len(h.salt), len(h.digest)) == ("scrypt", {"ln": 14, "r": 8, "p": 1}, 16, 32)


def test_pbkdf2_hash_round_trip():
    encoded = hash_password("pässword", "pbkdf2-sha256", i=1000)
    assert encoded.startswith("pbkdf2-sha256$i=1000$")
    assert verify_password("pässword", encoded) and not verify_password("password", encoded)


@pytest.mark.parametrize("line, problem", [
    ("alice", "line 2: expected user:scheme$parameters$salt$hash"),
    ("al ice:scrypt$ln=4,r=8,p=1$AAAA$" + "A" * 43, "line 2: bad user name 'al ice'"),
    ("alice:md5$x=1$AAAA$" + "A" * 43, "line 2: unknown scheme 'md5'"),
    ("alice:scrypt$ln=4$AAAA$" + "A" * 43, "line 2: scrypt needs ln (1-20), r (1-32) and p (1-16)"),
    ("alice:scrypt$ln=4,r=8,p=1$!!!!$" + "A" * 43, "line 2: salt and hash must be base64"),
])
def test_bad_users_file_lines_are_named(line, problem):
    with pytest.raises(UsersFileError) as e:
        parse_users("# comment\n" + line + "\n", "users")
    assert str(e.value).startswith("users: " + problem)


def test_duplicate_user_is_refused():
    h = hash_password("x", **FAST)
    with pytest.raises(UsersFileError, match="line 3: user 'bob' is listed twice"):
        parse_users(f"bob:{h}\n\nbob:{h}\n", "users")


def test_set_user_line_keeps_other_lines():
    text = "# users\nalice:OLD\n\n# bob below\nbob:B\n"
    assert set_user_line(text, "alice", "NEW") == "# users\nalice:NEW\n\n# bob below\nbob:B\n"
    assert set_user_line(text, "carol", "C") == text + "carol:C\n"
    assert set_user_line(text, "bob", None) == "# users\nalice:OLD\n\n# bob below\n"


def test_users_file_is_reread_when_it_changes(tmp_path):
    path = users_file(tmp_path, alice="a")
    users = UsersFile(path)
    assert users.lookup("alice").matches("a") and users.lookup("bob") is None
    with open(path, "a") as f:
        f.write(f"bob:{hash_password('b', **FAST)}\n")
    assert users.lookup("bob").matches("b")
    os.unlink(path)
    with pytest.raises(UsersFileError, match="No such file"):
        users.lookup("alice")


def test_checker_answers_through_twisted_cred(tmp_path):
    checker = UsersFileChecker(users_file(tmp_path, alice="right"), run_now)
    good = checker.requestAvatarId(UsernamePassword(b"alice", b"right"))
    assert good.result == "alice"
    for user, password in ((b"alice", b"wrong"), (b"nobody", b"right")):
        d = checker.requestAvatarId(UsernamePassword(user, password))
        failure = []
        d.addErrback(failure.append)
        assert failure[0].check(UnauthorizedLogin)


# -- smtpgw passwd -----------------------------------------------------------------------------------

def test_passwd_creates_a_private_file_and_changes_users(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "users")
    monkeypatch.setattr("sys.stdin", io.StringIO("first pass\n"))
    assert cli.main(["passwd", "-c", "--stdin", path, "alice"]) == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert read_users(path)["alice"].matches("first pass")
    with open(path, "a") as f:
        f.write("# a comment the administrator wrote\n")
    os.chmod(path, 0o640)                       # an existing file keeps its mode
    monkeypatch.setattr("getpass.getpass", lambda prompt="": "second")
    assert cli.main(["passwd", path, "bob"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("changed\n"))
    assert cli.main(["passwd", "--stdin", path, "alice"]) == 0
    users = read_users(path)
    assert users["alice"].matches("changed") and users["bob"].matches("second")
    assert "# a comment the administrator wrote\n" in open(path).read()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert cli.main(["passwd", "-D", path, "bob"]) == 0
    assert list(read_users(path)) == ["alice"]
    assert [p.name for p in tmp_path.iterdir()] == ["users"]       # no temporary file left behind
    assert "user alice changed" in capsys.readouterr().err


def test_passwd_refuses_mismatch_missing_file_and_bad_names(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "users")
    assert cli.main(["passwd", "--stdin", path, "alice"]) == 1          # no -c: the file must exist
    assert "no such file (use -c to create it)" in capsys.readouterr().err
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt="": next(answers))
    assert cli.main(["passwd", "-c", path, "alice"]) == 1
    assert "do not match" in capsys.readouterr().err and not os.path.exists(path)
    assert cli.main(["passwd", "-c", path, "bad:name"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["passwd", "-c", "--stdin", path, "alice"]) == 1      # empty password
    assert not os.path.exists(path)


# -- the SASL exchange, in memory ------------------------------------------------------------------

class AuthDialog(Dialog):
    """A Dialog whose virtual server has a users file; ``tls`` pretends STARTTLS already happened."""

    def __init__(self, users: str, tls: bool = True, hooks: list | None = None, **auth) -> None:
        config = make_config(tls=TlsConfig())
        vs = replace(config.virtual_servers[0], auth=AuthConfig(users=users, **auth))
        gateway = FakeGateway(replace(config, virtual_servers=(vs,)))
        for h in hooks or ():
            gateway.hooks.register(h)
        factory = SMTPServerFactory(gateway, vs)
        factory.auth = ServerAuth.for_virtual_server(vs, gateway.reactor, run=run_now)
        events: list = []

        class Recorder:         # listening before the session starts, as a plugin does
            @hookimpl
            def smtpgw_event(self, category, level, message, fields):
                events.append((category, message, dict(fields)))
        gateway.hooks.register(Recorder())
        super().__init__(gateway, factory)
        self.protocol.session.tls = tls
        self.events = events

    def one(self, data: bytes):
        [answer] = self.send(data)
        return answer


@pytest.fixture
def users(tmp_path):
    return users_file(tmp_path, alice="correct horse", **{"bob@example.test": "pw"})


def test_auth_is_offered_on_tls_sessions_only(users):
    plain = AuthDialog(users, tls=False)
    assert not [line for line in plain.ehlo()[0].lines if line.startswith("AUTH")]
    assert plain.one(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n").code == 538
    tls = AuthDialog(users, tls=True)
    assert "AUTH PLAIN LOGIN" in tls.ehlo()[0].lines


def test_plaintext_auth_only_for_loopback_clients_when_allowed(users):
    d = AuthDialog(users, tls=False, allow_plaintext=True)
    assert "AUTH PLAIN LOGIN" not in d.ehlo()[0].lines                  # the client is 192.0.2.7
    d.protocol.session.peer_host = "127.0.0.1"
    assert "AUTH PLAIN LOGIN" in d.ehlo()[0].lines
    assert d.one(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n").code == 235


def test_plain_with_initial_response(users):
    d = AuthDialog(users)
    d.ehlo()
    answer = d.one(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n")
    assert (answer.code, answer.text) == (235, "2.7.0 Authentication successful")
    assert d.protocol.session.authenticated_user == "alice"
    assert d.one(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n").code == Code.BAD_SEQUENCE


def test_plain_after_an_empty_challenge(users):
    d = AuthDialog(users)
    d.ehlo()
    d.protocol.dataReceived(b"AUTH PLAIN\r\n")
    assert d.transport.value() == b"334 \r\n"             # the space is there even with no challenge
    d.transport.clear()
    assert d.one(b64(b"bob@example.test\0bob@example.test\0pw") + b"\r\n").code == 235
    assert d.protocol.session.authenticated_user == "bob@example.test"


def test_login_exchange(users):
    d = AuthDialog(users)
    d.ehlo()
    d.protocol.dataReceived(b"AUTH LOGIN\r\n")
    assert d.transport.value() == b"334 VXNlcm5hbWU6\r\n"
    d.transport.clear()
    d.protocol.dataReceived(b64(b"alice") + b"\r\n")
    assert d.transport.value() == b"334 UGFzc3dvcmQ6\r\n"
    d.transport.clear()
    assert d.one(b64(b"correct horse") + b"\r\n").code == 235


def test_login_with_initial_user_name_as_smtplib_sends_it(users):
    d = AuthDialog(users)
    d.ehlo()
    assert d.one(b"AUTH LOGIN " + b64(b"alice") + b"\r\n").code == 334
    answer = d.one(b64(b"wrong") + b"\r\n")
    assert (answer.code, answer.text) == (535, "5.7.8 Authentication credentials invalid")
    assert d.protocol.session.authenticated_user is None


def test_failures_are_counted_then_421(users):
    d = AuthDialog(users, max_failures=2)
    d.ehlo()
    assert d.codes(b"AUTH PLAIN " + b64(b"\0alice\0nope") + b"\r\n") == [535]
    assert not d.closed
    assert d.codes(b"AUTH PLAIN " + b64(b"\0nobody\0nope") + b"\r\n") == [535, 421]
    assert d.closed


def test_cancel_bad_base64_unknown_mechanism_and_order(users):
    d = AuthDialog(users)
    assert d.codes(b"AUTH PLAIN\r\n") == [Code.BAD_SEQUENCE]               # before EHLO
    d.ehlo()
    assert d.codes(b"AUTH PLAIN\r\n*\r\n") == [334, 501]
    assert d.codes(b"AUTH PLAIN not-base64!\r\n") == [501]
    assert d.codes(b"AUTH CRAM-MD5\r\n") == [504]
    assert d.codes(b"AUTH PLAIN " + b64(b"carol\0alice\0correct horse") + b"\r\n") == [535]  # proxy login
    assert d.codes(b"MAIL FROM:<a@remote.test>\r\nAUTH PLAIN\r\n") == [250, Code.BAD_SEQUENCE]
    assert d.codes(b"RSET\r\nNOOP\r\n") == [250, 250]                     # cancelled exchanges left no state


def test_credentials_never_reach_diagnostics(users):
    d = AuthDialog(users)
    d.ehlo()
    d.send(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n")
    d.send(b"AUTH LOGIN\r\n")       # already authenticated: 503
    d2 = AuthDialog(users)
    d2.ehlo()
    d2.send(b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"wrong one") + b"\r\n")
    text = repr(d.events + d2.events)
    for secret in (b64(b"\0alice\0correct horse"), b64(b"wrong one"), b64(b"alice")):
        assert secret.decode() not in text
    assert "correct horse" not in text and "wrong one" not in text
    assert ("smtp_protocol", "command", {"session": d.protocol.session.id, "line": "AUTH PLAIN ***"}) in d.events
    assert [e for e in d.events if e[1] == "authenticated" and e[2]["user"] == "alice"]
    assert [e for e in d2.events if e[1] == "authentication failed"]
    assert mask_auth_command("auth login") == "auth login"


def test_smtpgw_auth_hook_sees_the_user_and_may_refuse(users):
    seen = []

    class Policy:
        @hookimpl
        def smtpgw_auth(self, session, mechanism, username):
            seen.append((mechanism, username, session.authenticated_user))
            if username.startswith("bob"):
                return Reply(535, "5.7.8", "Bob may not send from here")
            return None

    d = AuthDialog(users, hooks=[Policy()])
    d.ehlo()
    assert d.one(b"AUTH PLAIN " + b64(b"\0bob@example.test\0pw") + b"\r\n").text == "5.7.8 Bob may not send from here"
    assert d.protocol.session.authenticated_user is None
    assert d.one(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n").code == 235
    assert seen == [("PLAIN", "bob@example.test", None), ("PLAIN", "alice", None)]


def test_received_header_names_the_user_and_mail_takes_auth_param(users):
    d = AuthDialog(users)
    d.ehlo()
    d.send(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n")
    assert d.codes(b"MAIL FROM:<alice@example.test> AUTH=<>\r\nRCPT TO:<u@example.test>\r\nDATA\r\n") == [
        250, 250, 354]
    assert d.codes(b"Subject: hi\r\n\r\nhello\r\n.\r\n") == [250]
    [sub] = d.submitted
    assert b"\r\n\t(Authenticated sender: alice)\r\n\tby " in sub.message
    assert b" with ESMTPSA id " in sub.message
    assert sub.session.authenticated_user == "alice"


def test_auth_required_refuses_anonymous_mail(users):
    d = AuthDialog(users, required=True)
    d.ehlo()
    answer = d.one(b"MAIL FROM:<a@remote.test>\r\n")
    assert (answer.code, answer.text) == (530, "5.7.0 Authentication required")
    d.send(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n")
    assert d.codes(b"MAIL FROM:<a@remote.test>\r\n") == [250]


def test_broken_users_file_at_run_time_is_a_temporary_failure(users):
    d = AuthDialog(users)
    d.ehlo()
    with open(users, "a") as f:
        f.write("this line is broken\n")
    assert d.codes(b"AUTH PLAIN " + b64(b"\0alice\0correct horse") + b"\r\n") == [454]
    assert d.protocol.auth_failures == 0


def test_no_auth_without_users_file():
    d = Dialog()
    d.ehlo()
    assert d.codes(b"AUTH PLAIN\r\n") == [Code.BAD_SEQUENCE]


# -- configuration -----------------------------------------------------------------------------------

def minimal(**vs_over) -> dict:
    vs = {"name": "VS", "listen": ["127.0.0.1:2525"], **vs_over}
    return {"gateway": {"hostname": "gw.example.test"}, "virtual_servers": [vs]}


def test_auth_keys_and_defaults():
    vs = build(minimal()).virtual_servers[0]
    assert vs.auth == AuthConfig(users=None, allow_plaintext=False, max_failures=3, required=False)
    vs = build(minimal(auth={"users": "u", "allow_plaintext": True, "max_failures": 5, "required": True})
               ).virtual_servers[0]
    assert vs.auth == AuthConfig(users="u", allow_plaintext=True, max_failures=5, required=True)


@pytest.mark.parametrize("vs, message", [
    ({"auth": {"users": "u"}},
     "virtual_servers[0].auth.users: AUTH is only offered over TLS: set tls.certificate and tls.key "
     "(or auth.allow_plaintext: true, for loopback clients while testing)"),
    ({"auth": {"required": True}}, "virtual_servers[0].auth.required: AUTH cannot be required without auth.users"),
    ({"auth": {"users": "u", "allow_plaintext": True, "max_failures": 0}},
     "virtual_servers[0].auth.max_failures: expected an integer from 1 to 100, got 0"),
    ({"auth": {"allow_plaintext": "yes"}},
     "virtual_servers[0].auth.allow_plaintext: expected true or false, got 'yes'"),
    ({"listen": [{"address": "127.0.0.1:465", "tls": True}]},
     "virtual_servers[0].listen[0].tls: implicit TLS needs tls.certificate and tls.key"),
])
def test_auth_and_tls_combinations_that_cannot_work(vs, message):
    with pytest.raises(ConfigError) as e:
        build(minimal(**vs))
    assert str(e.value) == message


def _write(tmp_path, data) -> str:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_files_are_checked_when_a_configuration_is_loaded(tmp_path):
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("gw.example.test")
    good_cert, good_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(good_cert))
    cert.private_key_pem.write_to_path(str(good_key))
    other_key = tmp_path / "other.pem"
    trustme.CA().issue_cert("x.test").private_key_pem.write_to_path(str(other_key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    users = users_file(tmp_path, alice="x")

    def tls(certificate, key, users_path=users):
        return minimal(tls={"certificate": str(certificate), "key": str(key)}, auth={"users": str(users_path)})

    assert load(_write(tmp_path, tls(good_cert, good_key))).virtual_servers[0].tls.certificate == str(good_cert)
    cases = [
        (tls(garbage, good_key), "virtual_servers[0].tls.certificate: ", "holds no valid PEM certificate"),
        (tls(tmp_path / "absent.pem", good_key), "virtual_servers[0].tls.certificate: ", "No such file"),
        (tls(good_cert, garbage), "virtual_servers[0].tls.key: ", "holds no valid unencrypted PEM private key"),
        (tls(good_cert, other_key), "virtual_servers[0].tls.key: ", "does not match the certificate"),
        (tls(good_cert, good_key, tmp_path / "nobody"), "virtual_servers[0].auth.users: ", "no such file"),
        (tls(good_cert, good_key, garbage), "virtual_servers[0].auth.users: ", "line 1: expected user:"),
    ]
    for data, key, problem in cases:
        with pytest.raises(ConfigError) as e:
            load(_write(tmp_path, data))
        assert str(e.value).startswith(key) and problem in str(e.value), str(e.value)
