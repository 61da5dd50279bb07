"""CPU per message of the gateway's work on the message bytes alone, without sockets or processes.

    python bench/body_cost.py                 # 4 KB and 100 KB, smtp-source's message shape
    python bench/body_cost.py --size 102400 -n 500

One message as the gateway handles it in one process: read by the DATA reader in 64 KB reads (end of
data, bare CR/LF, NUL, line length, dot-unstuffing), the Received header check and prepend, the
REQUIRETLS header scan of delivery, and dot-stuffing for the next hop. CPU time of this thread, best
and median of five rounds: the part of a big message's cost that grows with its size, measured in a
way the load of a shared machine moves much less than the whole bench.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mta.model.message import MessageData  # noqa: E402
from mta.smtp.client.requiretls import waives_policy  # noqa: E402
from mta.smtp.client.wire import encode_all  # noqa: E402
from mta.smtp.lines import DataReader  # noqa: E402

HEAD = (b"From: <foo@bench-client.test>\r\nTo: <foo@bench-client.test>\r\n"
        b"Date: Wed,  2 Dec 2026 18:38:19 +0000 (UTC)\r\nMessage-Id: <774a.0003.0000@bench-client.test>\r\n\r\n")
LINE = b"X" * 78 + b"\r\n"          # smtp-source -l writes lines of 80 octets


def reads(size: int) -> list[bytes]:
    data = HEAD + LINE * max(1, (size - len(HEAD)) // len(LINE)) + b".\r\n"
    return [data[i:i + 65536] for i in range(0, len(data), 65536)]


def one(pieces: list[bytes]) -> None:
    reader, buf, pos = DataReader(10 << 20), b"", 0
    for piece in pieces:            # what a read leaves unconsumed (a partial line) goes before the next
        buf, pos = (buf[pos:] + piece if pos < len(buf) else piece), 0
        pos = reader.feed(buf, pos)
    assert reader.done and reader.problem is None
    message = MessageData(reader.chunks, reader.size)
    message.header_count("Received")
    message.prepend_header("Received", "from bench by bench; Wed, 2 Dec 2026 18:38:19 +0000")
    chunks = message.chunks()
    waives_policy(chunks)
    encode_all(chunks)


def measure(size: int, n: int) -> tuple[float, float]:
    pieces = reads(size)
    for _ in range(max(5, n // 20)):
        one(pieces)
    rounds = []
    for _ in range(5):
        t0 = time.thread_time()
        for _ in range(n):
            one(pieces)
        rounds.append((time.thread_time() - t0) / n * 1e6)
    return min(rounds), statistics.median(rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, action="append", help="message size in octets (repeatable)")
    p.add_argument("-n", type=int, default=300, help="messages per round")
    a = p.parse_args()
    for size in a.size or [4096, 102400]:
        best, median = measure(size, a.n)
        print(f"{size:>8} octets: {best:7.0f} us best, {median:7.0f} us median per message")


if __name__ == "__main__":
    main()
