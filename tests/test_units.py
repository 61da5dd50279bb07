"""Sizes, durations, addresses and domains as administrators type them."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from mta.config import ConfigError
from mta.config.values import (
    SmartHost, format_duration, format_size, parse_domain, parse_duration, parse_hostport, parse_size,
    parse_smart_host,
)

KEY = "virtual_servers[0].limits.max_message_size"


# -- sizes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("10MB", 10 * 1024 * 1024), ("512KB", 512 * 1024), ("1GB", 1024 ** 3), ("2048", 2048),
    (2048, 2048), ("10M", 10 * 1024 * 1024), ("10 MB", 10 * 1024 * 1024), ("10mb", 10 * 1024 * 1024),
    ("512kb", 524288), ("1.5MB", 1572864), ("100B", 100), (" 7 k ", 7168), ("0", 0), ("3MiB", 3 * 1024 ** 2),
])
def test_parse_size(text, expected):
    assert parse_size(text, KEY) == expected


@pytest.mark.parametrize("bad", ["", "MB", "10 XB", "-1", -5, "ten", True, None, [], {}, 1.5, "1e6", "١٠MB"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError) as e:
        parse_size(bad, KEY)
    assert e.value.path == KEY
    assert str(e.value).startswith(KEY + ": ")


def test_size_error_text():
    with pytest.raises(ConfigError) as e:
        parse_size("lots", KEY)
    assert str(e.value) == f"{KEY}: expected a size like 10MB, 512KB or a number of bytes, got 'lots'"


UNITS = {"": 1, "B": 1, "K": 1024, "KB": 1024, "M": 1024 ** 2, "MB": 1024 ** 2, "G": 1024 ** 3, "GB": 1024 ** 3}


@given(n=st.integers(0, 10 ** 7), unit=st.sampled_from(sorted(UNITS)), space=st.sampled_from(["", " "]),
       lower=st.booleans())
def test_size_round_trip_spellings(n, unit, space, lower):
    text = f"{n}{space}{unit}"
    assert parse_size(text.lower() if lower else text, KEY) == n * UNITS[unit]


@given(st.integers(0, 2 ** 50))
def test_format_size_round_trip(n):
    assert parse_size(format_size(n), KEY) == n


@settings(max_examples=200)
@given(st.one_of(st.text(), st.integers(), st.floats(), st.none(), st.booleans(), st.lists(st.integers())))
def test_size_garbage_gives_config_error_only(value):
    try:
        result = parse_size(value, KEY)
    except ConfigError as e:
        assert e.path == KEY
    else:
        assert isinstance(result, int) and result >= 0


# -- durations -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("30s", 30), ("10m", 600), ("2h", 7200), ("2d", 172800), ("1w", 604800), (90, 90), ("90", 90),
    (1.5, 1.5), ("1h30m", 5400), ("1h 30m", 5400), ("2 hours", 7200), ("0.5h", 1800), ("10M", 600),
])
def test_parse_duration(text, expected):
    assert parse_duration(text, "k") == expected


@pytest.mark.parametrize("bad", ["", "h", "10x", "10ms", "-5s", -1, "1h30", True, None, {}, float("inf"),
                                 float("nan"), "9" * 400 + "s"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ConfigError) as e:
        parse_duration(bad, "gateway.queue.expire")
    assert str(e.value).startswith("gateway.queue.expire: ")


@given(n=st.integers(0, 10 ** 6), unit=st.sampled_from([("s", 1), ("m", 60), ("h", 3600), ("d", 86400),
                                                       ("w", 604800)]))
def test_duration_round_trip_spellings(n, unit):
    assert parse_duration(f"{n}{unit[0]}", "k") == n * unit[1]
    assert parse_duration(f"{n} {unit[0].upper()}", "k") == n * unit[1]


@given(st.integers(0, 10 ** 9))
def test_format_duration_round_trip(n):
    assert parse_duration(format_duration(n), "k") == n


@settings(max_examples=200)
@given(st.one_of(st.text(), st.integers(), st.floats(), st.none(), st.booleans(), st.lists(st.text())))
def test_duration_garbage_gives_config_error_only(value):
    try:
        result = parse_duration(value, "k")
    except ConfigError as e:
        assert e.path == "k"
    else:
        assert isinstance(result, float) and result >= 0


# -- host:port -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, default, expected", [
    ("127.0.0.1:2525", None, ("127.0.0.1", 2525)),
    ("192.0.2.1", 53, ("192.0.2.1", 53)),
    ("192.0.2.1:5353", 53, ("192.0.2.1", 5353)),
    ("[::1]:25", None, ("::1", 25)),
    ("[2001:DB8::1]", 53, ("2001:db8::1", 53)),
    ("2001:db8::1", 53, ("2001:db8::1", 53)),
])
def test_parse_hostport(text, default, expected):
    assert parse_hostport(text, "k", default) == expected


@pytest.mark.parametrize("bad", ["127.0.0.1", "mail.example.test:25", "127.0.0.1:99999", "127.0.0.1:0",
                                 "127.0.0.1:x", "[::1", "[::1]x", "::1", "", 25, None, "1.2.3.4:"])
def test_parse_hostport_rejects(bad):
    with pytest.raises(ConfigError) as e:
        parse_hostport(bad, "virtual_servers[0].listen[0]")
    assert e.value.path == "virtual_servers[0].listen[0]"


def test_port_zero_only_when_allowed():
    assert parse_hostport("127.0.0.1:0", "k", allow_zero_port=True) == ("127.0.0.1", 0)


@given(st.ip_addresses(), st.integers(1, 65535))
def test_hostport_round_trip(ip, port):
    text = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    assert parse_hostport(text, "k") == (str(ip), port)


@settings(max_examples=200)
@given(st.one_of(st.text(), st.integers(), st.none()))
def test_hostport_garbage_gives_config_error_only(value):
    try:
        parse_hostport(value, "k", 53)
    except ConfigError as e:
        assert e.path == "k"


# -- smart hosts and domains ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("smtp.isp.example", SmartHost("smtp.isp.example", 25, False)),
    ("SMTP.ISP.example:587", SmartHost("smtp.isp.example", 587, False)),
    ("[192.0.2.7]", SmartHost("192.0.2.7", 25, True, True)),
    ("[192.0.2.7]:2526", SmartHost("192.0.2.7", 2526, True, True)),
    ("[2001:db8::7]:25", SmartHost("2001:db8::7", 25, True, True)),
    ("[IPv6:2001:db8::7]", SmartHost("2001:db8::7", 25, True, True)),
    ("[relay.isp.example]:587", SmartHost("relay.isp.example", 587, False, True)),
    ("192.0.2.7", SmartHost("192.0.2.7", 25, True)),
])
def test_parse_smart_host(text, expected):
    assert parse_smart_host(text, "k") == expected


@pytest.mark.parametrize("bad", ["", "smart host", "host:0", "host:abc", "[bo gus]", "2001:db8::1", "[1.2.3.4",
                                 "-bad-.example", "a..b", None, 7])
def test_parse_smart_host_rejects(bad):
    with pytest.raises(ConfigError) as e:
        parse_smart_host(bad, "connectors[0].smart_hosts[0]")
    assert e.value.path == "connectors[0].smart_hosts[0]"


@pytest.mark.parametrize("text, wildcard, expected", [
    ("Example.TEST", False, "example.test"), ("example.test.", False, "example.test"),
    ("*", True, "*"), ("*.Example.test", True, "*.example.test"), ("localhost", False, "localhost"),
])
def test_parse_domain(text, wildcard, expected):
    assert parse_domain(text, "k", wildcard=wildcard) == expected


@pytest.mark.parametrize("bad, wildcard", [("*", False), ("*.example.test", False), ("a*.example", True),
                                           ("ex ample.test", True), ("", True), ("x" * 64 + ".test", False)])
def test_parse_domain_rejects(bad, wildcard):
    with pytest.raises(ConfigError):
        parse_domain(bad, "k", wildcard=wildcard)
