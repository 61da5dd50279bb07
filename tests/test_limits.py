"""Issue 13's attacks on one client's input, each against the running gateway (``twistd``): a client
that floods without reading its replies (RSS of the process tree before and after, with the protocol
log on), ``limits.max_errors``, and the protocol log thinned to one line per kind of rejected command
per second. Addresses: 127.0.0.200-209."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import psutil

from gwprocess import base_config, wait_until

SERVER = "127.0.0.200"
ATTACKER = "127.0.0.201"
OTHER = "127.0.0.202"
MB = 1 << 20


def config(tmp_path: Path, **limits) -> dict:
    cfg = base_config(tmp_path, listen=f"{SERVER}:25")
    cfg["virtual_servers"][0]["limits"].update(limits)
    return cfg


def connect(source: str = ATTACKER, timeout: float = 10.0) -> socket.socket:
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect((SERVER, 25))
    return s


def read_reply(f) -> list[bytes]:
    """One whole (multi-line) reply."""
    lines = []
    while True:
        line = f.readline()
        assert line, f"connection closed after {lines}"
        lines.append(line)
        if line[3:4] != b"-":
            return lines


def chat(source: str = OTHER) -> bytes:
    """A well-behaved client: banner, EHLO, NOOP, QUIT; the NOOP's reply."""
    with connect(source) as s:
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"EHLO other.test\r\n")
        read_reply(f)
        s.sendall(b"NOOP\r\n")
        reply = read_reply(f)[0]
        s.sendall(b"QUIT\r\n")
        return reply


def tree_rss(pid: int) -> int:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def flood_without_reading(s: socket.socket, payload: bytes, total: int, stall: float = 1.0) -> int:
    """Send ``payload`` repeatedly, never reading, until ``total`` bytes went out or the gateway has
    taken nothing for ``stall`` seconds (it stopped reading); the bytes sent."""
    block = payload * (64 * 1024 // len(payload))
    s.setblocking(False)
    sent, last_progress = 0, time.monotonic()
    while sent < total and time.monotonic() - last_progress < stall:
        try:
            n = s.send(block)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        except (BrokenPipeError, ConnectionResetError):    # the gateway hung up
            break
        sent += n
        last_progress = time.monotonic()
    return sent


def test_flood_without_reading_leaves_memory_bounded(gateway, tmp_path):
    """F1: pipelined NOOPs from a client that never reads. Each would buffer a reply in the gateway;
    with backpressure it stops reading once 64 KB of replies wait, so the client can push only what
    the kernel's buffers hold, the process tree grows by little, and others are still served."""
    cfg = config(tmp_path)
    cfg["virtual_servers"][0]["protocol_log"] = {"enabled": True, "directory": str(tmp_path / "log")}
    gw = gateway(cfg)
    assert chat().startswith(b"250")
    before = tree_rss(gw.proc.pid)
    with connect() as s:
        sent = flood_without_reading(s, b"NOOP\r\n", 64 * MB)
        assert sent < 64 * MB, "the gateway read everything: no backpressure"
        grown = tree_rss(gw.proc.pid) - before
        assert grown < 24 * MB, f"process tree grew by {grown / MB:.1f} MB after {sent / MB:.1f} MB of NOOPs"
        assert chat().startswith(b"250")      # the reactor serves everyone else meanwhile
    assert chat().startswith(b"250")


def test_too_many_errors_closes_the_session(gateway, tmp_path):
    """limits.max_errors (Postfix's smtpd_hard_error_limit): the last allowed error is answered, then
    421 4.7.0 and the connection closes; a message accepted in between starts the count again."""
    gateway(config(tmp_path, max_errors=3))
    with connect() as s:
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"EHLO client.test\r\n")
        read_reply(f)
        s.sendall(b"BOGUS\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        assert read_reply(f)[0].startswith(b"500")
        assert read_reply(f)[0].startswith(b"250")
        assert read_reply(f)[0].startswith(b"250")
        assert read_reply(f)[0].startswith(b"354")
        s.sendall(b"Subject: x\r\n\r\nhi\r\n.\r\n")
        assert read_reply(f)[0].startswith(b"250")      # delivered: the count starts again
        s.sendall(b"BOGUS\r\nBOGUS\r\nBOGUS\r\nNOOP\r\n")
        assert [read_reply(f)[0][:3] for _ in range(3)] == [b"500"] * 3
        assert read_reply(f)[0].startswith(b"421 4.7.0")
        assert f.readline() == b""


def test_newline_flood_is_cut_off_after_max_errors(gateway, tmp_path):
    """F1's flood of bare LFs: 20 errors (the default) and the session is over, having read and
    answered a bounded amount, whatever the client sends."""
    gw = gateway(config(tmp_path))
    with connect() as s:
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"\n" * 1000)
        replies = []
        while (line := f.readline()):
            replies.append(line)
    assert replies[:20] == [b"500 5.5.2 Command contains bare CR or LF\r\n"] * 20
    assert replies[20:] == [b"421 4.7.0 Too many errors\r\n"]
    before = tree_rss(gw.proc.pid)
    with connect() as s:
        read_reply(s.makefile("rb"))
        sent = flood_without_reading(s, b"\n", 64 * MB)
    assert sent < 64 * MB
    assert tree_rss(gw.proc.pid) - before < 16 * MB
    assert chat().startswith(b"250")


def test_protocol_log_writes_one_line_per_kind_of_rejection_per_second(gateway, tmp_path):
    """F13: 500 bare-LF lines in one session make two log lines at most (the first, then one saying
    how many it stands for), not 500."""
    cfg = config(tmp_path, max_errors=1000)
    cfg["virtual_servers"][0]["protocol_log"] = {"enabled": True, "directory": str(tmp_path / "log"),
                                                 "period": "unlimited"}
    gw = gateway(cfg)
    with connect() as s:
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"\n" * 500 + b"QUIT\r\n")
        for _ in range(500):
            assert read_reply(f)[0].startswith(b"500")
        assert read_reply(f)[0].startswith(b"221")
    log = tmp_path / "log" / "SMTPSVC1" / "extend1.log"
    assert wait_until(lambda: log.exists() and "QUIT" in log.read_text())
    rejected = [line for line in log.read_text().splitlines() if " 500 " in line]
    assert 1 <= len(rejected) <= 2, rejected
    counts = [int(line.split("[x", 1)[1].split("]", 1)[0]) if "[x" in line else 1 for line in rejected]
    assert sum(counts) == 500, rejected
    gw.stop()


# -- per-client limits (anvil) ---------------------------------------------------------------------

def banner(source: str) -> tuple[bytes, socket.socket]:
    s = connect(source)
    return s.makefile("rb").readline(), s


def hold_connections(source: str, n: int) -> list[socket.socket]:
    held = []
    for _ in range(n):
        line, s = banner(source)
        assert line.startswith(b"220 "), line
        held.append(s)
    return held


def per_client_limit_holds(gw) -> None:
    held = hold_connections(ATTACKER, 3)
    try:
        for _ in range(4):          # whichever worker the kernel picks
            line, s = banner(ATTACKER)
            s.close()
            assert line == f"421 4.7.0 Error: too many connections from {ATTACKER}\r\n".encode(), line
        assert chat(OTHER).startswith(b"250")      # another address is still served
        held.pop().close()

        def admitted() -> bool:
            line, s = banner(ATTACKER)
            if line.startswith(b"220 "):
                held.append(s)
                return True
            s.close()
            return False

        assert wait_until(admitted, 10, interval=0.05)
    finally:
        for s in held:
            s.close()


def test_connections_per_client_are_limited(gateway, tmp_path):
    """F6: one address cannot take every slot; other addresses are still served."""
    gw = gateway(config(tmp_path, max_connections_per_client=3))
    per_client_limit_holds(gw)


def test_connections_per_client_are_limited_over_two_workers(gateway, tmp_path):
    """The count is the gateway's, in <spool>/client.counts, however the kernel spreads connections."""
    cfg = config(tmp_path, max_connections_per_client=3)
    cfg["gateway"]["workers"] = 2
    gw = gateway(cfg)
    assert wait_until(lambda: "worker 1 started" in gw.log(), 30), gw.log()
    per_client_limit_holds(gw)
    assert (tmp_path / "spool" / "client.counts").exists()


def test_connection_rate_per_client(gateway, tmp_path):
    """limits.max_connection_rate: the fourth connection in a minute is refused, also counting the
    ones already closed; another address is not affected."""
    gateway(config(tmp_path, max_connection_rate=3))
    for _ in range(3):
        line, s = banner(ATTACKER)
        s.close()
        assert line.startswith(b"220 ")
    line, s = banner(ATTACKER)
    s.close()
    assert line == f"421 4.7.0 Error: too many connections from {ATTACKER} this minute\r\n".encode()
    assert chat(OTHER).startswith(b"250")


def drip(s: socket.socket, data: bytes, every: float, limit: float) -> bytes:
    """Send ``data`` a byte at a time until the gateway answers (or ``limit`` seconds pass)."""
    s.settimeout(every)
    deadline = time.monotonic() + limit
    for i in range(len(data) * 100):
        try:
            s.sendall(data[i % len(data):i % len(data) + 1])
        except OSError:
            break
        try:
            answer = s.recv(4096)
            return answer
        except socket.timeout:
            if time.monotonic() > deadline:
                return b""
    s.settimeout(5)
    return s.recv(4096)


def test_a_command_line_must_be_complete_within_the_timeout(gateway, tmp_path):
    """F6: one byte every 0.3 s used to keep a session forever (the idle timer reset on every byte);
    now the line must be complete within ``timeout``."""
    gateway(config(tmp_path, timeout="2s"))
    with connect() as s:
        f = s.makefile("rb")
        read_reply(f)
        started = time.monotonic()
        answer = drip(s, b"EHLO slow.client.test", every=0.3, limit=10)
        assert answer.startswith(b"421 4.4.2 gw.example.test Error: timeout exceeded"), answer
        assert 1.5 < time.monotonic() - started < 5
    assert chat().startswith(b"250")


def test_data_must_keep_the_minimum_rate(gateway, tmp_path):
    """limits.min_data_rate: a message trickling in below the rate is cut with 421 4.4.2 once the
    grace (the first minute, here the 2 s timeout) has passed, although bytes keep coming."""
    gateway(config(tmp_path, timeout="2s", min_data_rate="1KB"))
    with connect() as s:
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"EHLO slow.client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        assert [read_reply(f)[-1][:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        started = time.monotonic()
        answer = drip(s, b"Subject: slow\r\n\r\nx\r\n", every=0.3, limit=10)
        assert answer.startswith(b"421 4.4.2 gw.example.test Error: data rate too low"), answer
        assert 1.5 < time.monotonic() - started < 5
    assert not (tmp_path / "mail" / "bob" / "new").exists() or not list((tmp_path / "mail" / "bob" / "new").iterdir())


# -- AUTH failures per client --------------------------------------------------------------------

def auth_config(tmp_path: Path) -> dict:
    from mta.smtp.server.users import hash_password
    users = tmp_path / "users"
    users.write_text(f"alice:{hash_password('right', ln=4)}\n")
    cfg = config(tmp_path)
    cfg["virtual_servers"][0]["auth"] = {"users": str(users), "allow_plaintext": True, "max_failures": 2,
                                         "max_failures_per_client": {"count": 3, "per": "1h"}}
    return cfg


def auth_plain(f, s, password: str) -> bytes:
    import base64
    s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0alice\0" + password.encode()) + b"\r\n")
    return read_reply(f)[0]


def test_auth_failures_are_counted_per_client_across_connections(gateway, tmp_path):
    """F7: reconnecting used to buy more guesses. Two failures end a connection (max_failures), the
    third failure from the address in the window locks AUTH for it: 454 4.7.0, even with the right
    password; another address authenticates."""
    gateway(auth_config(tmp_path))

    def session(source: str = ATTACKER):
        s = connect(source)
        f = s.makefile("rb")
        read_reply(f)
        s.sendall(b"EHLO client.test\r\n")
        read_reply(f)
        return s, f

    s, f = session()
    assert auth_plain(f, s, "guess1").startswith(b"535 5.7.8")
    assert auth_plain(f, s, "guess2").startswith(b"535 5.7.8")
    assert read_reply(f)[0].startswith(b"421 4.7.0")
    s.close()
    s, f = session()
    assert auth_plain(f, s, "guess3").startswith(b"535 5.7.8")
    assert auth_plain(f, s, "guess4").startswith(b"454 4.7.0")
    s.close()
    s, f = session()
    assert auth_plain(f, s, "right").startswith(b"454 4.7.0")
    s.close()
    s, f = session(OTHER)
    assert auth_plain(f, s, "right").startswith(b"235 2.7.0")
    s.close()


def test_password_checks_run_in_their_own_small_pool():
    """F7: scrypt in the reactor's shared pool queued ahead of Maildir deliveries; the checks now
    have a pool of their own (two threads), and the reactor's pool is never asked for."""
    import queue
    import threading

    from mta.smtp.server import users

    class Reactor:
        def __init__(self) -> None:
            self.calls: queue.Queue = queue.Queue()
            self.triggers: list = []

        def callFromThread(self, f, *args, **kw) -> None:
            self.calls.put((f, args, kw))

        def addSystemEventTrigger(self, *args) -> None:
            self.triggers.append(args)

        def getThreadPool(self):
            raise AssertionError("the reactor's shared pool was used")

    reactor = Reactor()
    run = users.thread_runner(reactor)
    names: list[str] = []
    d = run(lambda: threading.current_thread().name)
    d.addCallback(names.append)
    f, args, kw = reactor.calls.get(timeout=10)
    f(*args, **kw)
    assert names and "smtpgw-auth" in names[0], names
    pool = users._pools[id(reactor)].pool
    assert pool.max == users.AUTH_THREADS == 2
    [(phase, event, stop)] = reactor.triggers
    stop()


def test_two_workers_share_the_per_client_table(tmp_path):
    """<spool>/client.counts: each worker writes its own slots, every worker reads the sum; a
    restarted worker starts from zero; AUTH failure windows end."""
    from mta.workers.clients import ClientCounts
    from mta.workers.identity import WorkerInfo

    now = [1_000_000.0]
    a = ClientCounts(str(tmp_path), WorkerInfo(0, 2), pid=101, clock=lambda: now[0])
    b = ClientCounts(str(tmp_path), WorkerInfo(1, 2), pid=102, clock=lambda: now[0])
    bucket = a.bucket(0, "192.0.2.1")
    assert b.bucket(0, "192.0.2.1") == bucket != a.bucket(1, "192.0.2.1")     # one secret, per virtual server
    a.opened(bucket)
    b.opened(bucket)
    assert a.connections(bucket) == b.connections(bucket) == 2
    assert (a.attempt(bucket), b.attempt(bucket)) == (1, 2)
    now[0] += 60
    assert a.attempt(bucket) == 1                   # a new minute
    a.auth_failed(bucket, 600)
    b.auth_failed(bucket, 600)
    assert a.auth_failures(bucket, 600) == 2
    now[0] += 601
    assert a.auth_failures(bucket, 600) == 0        # the window has passed
    restarted = ClientCounts(str(tmp_path), WorkerInfo(1, 2), pid=103, clock=lambda: now[0])
    assert restarted.connections(bucket) == 1 and not b.owner
    b.closed(bucket)                                # the old process no longer writes
    assert a.connections(bucket) == 1


def test_relay_allowed_clients_are_exempt_from_the_connection_limits(gateway, tmp_path):
    """As Postfix exempts $mynetworks (smtpd_client_event_limit_exceptions): the site's own servers in
    relay.allow may open more connections than an outside client."""
    cfg = config(tmp_path, max_connections_per_client=3)
    cfg["virtual_servers"][0]["relay"]["allow"] = [f"{OTHER}/32"]
    gateway(cfg)
    held = hold_connections(OTHER, 5)                  # past the limit of 3, all greeted 220
    try:
        line, s = banner(ATTACKER)
        s.close()
        assert line.startswith(b"220 ")                 # an outside client is still counted on its own
    finally:
        for s in held:
            s.close()
