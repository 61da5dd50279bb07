"""DKIM's relaxed canonicalization (RFC 6376 3.4.2, 3.4.4) as dkimpy computes it, without its work
on text that is already canonical; and the body canonicalized once, piece by piece, from the chunks
the server holds.

dkimpy runs two regular-expression substitutions over the whole body for every signature (trailing
white space, then runs of white space) and two over every header field, each building a new copy:
about a fifth of signing a 4 KB message with RSA, most of it replacing each single space of the text
by a single space. Here a substitution runs only where it can change something (a quick ``in``
finds whether there is a tab, two spaces in a row or white space before a line end), and gives the
same bytes otherwise. :func:`install` puts these in place of dkimpy's ``Relaxed`` methods for the
process (signing and verifying alike: the output is identical, tests/test_dkim_sign.py checks it
against dkimpy's own on odd input); dkimpy still computes every signature.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import dkim.canonicalization as canonicalization
from dkim.canonicalization import correct_empty_body, strip_trailing_lines

from mta.smtp.lines import crlf_clean

_TRAILING = re.compile(b"[\t ]+\r\n")          # dkimpy's strip_trailing_whitespace
_RUNS = re.compile(b"[\t ]+")                  # dkimpy's compress_whitespace
_EMPTY_LINE = b"\r\n\r\n"


def _relax_lines(text: bytes) -> bytes:
    """dkimpy's ``compress_whitespace(strip_trailing_whitespace(text))``, skipped where a no-op."""
    if b" \r\n" in text or b"\t\r\n" in text:
        text = _TRAILING.sub(b"\r\n", text)
    if b"\t" in text or b"  " in text:
        text = _RUNS.sub(b" ", text)
    return text


def canonicalize_body(body: bytes) -> bytes:
    """dkimpy's ``Relaxed.canonicalize_body``, byte for byte."""
    return correct_empty_body(strip_trailing_lines(_relax_lines(body)))


def canonicalize_headers(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """dkimpy's ``Relaxed.canonicalize_headers``, byte for byte: name lower-cased, value unfolded
    (every LF and the CR before it dropped), white-space runs made one space, then stripped."""
    out = []
    for name, value in headers:
        if b"\n" in value:
            value = value.replace(b"\r\n", b"").replace(b"\n", b"")
        if b"\t" in value or b"  " in value:
            value = _RUNS.sub(b" ", value)
        out.append((name.lower().rstrip(), value.strip() + b"\r\n"))
    return out


def canonical_body(pieces: Iterable[bytes]) -> bytes:
    """The relaxed canonical form of a CRLF-clean body handed over in pieces, in one pass: each
    piece's whole lines relaxed where needed (a line cut between two pieces is carried to the next),
    joined once. The same bytes as ``canonicalize_body(b"".join(pieces))``."""
    out: list[bytes] = []
    carry = b""
    for piece in pieces:
        if carry:
            piece, carry = carry + piece, b""
        cut = piece.rfind(b"\r\n") + 2
        if cut < 2:
            carry = piece
            continue
        if cut < len(piece):
            piece, carry = piece[:cut], piece[cut:]
        out.append(_relax_lines(piece))
    if carry:
        out.append(_relax_lines(carry))
    return correct_empty_body(strip_trailing_lines(b"".join(out)))


def split_message(chunks: Sequence[bytes]) -> tuple[bytes, bytes] | None:
    """The message in ``chunks`` cut where dkimpy's parser cuts it: the header section with the
    empty line that ends it (so that dkimpy parses only the headers) and the body in relaxed
    canonical form, computed from the chunks without joining the message. None (let dkimpy parse
    it all) for anything dkimpy would read otherwise: a bare CR or LF, no header section, no empty
    line."""
    head: list[bytes] = []
    tail = b""                                  # the last octets (up to 3) before this chunk
    for i, chunk in enumerate(chunks):
        edge = (tail + chunk[:3]).find(_EMPTY_LINE) if tail else -1
        if edge >= 0:
            at = edge + 4 - len(tail)
        else:
            end = chunk.find(_EMPTY_LINE)
            at = end + 4 if end >= 0 else -1
        if at >= 0:
            head.append(chunk[:at])
            header = b"".join(head)
            body = [chunk[at:], *chunks[i + 1:]]
            if header.startswith(b"\r\n") or not crlf_clean(header) or not all(map(crlf_clean, body)):
                return None
            return header, canonical_body(body)
        head.append(chunk)
        tail = (tail + chunk[-3:])[-3:]
    return None


def install() -> None:
    canonicalization.Relaxed.canonicalize_body = staticmethod(canonicalize_body)
    canonicalization.Relaxed.canonicalize_headers = staticmethod(canonicalize_headers)
