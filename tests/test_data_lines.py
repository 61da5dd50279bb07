"""The message reader's byte-level checks, done in fewer passes over big chunks (issue 18), give the
answers of the plain line-by-line definitions: bare CR/LF, over-long lines, dot-unstuffing and the
end of data, however the input is cut."""
from __future__ import annotations

import random

from mta.smtp.lines import TEXT_LIMIT, DataReader, Problem, crlf_clean, has_long_line


def test_crlf_clean_is_the_three_counts() -> None:
    rng = random.Random(3)
    for _ in range(20000):
        data = bytes(rng.choice(b"\r\nab") for _ in range(rng.randint(0, 12)))
        assert crlf_clean(data) == (data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n")), data


def test_has_long_line_is_the_longest_line() -> None:
    rng = random.Random(1)
    for _ in range(5000):
        lines = [b"x" * rng.choice([0, 1, 80, 997, 998, 999, 1000, 1500, rng.randint(0, 1200)])
                 for _ in range(rng.randint(1, 30))]
        region = b"".join(line + b"\r\n" for line in lines)
        assert has_long_line(region) == (max(map(len, lines)) > TEXT_LIMIT - 2)


def _read(pieces: list[bytes]) -> tuple[bool, Problem | None, bytes, bytes]:
    reader, buf, pos = DataReader(1 << 20), b"", 0
    for i, piece in enumerate(pieces):
        buf, pos = buf[pos:] + piece, 0
        pos = reader.feed(buf, pos)
        if reader.done:
            return reader.done, reader.problem, b"".join(reader.chunks), b"".join([buf[pos:], *pieces[i + 1:]])
    return reader.done, reader.problem, b"".join(reader.chunks), buf[pos:]


def test_end_and_dots_however_cut() -> None:
    body = b"Subject: x\r\n\r\n.hidden\r\nline.\r\n..two\r\n.\r\n.\r\nQUIT\r\n"
    for cut in range(len(body) + 1):
        for cut2 in range(cut, len(body) + 1, 7):
            done, problem, message, rest = _read([body[:cut], body[cut:cut2], body[cut2:]])
            assert (done, problem) == (True, None)
            assert message == b"Subject: x\r\n\r\nhidden\r\nline.\r\n.two\r\n"
            assert rest == b".\r\nQUIT\r\n"


def test_a_dot_line_before_the_end_in_a_big_chunk() -> None:
    line = b"x" * 78 + b"\r\n"
    body = line * 900 + b"..dot\r\n" + line * 900 + b".\r\nMAIL FROM:<a@b>\r\n"
    done, problem, message, rest = _read([body])
    assert (done, problem, rest) == (True, None, b"MAIL FROM:<a@b>\r\n")
    assert message == line * 900 + b".dot\r\n" + line * 900
