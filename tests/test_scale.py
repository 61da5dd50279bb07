"""One client's input at scale (issue 13): a message to thousands of recipients is delivered while
other clients are still served, its envelope counts against the message memory, and the largest
envelope the limits allow survives a restart.

Addresses: this module's own 127.0.0.230-239 (gateway .230, peers .231-.233), port 25 / 2525.
"""
from __future__ import annotations

import socket
import threading
import time

from gwprocess import base_config, wait_until
from peers import DEFAULT_EXTENSIONS

GW_HOST, GW_PORT = "127.0.0.230", 2525
PEER = "127.0.0.231"
PROBE = "127.0.0.232"           # the second client, from its own address
MSG = b"From: a@remote.test\r\nSubject: many\r\n\r\nbody\r\n"


def relay_config(tmp_path, max_recipients: int = 10000) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    vs = cfg["virtual_servers"][0]
    vs["limits"]["max_recipients"] = max_recipients
    vs["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{PEER}]"]
    return cfg


def pipelined_envelope(recipients: list[str], params: str = "", sender: str = "s@remote.test",
                       mail_params: str = "") -> bytes:
    lines = ["EHLO client.test", f"MAIL FROM:<{sender}>{mail_params}"]
    lines += [f"RCPT TO:<{r}>{params}" for r in recipients]
    return ("\r\n".join(lines) + "\r\n").encode()


class Client:
    """A raw SMTP client that pipelines the envelope (the way a bulk sender does)."""

    def __init__(self, host: str = GW_HOST, port: int = GW_PORT, source: str = "127.0.0.233") -> None:
        self.sock = socket.create_connection((host, port), timeout=30, source_address=(source, 0))
        self.buf = b""
        self.reply()                                # the banner

    def reply(self) -> tuple[int, str]:
        """The next whole reply: (code, last line)."""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                return int(line[:3]), line.decode()

    def replies(self, n: int) -> list[tuple[int, str]]:
        return [self.reply() for _ in range(n)]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()

    def again(self, recipients: list[str], params: str = "", sender: str = "s@remote.test") -> list[int]:
        """Another transaction on this connection (no EHLO): the codes of MAIL and every RCPT."""
        self.send(pipelined_envelope(recipients, params, sender)[len(b"EHLO client.test\r\n"):])
        return [code for code, _ in self.replies(1 + len(recipients))]

    def data(self, message: bytes = MSG, quit: bool = False) -> tuple[int, str]:
        """DATA, its 354 awaited (no pipelining across it), then the message: the reply to its end."""
        self.send(b"DATA\r\n")
        assert self.reply()[0] == 354
        self.send(message + b".\r\n" + (b"QUIT\r\n" if quit else b""))
        return self.reply()


def banner_latency(host: str = GW_HOST, port: int = GW_PORT) -> float:
    """Seconds from connect to the whole 220 line, from the probe's own address."""
    start = time.monotonic()
    with socket.create_connection((host, port), timeout=30, source_address=(PROBE, 0)) as s:
        greeting = s.makefile("rb").readline()
        took = time.monotonic() - start
        s.sendall(b"QUIT\r\n")
    assert greeting.startswith(b"220"), greeting
    return took


class LatencySampler(threading.Thread):
    """Samples the banner latency every 50 ms until stopped."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: list[float] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(banner_latency())
            self.stopping.wait(0.05)

    def stop(self) -> list[float]:
        self.stopping.set()
        self.join(60)
        return self.samples


# -- item 3: no work proportional to N per batch ------------------------------------------------------

def test_a_message_to_4000_recipients_leaves_other_clients_served(gateway, peers, tmp_path):
    peer = peers(PEER, extensions=DEFAULT_EXTENSIONS + ("DSN",))
    gateway(relay_config(tmp_path))
    recipients = [f"user{i}@dest{i % 3}.test" for i in range(4000)]
    orcpt = "rfc822;" + "x" * 300 + "+40remote.test"
    client = Client()
    client.send(pipelined_envelope(recipients, f" NOTIFY=SUCCESS,FAILURE ORCPT={orcpt}", mail_params=" RET=HDRS"))
    answers = client.replies(2 + len(recipients))
    assert all(code == 250 for code, _ in answers), [a for a in answers if a[0] != 250][:3]
    sampler = LatencySampler()
    sampler.start()
    assert client.data(quit=True)[0] == 250
    delivered = peer.wait_until(lambda: sum(len(m.recipients) for m in peer.messages) >= len(recipients), 120)
    samples = sampler.stop()
    client.close()
    assert delivered, f"{sum(len(m.recipients) for m in peer.messages)} of {len(recipients)} delivered"
    assert sorted(r for m in peer.messages for r in m.recipients) == sorted(recipients)
    rcpt_lines = [line for line in peer.transcript if line.startswith(b"RCPT TO:")]
    assert all(b" NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;xxx" in line for line in rcpt_lines)
    assert samples and max(samples) < 1.0, f"banner latency up to {max(samples):.2f}s over {len(samples)} samples"


def test_the_envelope_counts_against_message_memory(gateway, peers, tmp_path):
    """F8: recipients with long ORCPTs fill the budget like message bytes do; past it each gets
    452 4.3.1, the accepted ones are delivered, and the client's second transaction brings the rest."""
    peer = peers(PEER, extensions=DEFAULT_EXTENSIONS + ("DSN",))
    cfg = relay_config(tmp_path)
    cfg["gateway"]["message_memory"] = "256KB"
    cfg["virtual_servers"][0]["limits"]["max_message_size"] = "64KB"
    gateway(cfg)
    recipients = [f"user{i}@dest.test" for i in range(400)]
    params = " NOTIFY=FAILURE ORCPT=rfc822;" + "o" * 480
    client = Client()
    client.send(pipelined_envelope(recipients, params))
    answers = client.replies(2 + len(recipients))[2:]
    accepted = [r for r, (code, _) in zip(recipients, answers) if code == 250]
    refused = [(r, line) for r, (code, line) in zip(recipients, answers) if code != 250]
    assert 50 < len(accepted) < len(recipients)
    assert accepted == recipients[:len(accepted)]
    assert all(line == "452 4.3.1 Insufficient system storage" for _, line in refused)
    assert client.data()[0] == 250
    rest = [r for r, _ in refused]
    assert set(client.again(rest, params)) == {250}
    assert client.data(quit=True)[0] == 250
    client.close()
    assert peer.wait_until(lambda: sum(len(m.recipients) for m in peer.messages) >= len(recipients), 60)
    assert sorted(r for m in peer.messages for r in m.recipients) == sorted(recipients)


# -- item 4: nothing accepted is lost for its size -----------------------------------------------------

def longest_address(i: int) -> str:
    """A distinct address of the longest length a path allows (254 octets: 64 + 1 + 189)."""
    local = f"{i:05d}" + "x" * 59
    domain = "a" * 63 + "." + "b" * 63 + "." + "c" * 56 + ".test"
    return f"{local}@{domain}"


def test_the_largest_envelope_the_limits_allow_survives_a_restart(gateway, peers, tmp_path):
    """F3: every recipient as long as a path may be, with every DSN parameter at its longest; the
    gateway is killed before it could deliver, and the next one reads the envelope back and delivers."""
    later = "127.0.0.234"                       # nothing listens there until the restart
    cfg = relay_config(tmp_path, max_recipients=1000)
    cfg["connectors"][0]["smart_hosts"] = [f"[{later}]"]
    first = gateway(cfg)
    recipients = [longest_address(i) for i in range(1000)]
    orcpt = "rfc822;" + "o" * (500 - len("rfc822;"))
    client = Client()
    client.send(pipelined_envelope(recipients, f" NOTIFY=SUCCESS,FAILURE,DELAY ORCPT={orcpt}",
                                   mail_params=" RET=FULL ENVID=" + "e" * 100))
    answers = client.replies(2 + len(recipients))
    assert all(code == 250 for code, _ in answers), [a for a in answers if a[0] != 250][:3]
    code, line = client.data(quit=True)
    client.close()
    assert code == 250, line
    queue = tmp_path / "spool" / "queue"
    [spooled] = [p for p in queue.iterdir() if not p.name.endswith(".st")]
    with spooled.open("rb") as f:
        assert len(f.readline()) > 1000 * 1000          # the envelope: over a megabyte of header
    first.kill9()

    peer = peers(later, extensions=DEFAULT_EXTENSIONS + ("DSN",))
    second = gateway(cfg)
    assert peer.wait_until(lambda: sum(len(m.recipients) for m in peer.messages) >= len(recipients), 60)
    assert sorted(r for m in peer.messages for r in m.recipients) == sorted(recipients)
    assert "ENVID=" + "e" * 100 in peer.messages[0].mail_params
    assert not list((tmp_path / "spool" / "corrupt").iterdir())
    assert "corrupt" not in second.log()


# -- item 6: disk amplification bounded ----------------------------------------------------------------

def files_in(mail, box: str) -> list:
    new = mail / box / "new"
    return list(new.iterdir()) if new.is_dir() else []


def test_one_message_creates_at_most_50_new_mailboxes_and_writes_one_file_each(gateway, tmp_path):
    """F5: past local_domains.<d>.max_new_mailboxes_per_message (50) a new mailbox gets 452 4.5.3 and
    the client sends it later; mailboxes that exist are always taken; a mailbox gets one copy however
    many recipients stand for it (case, +tags)."""
    cfg = relay_config(tmp_path)
    cfg["gateway"]["recipient_delimiter"] = "+"
    gateway(cfg)
    mail = tmp_path / "mail"
    for box in ("bob", "carol"):
        (mail / box / "new").mkdir(parents=True)
    new = [f"new{i}@example.test" for i in range(60)]
    same_box = [f"new0+tag{i}@example.test" for i in range(20)] + ["NEW0@example.test"]
    recipients = new[:30] + same_box + ["bob@example.test"] + new[30:] + ["carol@example.test"]
    client = Client()
    client.send(pipelined_envelope(recipients, sender="a@remote.test"))
    answers = dict(zip(recipients, client.replies(2 + len(recipients))[2:]))
    refused = [r for r, (code, _) in answers.items() if code != 250]
    assert refused == new[50:]
    assert {answers[r][1] for r in refused} == {"452 4.5.3 Too many new mailboxes for one message, send the rest later"}
    assert client.data()[0] == 250
    boxes = [f"new{i}" for i in range(50)] + ["bob", "carol"]
    assert wait_until(lambda: all(files_in(mail, b) for b in boxes))
    assert sorted(p.name for p in mail.iterdir()) == sorted(boxes)
    assert len(files_in(mail, "new0")) == 1                 # 22 recipients, one file

    assert set(client.again(refused, sender="a@remote.test")) == {250}
    assert client.data(quit=True)[0] == 250
    client.close()
    assert wait_until(lambda: all(files_in(mail, r.partition("@")[0]) for r in refused))
