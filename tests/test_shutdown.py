"""Stopping the running gateway: every open session is told ``421 4.3.2 Service shutting down``, a
message on its way to the spool is finished and acknowledged first, the stop is one line in the log,
and a second signal while stopping is a line, not a traceback."""
from __future__ import annotations

import signal
import socket
import textwrap
import time

from gwprocess import base_config, maildir_messages, wait_until

HOST, PORT = "127.0.0.125", 2525
SHUTTING_DOWN = b"421 4.3.2 Service shutting down"


class Client:
    """A raw SMTP client: sends lines, reads replies as they come."""

    def __init__(self) -> None:
        self.sock = socket.create_connection((HOST, PORT), timeout=30)
        self.buf = b""
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        """The next complete reply (its last line), or b'' at end of connection."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    self.buf = b"\r\n".join(lines[i + 1:])
                    return line
            data = self.sock.recv(65536)
            if not data:
                return b""
            self.buf += data

    def command(self, line: str) -> bytes:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def open_transaction(self) -> None:
        """EHLO, MAIL, RCPT and DATA, up to the 354."""
        assert self.command("EHLO client.test").startswith(b"250")
        assert self.command("MAIL FROM:<alice@example.test>").startswith(b"250")
        assert self.command("RCPT TO:<bob@example.test>").startswith(b"250")
        assert self.command("DATA").startswith(b"354")

    def send_message(self, subject: str) -> None:
        """A whole transaction but for the reply to the final dot."""
        self.open_transaction()
        self.sock.sendall(f"Subject: {subject}\r\n\r\nHello.\r\n.\r\n".encode())

    def close(self) -> None:
        self.sock.close()


def slow_data_hook(tmp_path, seconds: float) -> str:
    """A site hook that answers ``smtpgw_data`` only after ``seconds``: a message stays on its way to
    the spool long enough to stop the gateway meanwhile (a slow disk, a slow content filter)."""
    path = tmp_path / "slow.py"
    path.write_text(textwrap.dedent(f'''
        from twisted.internet import reactor
        from twisted.internet.task import deferLater
        from twisted.logger import Logger
        from mta.plugin.hookspecs import hookimpl

        @hookimpl
        def smtpgw_data(session, envelope, message):
            Logger(namespace="slow").info("slow hook holds the message")
            return deferLater(reactor, {seconds}, lambda: None)
    '''))
    return str(path)


def config(tmp_path, hook_seconds: float | None = None) -> dict:
    cfg = base_config(tmp_path, listen=f"{HOST}:{PORT}")
    if hook_seconds is not None:
        cfg["plugins"]["local"] = [slow_data_hook(tmp_path, hook_seconds)]
    return cfg


def test_open_sessions_are_told_421_and_the_stop_is_one_line(gateway, tmp_path):
    gw = gateway(config(tmp_path))
    idle = Client()
    assert idle.command("EHLO client.test").startswith(b"250")
    busy = Client()
    busy.open_transaction()
    busy.sock.sendall(b"Subject: cut short\r\n\r\nhalf a messa")
    gw.proc.send_signal(signal.SIGTERM)
    for client in (idle, busy):
        assert client.reply() == SHUTTING_DOWN
        assert client.reply() == b""                     # and the connection is closed
        client.close()
    assert gw.proc.wait(30) in (0, -signal.SIGTERM)
    log = gw.log()
    stopped = [line for line in log.splitlines() if " stopped: " in line]
    assert len(stopped) == 1 and "gateway stopped: 2 open session(s) told 421 4.3.2" in stopped[0], stopped
    assert "Traceback" not in log and "Stopping factory" not in log
    assert not maildir_messages(tmp_path / "mail", "bob"), "the cut message was not accepted"


def test_a_message_on_its_way_to_the_spool_is_finished_first(gateway, tmp_path):
    gw = gateway(config(tmp_path, hook_seconds=1.5))
    client = Client()
    client.send_message("in flight")
    assert wait_until(lambda: "slow hook holds the message" in gw.log())
    gw.proc.send_signal(signal.SIGTERM)
    accepted = client.reply()
    assert accepted.startswith(b"250 2.0.0 Ok: queued as "), accepted
    assert client.reply() == SHUTTING_DOWN
    assert client.reply() == b""
    assert gw.proc.wait(30) in (0, -signal.SIGTERM)
    queue_id = accepted.rsplit(b" ", 1)[1].decode()
    spooled = (tmp_path / "spool" / "queue" / queue_id).exists()
    delivered = any(b"Subject: in flight" in m for m in maildir_messages(tmp_path / "mail", "bob"))
    assert spooled or delivered, gw.log()
    assert "gateway stopped: 1 open session(s) told 421 4.3.2" in gw.log()


def test_a_second_signal_while_stopping_is_one_line_not_a_traceback(gateway, tmp_path):
    gw = gateway(config(tmp_path, hook_seconds=2))
    client = Client()
    client.send_message("slow")
    assert wait_until(lambda: "slow hook holds the message" in gw.log())
    gw.proc.send_signal(signal.SIGTERM)                  # the stop waits for the message...
    assert wait_until(lambda: "Received SIGTERM" in gw.log())
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGTERM):      # ...and is asked again
        gw.proc.send_signal(number)
        time.sleep(0.05)                                 # apart, or the kernel merges them
    assert client.reply().startswith(b"250")
    assert client.reply() == SHUTTING_DOWN
    assert gw.proc.wait(30) in (0, -signal.SIGTERM)
    log = gw.log()
    assert "Traceback" not in log and "ReactorNotRunning" not in log, log
    assert log.count("received while stopping; already stopping") == 1
    assert len([line for line in log.splitlines() if "gateway stopped: " in line]) == 1
