"""Two hostile loads, each measured by how everyone else is served meanwhile (issue 13).

- ``fanout``: one client sends one message to R recipients (default 10,000), each with
  ``NOTIFY=SUCCESS,FAILURE`` and a 300-character ``ORCPT``, relayed to the sink. From its first
  RCPT until the sink has every recipient's transaction, a probe from its own address connects
  every 20 ms and times connect -> whole ``220`` line. The bar: under 100 ms
  throughout. Reported: the banner latency (p50, p99, max), seconds until the last recipient is at
  the sink, and the target's peak RSS.
- ``flood``: an attacker connects, says EHLO and then writes ``NOOP`` lines as fast as the socket
  takes them, never reading a reply; beside it ``smtp-source`` sends N messages over 20 sessions.
  The same smtp-source run is also made without the attacker, so the row shows what the attacker
  cost the others (msgs/s both ways) and what it cost in memory (peak RSS both ways, and the bytes
  the attacker got the target to take).
"""
from __future__ import annotations

import math
import socket
import threading
import time
from typing import Callable

from conns import MemorySampler
from util import percentile, read_line

PROBE_SOURCE = "127.0.0.80"        # the banner probe's own address
FANOUT_SOURCE = "127.0.0.81"       # the bulk sender
ATTACKER_SOURCE = "127.0.0.82"     # the client that never reads
SENDER = "bulk@bench-client.test"
ORCPT = "rfc822;" + "o" * 300 + "+40bench-client.test"

# recipients per transaction towards the smart host (the sink counts transactions, not recipients)
RCPTS_PER_TRANSACTION = {"smtpgw": 100, "postfix": 50}      # Postfix: smtp_destination_recipient_limit


def banner_latency(host: str, port: int, timeout: float = 30.0) -> float:
    """Seconds from connect to the whole first line of the greeting, from the probe's address."""
    start = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout, source_address=(PROBE_SOURCE, 0)) as s:
        read_line(s)
        took = time.perf_counter() - start
        try:
            s.sendall(b"QUIT\r\n")
        except OSError:
            pass
    return took


class BannerProbe(threading.Thread):
    """Times the banner every ``interval`` seconds until stopped."""

    def __init__(self, host: str, port: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.interval = host, port, interval
        self.samples: list[float] = []
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.samples.append(banner_latency(self.host, self.port))
            except OSError:
                self.errors += 1
            self._halt.wait(self.interval)

    def stop(self) -> dict:
        self._halt.set()
        self.join(60)
        s = sorted(self.samples)
        ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
        return {"samples": len(s), "probe_errors": self.errors, "banner_p50_ms": ms(percentile(s, 50)),
                "banner_p99_ms": ms(percentile(s, 99)), "banner_max_ms": ms(s[-1] if s else None),
                "banner_ms": [ms(v) for v in self.samples]}


def _reply(sock: socket.socket, buf: bytearray) -> int:
    """The code of the next whole reply (multi-line replies read to their last line)."""
    while True:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            buf += chunk
        end = buf.index(b"\r\n")
        line = bytes(buf[:end])
        del buf[:end + 2]
        if line[3:4] != b"-":
            return int(line[:3])


def send_fanout(host: str, port: int, recipients: int, timeout: float = 120) -> dict:
    """One pipelined transaction to ``recipients`` addresses; returns the reply counts."""
    rcpts = "".join(f"RCPT TO:<user{i}@remote.test> NOTIFY=SUCCESS,FAILURE ORCPT={ORCPT}\r\n"
                    for i in range(recipients))
    buf = bytearray()
    with socket.create_connection((host, port), timeout=timeout, source_address=(FANOUT_SOURCE, 0)) as s:
        _reply(s, buf)
        writer = threading.Thread(target=s.sendall, daemon=True,
                                  args=(f"EHLO bulk.test\r\nMAIL FROM:<{SENDER}>\r\n{rcpts}".encode(),))
        writer.start()              # the replies are read meanwhile, or both sides' buffers fill up
        codes = [_reply(s, buf) for _ in range(2 + recipients)]
        writer.join()
        accepted = sum(c == 250 for c in codes[2:])
        s.sendall(b"DATA\r\n")
        if _reply(s, buf) != 354:
            return {"accepted": accepted, "error": "DATA refused"}
        t0 = time.perf_counter()
        s.sendall(b"From: <bulk@bench-client.test>\r\nSubject: fan-out\r\n\r\n" + (b"x" * 76 + b"\r\n") * 13 + b".\r\n")
        final = _reply(s, buf)
        took = time.perf_counter() - t0
        s.sendall(b"QUIT\r\n")
    if final != 250:
        return {"accepted": 0, "error": f"end of DATA answered {final}"}
    return {"accepted": accepted, "refused": recipients - accepted, "final": final,
            "end_of_data_s": round(took, 3)}


def fanout(host: str, port: int, target_name: str, recipients: int, pids: Callable[[], list[int]],
           sink_wait: Callable[[int, float], bool], sink_count: Callable[[], int], timeout: float) -> dict:
    """The fan-out case against a started target; ``sink_wait(n, timeout)`` waits for n transactions."""
    per = RCPTS_PER_TRANSACTION.get(target_name, 100)
    memory = MemorySampler(pids, interval=0.5)
    memory.start()
    probe = BannerProbe(host, port)
    res: dict = {"recipients": recipients}
    t0 = time.perf_counter()
    probe.start()
    try:
        res.update(send_fanout(host, port, recipients, timeout))
        expected = math.ceil(res["accepted"] / per)
        res["all_at_sink"] = sink_wait(expected, timeout)
        res["delivery_s"] = round(time.perf_counter() - t0, 2)
    finally:
        res.update(probe.stop())
        peak = memory.stop()
    res["sink_transactions"] = sink_count()
    res["peak_memory"] = peak.as_dict() if peak else None
    return res


class Flooder(threading.Thread):
    """EHLO, then NOOP lines as fast as the socket takes them; never reads a reply."""

    def __init__(self, host: str, port: int, line: bytes = b"NOOP\r\n") -> None:
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.block = line * (65536 // len(line))
        self.sent = 0
        self.closed_by_target = False
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection((self.host, self.port), timeout=30,
                                          source_address=(ATTACKER_SOURCE, 0)) as s:
                s.sendall(b"EHLO flood.test\r\n")
                s.settimeout(0.2)
                while not self._halt.is_set():
                    try:
                        self.sent += s.send(self.block)
                    except socket.timeout:
                        continue            # the target stopped reading: that is the point
        except OSError:
            self.closed_by_target = True

    def stop(self) -> dict:
        self._halt.set()
        self.join(10)
        return {"attacker_bytes_sent": self.sent, "attacker_closed_by_target": self.closed_by_target}
