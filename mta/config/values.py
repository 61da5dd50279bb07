"""Parsers for the small values an administrator types into the configuration.

Sizes, durations, listen/nameserver addresses, smart hosts and domain names each get one parser here
so that every key accepting such a value reads it the same way and fails with the same words. Each
parser takes the raw YAML value and the key path, and raises :class:`mta.config.ConfigError` naming
that key -- never ``ValueError``/``TypeError`` -- so the loader can stay a table of keys.
"""
from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, NamedTuple

from mta.config.errors import ConfigError

__all__ = [
    "parse_size", "format_size", "parse_duration", "format_duration", "parse_hostport",
    "parse_smart_host", "SmartHost", "parse_domain", "describe", "RedisAddress", "parse_redis_url",
]

# Binary multiples, as Exchange's "(KB)" boxes and Postfix's message_size_limit reasoning use them.
_SIZE_UNITS = {
    "": 1, "b": 1, "byte": 1, "bytes": 1,
    "k": 1024, "kb": 1024, "kib": 1024,
    "m": 1024 ** 2, "mb": 1024 ** 2, "mib": 1024 ** 2,
    "g": 1024 ** 3, "gb": 1024 ** 3, "gib": 1024 ** 3,
    "t": 1024 ** 4, "tb": 1024 ** 4, "tib": 1024 ** 4,
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.ASCII | re.IGNORECASE)

_DURATION_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
    "w": 604800, "week": 604800, "weeks": 604800,
}
_NUMBER_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*", re.ASCII)
_DURATION_RE = re.compile(r"(?:\s*\d+(?:\.\d+)?\s*[a-z]+)+\s*", re.ASCII | re.IGNORECASE)
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]+)", re.ASCII | re.IGNORECASE)

_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)", re.ASCII | re.IGNORECASE)


def describe(value: Any) -> str:
    """How a wrong value is shown in an error: strings quoted, YAML's own words for the rest."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return repr(value)


# -- sizes ---------------------------------------------------------------------------------------

def parse_size(value: Any, key: str) -> int:
    """Bytes from ``10MB``, ``512KB``, ``1GB``, ``10 M``, ``1.5MB`` or a plain number of bytes.

    Units are binary (KB = 1024) and case-insensitive; a fractional result is rounded down to a byte.
    """
    problem = f"expected a size like 10MB, 512KB or a number of bytes, got {describe(value)}"
    if isinstance(value, bool):
        raise ConfigError(key, problem)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"a size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(key, problem)
    m = _SIZE_RE.fullmatch(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(key, problem)
    return int(Decimal(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """The shortest exact spelling of ``n`` bytes that :func:`parse_size` reads back (``10MB``)."""
    for unit, mult in (("TB", 1024 ** 4), ("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if n and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


# -- durations -----------------------------------------------------------------------------------

def human_duration(seconds: float) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``: short enough for a table column (``smtpgw queue list``
    and the console's Queues page show ages alike)."""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def parse_duration(value: Any, key: str) -> float:
    """Seconds from ``30s``, ``10m``, ``2h``, ``2d``, ``1w``, ``1h30m`` or a plain number of seconds."""
    problem = f"expected a duration like 30s, 10m, 2h, 2d or a number of seconds, got {describe(value)}"
    if isinstance(value, bool):
        raise ConfigError(key, problem)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _NUMBER_RE.fullmatch(value)
        if m:
            seconds = float(Decimal(m.group(1)))
        elif _DURATION_RE.fullmatch(value):
            total = Decimal(0)
            for number, unit in _DURATION_PART_RE.findall(value):
                mult = _DURATION_UNITS.get(unit.lower())
                if mult is None:
                    raise ConfigError(key, f"{problem} (unknown unit {unit!r}; use s, m, h, d or w)")
                total += Decimal(number) * mult
            seconds = float(total)
        else:
            raise ConfigError(key, problem)
    else:
        raise ConfigError(key, problem)
    if not math.isfinite(seconds):
        raise ConfigError(key, problem)
    if seconds < 0:
        raise ConfigError(key, f"a duration cannot be negative, got {describe(value)}")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest spelling of ``seconds`` that :func:`parse_duration` reads back (``2h``, ``90s``)."""
    if seconds == int(seconds):
        n = int(seconds)
        for unit, mult in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
            if n and n % mult == 0:
                return f"{n // mult}{unit}"
        return f"{n}s"
    return f"{seconds!r}s"


# -- addresses -----------------------------------------------------------------------------------

def _port(text: str, key: str, allow_zero: bool) -> int:
    if not text.isascii() or not text.isdigit() or not (0 if allow_zero else 1) <= int(text) <= 65535:
        low = 0 if allow_zero else 1
        raise ConfigError(key, f"port must be a number from {low} to 65535, got {text!r}")
    return int(text)


def _ip(text: str, key: str, original: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ConfigError(key, f"expected an IP address, got {original!r}") from None


def parse_hostport(value: Any, key: str, default_port: int | None = None, *,
                   allow_zero_port: bool = False) -> tuple[str, int]:
    """``(ip, port)`` from ``"IP"``, ``"IP:port"``, ``"[IPv6]:port"``, ``"[IPv6]"`` or a bare IPv6.

    The host must be an IP address (listeners bind and nameservers are reached without DNS); it is
    returned in canonical form. Without ``default_port`` the port is required. ``allow_zero_port``
    lets a listener ask the OS for a free port (tests do).
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f'expected "IP" or "IP:port", got {describe(value)}')
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(key, f'expected "[IPv6]:port", got {value!r}')
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:           # a bare IPv6 address: no port possible without brackets
        host, port_text = text, None
    else:
        host, sep, port_text = text.partition(":")
        port_text = port_text if sep else None
    ip = _ip(host, key, value)
    if port_text is None:
        if default_port is None:
            raise ConfigError(key, f'a port is required ("IP:port"), got {value!r}')
        return ip, default_port
    return ip, _port(port_text, key, allow_zero_port)


class SmartHost(NamedTuple):
    """A smart host as configured: ``literal`` means an IP to use as is (no DNS lookup);
    ``bracketed`` means no MX lookup (``[name]`` is looked up by A/AAAA only, as Postfix's relayhost)."""
    host: str
    port: int
    literal: bool
    bracketed: bool = False


def parse_domain(value: Any, key: str, *, wildcard: bool = False) -> str:
    """A lower-case domain name without trailing dot; with ``wildcard``, also ``*`` and ``*.domain``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a domain name, got {describe(value)}")
    text = value.strip().lower()
    if wildcard and text == "*":
        return text
    name = text[2:] if wildcard and text.startswith("*.") else text
    name = name[:-1] if name.endswith(".") else name
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        shape = ' ("*", "*.domain" or "domain")' if wildcard else ""
        raise ConfigError(key, f"not a valid domain name{shape}: {value!r}")
    return ("*." if text.startswith("*.") and wildcard else "") + name


def parse_smart_host(value: Any, key: str, default_port: int = 25) -> SmartHost:
    """A smart host: ``"host"``, ``"host:port"``, ``"[IP]"`` or ``"[IP]:port"`` (IPv6 in brackets)."""
    shape = '"host", "host:port", "[IP]" or "[IP]:port"'
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a smart host ({shape}), got {describe(value)}")
    text = value.strip()
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(key, f"expected {shape}, got {value!r}")
        if inner.lower().startswith("ipv6:"):         # RFC 5321 address-literal spelling
            inner = inner[5:]
        port = _port(rest[1:], key, False) if rest else default_port
        try:
            ipaddress.ip_address(inner)
        except ValueError:
            if ":" in inner or inner.replace(".", "").isdigit():    # meant as an IP: say it is a bad one
                return SmartHost(_ip(inner, key, value), port, True, True)
            try:
                return SmartHost(parse_domain(inner, key), port, False, True)
            except ConfigError:
                raise ConfigError(key, f"expected {shape}, got {value!r}") from None
        return SmartHost(_ip(inner, key, value), port, True, True)
    if text.count(":") > 1:
        raise ConfigError(key, f"put an IPv6 address in brackets, e.g. \"[2001:db8::1]:25\", got {value!r}")
    host, sep, port_text = text.partition(":")
    port = _port(port_text, key, False) if sep else default_port
    try:
        return SmartHost(str(ipaddress.IPv4Address(host)), port, True)
    except ValueError:
        pass
    try:
        name = parse_domain(host, key)
    except ConfigError:
        raise ConfigError(key, f"expected {shape}, got {value!r}") from None
    return SmartHost(name, port, False)


# -- a Redis server's address ---------------------------------------------------------------------

@dataclass(frozen=True)
class RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]``, or ``rediss://`` for TLS (port 6379, db 0)."""
    host: str
    port: int = 6379
    db: int = 0
    password: str | None = None
    username: str | None = None
    tls: bool = False

    def __str__(self) -> str:           # for logs: never the password
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}/{self.db}"


def parse_redis_url(value: Any, key: str) -> RedisAddress:
    from urllib.parse import unquote, urlsplit

    problem = f'expected a Redis URL like "redis://127.0.0.1:6379/0" (or rediss:// for TLS), got {describe(value)}'
    if not isinstance(value, str):
        raise ConfigError(key, problem)
    try:
        url = urlsplit(value.strip())
        port = url.port or 6379
    except ValueError:
        raise ConfigError(key, problem) from None
    if url.scheme not in ("redis", "rediss") or not url.hostname or url.query or url.fragment:
        raise ConfigError(key, problem)
    db_text = url.path.lstrip("/")
    if db_text and not db_text.isdigit():
        raise ConfigError(key, f"{problem} (the database is a number)")
    return RedisAddress(url.hostname, port, int(db_text or 0),
                        unquote(url.password) if url.password is not None else None,
                        unquote(url.username) if url.username else None, url.scheme == "rediss")

