"""RFC 5321 path and parameter parsing (mta.smtp.address)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from mta.smtp.address import (AddressError, parse_params, parse_path, split_address, split_argument)

SYNTAX_ERROR = 501          # bad path syntax, path too long
NOT_ALLOWED = 553           # mailbox name not allowed (too long parts, literals, non-ASCII)
PARAMS_ERROR = 555          # MAIL/RCPT parameters not recognized

ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
atoms = st.text(alphabet=ATEXT, min_size=1, max_size=10)
dot_strings = st.lists(atoms, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
labels = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?", fullmatch=True)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)


def refused(text: str, code: int, **kw) -> None:
    with pytest.raises(AddressError) as e:
        parse_path(text, **{"allow_null": True, **kw})
    assert e.value.reply.code == code, e.value.reply


@given(dot_strings, domains)
def test_plain_mailbox_round_trips(local, domain):
    addr = f"{local}@{domain}"
    assert parse_path(f"<{addr}>", allow_null=False) == addr
    assert split_address(addr) == (local, domain.lower())


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40), domains)
def test_quoted_local_part_is_canonical_and_stable(content, domain):
    quoted = '"' + content.replace("\\", "\\\\").replace('"', '\\"') + '"'
    first = parse_path(f"<{quoted}@{domain}>", allow_null=False)
    assert parse_path(f"<{first}>", allow_null=False) == first
    assert split_address(first)[1] == domain.lower()


def test_needless_quotes_are_removed():
    assert parse_path('<"joe"@example.test>', allow_null=False) == "joe@example.test"
    assert parse_path('<"j\\oe"@example.test>', allow_null=False) == "joe@example.test"


def test_quoted_local_part_with_at_and_space_is_kept():
    addr = parse_path('<"a@b c"@example.test>', allow_null=False)
    assert addr == '"a@b c"@example.test'
    assert split_address(addr) == ('"a@b c"', "example.test")


@given(st.text(max_size=300))
def test_garbage_raises_only_address_error(text):
    for candidate in (text, f"<{text}>", f"<{text}@example.test>"):
        for null in (True, False):
            try:
                parse_path(candidate, allow_null=null, utf8=null)
            except AddressError:
                pass


@given(st.text(max_size=200))
def test_garbage_params_raise_only_address_error(text):
    try:
        parse_params(text)
    except AddressError:
        pass


@given(st.binary(max_size=200))
def test_garbage_arguments_raise_only_address_error(data):
    try:
        path, rest = split_argument("FROM:" + data.decode("latin-1"), "FROM")
        parse_path(path, allow_null=True)
        parse_params(rest)
    except AddressError:
        pass


def test_null_path():
    assert parse_path("<>", allow_null=True) == ""
    refused("<>", SYNTAX_ERROR, allow_null=False)


def test_source_route_is_stripped():
    assert parse_path("<@relay.one,@relay.two:user@example.test>", allow_null=False) == "user@example.test"
    refused("<@relay.one:>", SYNTAX_ERROR)
    refused("<@relay..one:user@example.test>", SYNTAX_ERROR)
    refused("<@relay.one,relay.two:user@example.test>", SYNTAX_ERROR)


@pytest.mark.parametrize("text", [
    "user@example.test",                # no brackets
    "<user@example.test",
    "<user>",                           # no domain
    "<user@>",
    "<@example.test>",
    "<user@@example.test>",
    "<a..b@example.test>",
    "<.a@example.test>",
    "<user@-bad.test>",
    "<user@bad-.test>",
    "<user@exa_mple.test>",
    "<user@example..test>",
    "<us er@example.test>",
    "<user@example.test> ",
    "<user\x00@example.test>",
    "<user\r@example.test>",
    "<user@example.test\x7f>",
    "<user@[1.2.3.256]>",
    "<user@[IPv6:::g]>",
    "<user@[1.2.3.4>",
    "  <user@example.test>",            # only one leading space is tolerated
])
def test_bad_syntax(text):
    refused(text, SYNTAX_ERROR)


def test_one_leading_space_is_tolerated():
    assert parse_path(" <user@example.test>", allow_null=False) == "user@example.test"


def test_lengths():
    assert parse_path(f"<{'a' * 64}@example.test>", allow_null=False)
    refused(f"<{'a' * 65}@example.test>", NOT_ALLOWED)
    domain = ".".join(["d" * 61] * 4) + ".test"             # 252 octets
    assert len(f"<a@{domain}>") == 256
    assert parse_path(f"<a@{domain}>", allow_null=False)    # exactly the limit
    refused(f"<ab@{domain}>", SYNTAX_ERROR)                 # one octet over
    refused(f"<a@{'d' * 64}.test>", SYNTAX_ERROR)           # a label over 63


def test_domain_longer_than_255_is_refused_inside_a_route():
    refused("<@" + ".".join(["d" * 63] * 5) + ":u@example.test>", SYNTAX_ERROR)


def test_address_literals():
    assert parse_path("<u@[192.0.2.1]>", allow_null=False) == "u@[192.0.2.1]"
    assert parse_path("<u@[IPv6:2001:DB8::0:1]>", allow_null=False) == "u@[IPv6:2001:db8::1]"
    refused("<u@[x-tag:stuff]>", NOT_ALLOWED)


def test_trailing_dot_and_case():
    assert parse_path("<u@Example.TEST.>", allow_null=False) == "u@Example.TEST"
    assert split_address("U@Example.TEST.") == ("U", "example.test")


def test_postmaster_without_domain():
    assert parse_path("<Postmaster>", allow_null=False, allow_postmaster=True) == "postmaster"
    refused("<Postmaster>", SYNTAX_ERROR)


def test_non_ascii_needs_smtputf8():
    refused("<jösé@example.test>", NOT_ALLOWED)
    assert parse_path("<jösé@exämple.test>", allow_null=False, utf8=True) == "jösé@exämple.test"


def test_split_argument():
    assert split_argument("FROM:<a@b.test> SIZE=10", "FROM") == ("<a@b.test>", "SIZE=10")
    assert split_argument("from: <a@b.test>", "FROM") == ("<a@b.test>", "")
    assert split_argument('TO:<"x> y"@b.test> NOTIFY=NEVER', "TO") == ('<"x> y"@b.test>', "NOTIFY=NEVER")
    for bad in ("FROM:a@b.test", "FROM:<a@b.test>SIZE=1", "FROM:  <a@b.test>", "TO:<a@b.test>"):
        with pytest.raises(AddressError):
            split_argument(bad, "FROM")


def test_params():
    assert parse_params("SIZE=100 body=8BITMIME SMTPUTF8") == {"SIZE": "100", "BODY": "8BITMIME",
                                                                "SMTPUTF8": None}
    assert parse_params("") == {}
    for bad in ("SIZE=", "=1", "SI_ZE=1", "SIZE=1 size=2", "-X=1", "X=a=b", "X=\x01"):
        with pytest.raises(AddressError) as e:
            parse_params(bad)
        assert e.value.reply.code == PARAMS_ERROR


@given(st.dictionaries(st.from_regex(r"[A-Z0-9][A-Z0-9-]{0,8}", fullmatch=True),
                       st.none() | st.from_regex(r"[\x21-\x3c\x3e-\x7e]{1,12}", fullmatch=True), max_size=5))
def test_params_round_trip(params):
    text = " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
    assert parse_params(text) == params
