"""A fuzz test of the command parser and the session behind it, bounded in time so it runs in CI:
random mixes of real commands, junk, bare CR/LF, NUL and over-long lines, cut into random pieces,
never raise, never get an internal error, always get well-formed replies, and give the same answers
however the input is cut."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from mta.smtp.lines import COMMAND_LIMIT, CommandSplitter, Problem
from server_fakes import Dialog, FakeGateway, make_config

COMMANDS = [b"EHLO client.test", b"HELO client.test", b"MAIL FROM:<a@remote.test>",
            b"MAIL FROM:<a@remote.test> SIZE=100 BODY=8BITMIME RET=HDRS ENVID=x",
            b"RCPT TO:<bob@example.test>", b"RCPT TO:<bob@example.test> NOTIFY=SUCCESS ORCPT=rfc822;b@x.test",
            b"RCPT TO:<x@elsewhere.test>", b"DATA", b"RSET", b"NOOP", b"VRFY bob", b"HELP", b"STARTTLS",
            b"AUTH PLAIN", b"BDAT 5", b"BDAT 0 LAST", b"ETRN example.test", b"MAIL FROM:<>", b"RCPT TO:<>",
            b"MAIL FROM:<a@@b>", b"RCPT TO:<postmaster>", b"EHLO", b"\xff\xfe", b"mail from:<a@b.test>"]
PIECES = st.one_of(
    st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n"),
    st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b".\r\n", b"\r\n.\r\n", b"Subject: x\r\n\r\nbody\r\n"]),
    st.binary(max_size=40),
    st.integers(min_value=COMMAND_LIMIT - 4, max_value=COMMAND_LIMIT + 4).map(lambda n: b"A" * n + b"\r\n"),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    out, pos = [], 0
    for cut in cuts:
        if pos >= len(data):
            break
        out.append(data[pos:pos + cut])
        pos += cut
    out.append(data[pos:])
    return [p for p in out if p]


def split_all(splitter: CommandSplitter, pieces: list[bytes]) -> list[bytes | Problem]:
    """Feed pieces as the session does (unread bytes kept, new ones appended); every item found."""
    items, buf, pos = [], b"", 0
    for piece in pieces:
        buf, pos = buf[pos:] + piece, 0
        while True:
            item, pos = splitter.next_line(buf, pos)
            if item is None:
                break
            items.append(item)
    return items


def reference(data: bytes) -> list[bytes | Problem]:
    """The rules written plainly: each LF ends an item; CRLF is the only good ending."""
    items = []
    for segment in data.split(b"\n")[:-1]:
        if len(segment) + 1 > COMMAND_LIMIT:
            items.append(Problem.TOO_LONG)
        elif not segment.endswith(b"\r") or b"\r" in segment[:-1]:
            items.append(Problem.BARE_NEWLINE)
        elif b"\0" in segment:
            items.append(Problem.NUL)
        else:
            items.append(segment[:-1])
    return items


@FUZZ
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(min_value=1, max_value=50), max_size=60))
def test_the_splitter_gives_the_same_lines_however_the_input_is_cut(pieces, cuts):
    data = b"".join(pieces)
    whole = split_all(CommandSplitter(), [data])
    assert whole == reference(data)
    assert split_all(CommandSplitter(), split(data, cuts)) == whole
    for item in whole:
        if not isinstance(item, Problem):
            assert b"\r" not in item and b"\n" not in item and b"\0" not in item
            assert len(item) + 2 <= COMMAND_LIMIT


@FUZZ
@given(st.lists(PIECES, max_size=40), st.lists(st.integers(min_value=1, max_value=50), max_size=60))
def test_the_session_answers_anything_without_internal_errors(pieces, cuts):
    data = b"".join(pieces)
    answers = []
    for mode in (split(data, cuts), [data]):
        d = Dialog(FakeGateway(make_config(max_errors=10_000)))
        got = []
        for piece in mode:
            if d.closed:
                break
            got += d.send(piece)        # parse_replies fails on anything but well-formed replies
        assert all(a.code != 451 for a in got), got
        assert all(200 <= a.code < 600 for a in got)
        answers.append([(a.code, a.lines) for a in got])
    assert answers[0] == answers[1]
