"""Reading etc/gateway.yaml into :mod:`mta.config` objects, with one clear error per problem.

The file is validated as a whole before anything listens, and the first problem found is raised as a
:class:`~mta.config.ConfigError` whose text starts with the key path
(``virtual_servers[0].limits.max_recipients: expected an integer, got 'lots'``).

The schema is a set of tables: each section maps its YAML keys to a converter and, through
:class:`Key`, to a dataclass field. To add a key, add a field to the dataclass and one line to the
section's table; a connector key with no dataclass field of its own (``extra=True``) lands in
``Connector.extra`` for the plugin that reads it. Checks that span sections run afterwards, listed in
:data:`CHECKS`; per-plugin sections are validated by :data:`PLUGIN_SETTINGS`.

Conventions an administrator can rely on:

* unknown keys are errors (typos never pass silently), and so are duplicate keys in one mapping;
* a key that is left out or set to null takes its default (listed in docs/configuration.md);
* relative paths (spool, maildir, TLS files, users file, protocol log directory, ``plugins.local``)
  are kept as written and resolve against the working directory of the process, not the file's folder;
* domains are lower-cased; sizes are binary (KB = 1024).
"""
from __future__ import annotations

import ipaddress
import os
from importlib.metadata import entry_points
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import yaml

from mta.config.errors import ConfigError, ConfigFileError
from mta.config.model import (
    AddressSpace, AuthConfig, Config, Connector, ContentRestrictions, DeliveryConfig,
    DeliveryRestrictions, DnsConfig, DsnConfig, EtrnRequest, FailureLimit, TriggerAuthorization, GatewayConfig, Limits, ListenAddress, LocalDomain, OutboundAuth,
    LocalHook, OutboundConfig, OversizeConfig, PluginsConfig, ProtocolLogConfig, QueueConfig, RelayConfig, ShapingRule, TlsConfig, ClusterConfig,
    VirtualServer,
)
from mta.config.model import PROTOCOL_LOG_FIELDS, ConsoleConfig, ConsoleTls, MetricsConfig, MtaStsConfig, TlsRptConfig
from mta.config.workers import check_workers, resolve_count
from mta.config.schedules import parse_schedule
from mta.config.values import (
    describe, format_size, parse_domain, parse_duration, parse_hostport, parse_redis_url, parse_size,
    parse_smart_host,
)

Convert = Callable[[Any, str], Any]      # (raw YAML value, key path) -> value, or raise ConfigError


# -- reading the file ----------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys, which YAML would silently let the last one win."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            clash = key in seen
        except TypeError:                 # unhashable key; construct_mapping reports it
            break
        if clash:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


SEARCH_PATH = ("/etc/smtpgw/gateway.yaml", "etc/gateway.yaml")
ENV_CONFIG = "SMTPGW_CONFIG"


def default_path(environ: dict[str, str] | None = None) -> str:
    """The configuration file when none is named: ``$SMTPGW_CONFIG``, else the first of
    ``/etc/smtpgw/gateway.yaml`` and ``etc/gateway.yaml`` that exists (the last one if neither does,
    so the error names the file a new user expects)."""
    env = os.environ if environ is None else environ
    if env.get(ENV_CONFIG):
        return env[ENV_CONFIG]
    return next((p for p in SEARCH_PATH if os.path.exists(p)), SEARCH_PATH[-1])


def load(path: str, file_checks: Iterable[Callable[[Config], None]] = ()) -> Config:
    """Read and validate the YAML file at ``path``.

    File and YAML problems raise :class:`ConfigFileError` (``FILE: line N, column M: ...``); problems
    with a key raise :class:`ConfigError` naming the key path. ``file_checks`` open what the file
    names (certificates, users files); the caller hands them in (``mta.app.preflight``) because they
    belong to the parts that use those files, which sit above the configuration.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigFileError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigFileError(path, f"cannot read the file: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigFileError(path, f"{where}invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigFileError(path, f"invalid YAML: {e}") from None
    config = build(data, path)
    for check in file_checks:
        check(config)
    return config


# -- converters ----------------------------------------------------------------------------------

def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else str(name)


def expect_mapping(value: Any, path: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping, got {describe(value)}")
    return value


def expect_list(value: Any, path: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {describe(value)}")
    return value


def check_known(data: dict, known: Any, path: str) -> None:
    for name in data:
        if name not in known:
            raise ConfigError(join(path, str(name)),
                              f"unknown key (known: {', '.join(sorted(known))})")


def string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"expected a non-empty string, got {describe(value)}")
    return value.strip()


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"expected true or false, got {describe(value)}")
    return value


def integer(low: int | None = None, high: int | None = None) -> Convert:
    def convert(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {describe(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low} to {high}" if low is not None and high is not None else (
                f"at least {low}" if low is not None else f"at most {high}")
            raise ConfigError(path, f"expected an integer {bounds}, got {value}")
        return value
    return convert


def size(value: Any, path: str) -> int:
    n = parse_size(value, path)
    if n <= 0:
        raise ConfigError(path, f"a size must be more than zero, got {describe(value)}")
    return n


def duration(value: Any, path: str) -> float:
    seconds = parse_duration(value, path)
    if seconds <= 0:
        raise ConfigError(path, f"a duration must be more than zero, got {describe(value)}")
    return seconds


def choice(*options: str) -> Convert:
    def convert(value: Any, path: str) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in options:
            raise ConfigError(path, f"expected one of {', '.join(options)}, got {describe(value)}")
        return text
    return convert


def list_of(item: Convert, min_len: int = 0, unique: bool = False) -> Convert:
    """A YAML list converted item by item into a tuple; ``unique`` refuses repeated values."""
    def convert(value: Any, path: str) -> tuple:
        items = expect_list(value, path)
        if len(items) < min_len:
            raise ConfigError(path, f"expected at least {min_len} entr{'y' if min_len == 1 else 'ies'}")
        out: list = []
        for i, raw in enumerate(items):
            converted = item(raw, f"{path}[{i}]")
            if unique and converted in out:
                raise ConfigError(f"{path}[{i}]", f"{describe(raw)} is listed twice")
            out.append(converted)
        return tuple(out)
    return convert


def subset(*options: str) -> Convert:
    return list_of(choice(*options), unique=True)


def network(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if isinstance(value, str):
        try:
            return ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            pass
    raise ConfigError(path, f"expected an IP address or CIDR network (192.0.2.0/24), got {describe(value)}")


def file_path(value: Any, path: str) -> str:
    """A path kept as written (relative ones resolve against the working directory)."""
    return string(value, path)


def smart_host(value: Any, path: str) -> str:
    parse_smart_host(value, path)
    return value.strip()


def mail_address(value: Any, path: str) -> str:
    text = string(value, path)
    local, at, domain = text.rpartition("@")
    if not at or not local or any(c.isspace() for c in local):
        raise ConfigError(path, f"expected an address like postmaster@example.test, got {describe(value)}")
    return f"{local}@{parse_domain(domain, path)}"


def restriction_entry(value: Any, path: str) -> str:
    """A delivery restriction entry: ``user@domain`` or ``@domain`` (the whole domain)."""
    text = string(value, path)
    local, at, domain = text.rpartition("@")
    if not at or any(c.isspace() for c in local):
        raise ConfigError(path, f'expected "user@domain" or "@domain", got {describe(value)}')
    return f"{local}@{parse_domain(domain, path)}"


def listen_address(value: Any, path: str) -> ListenAddress:
    """``"IP:port"`` or ``{address: "IP:port", tls: true}`` (implicit TLS, e.g. port 465)."""
    if isinstance(value, dict):
        got = read_keys(value, path, LISTEN_KEYS)
        return ListenAddress(*got["address"], tls=got.get("tls", False))
    host, port = parse_hostport(value, path, allow_zero_port=True)
    return ListenAddress(host, port)


def address_space(value: Any, path: str) -> AddressSpace:
    """``{domain: "*.example.test", cost: 10}``, or just the domain (cost 1)."""
    if isinstance(value, dict):
        got = read_keys(value, path, ADDRESS_SPACE_KEYS)
        return AddressSpace(got["domain"], got.get("cost", 1))
    return AddressSpace(parse_domain(value, path, wildcard=True), 1)


def no_repeats(items: Any, key: Callable[[Any], str], path: str, what: str) -> Any:
    """``items`` unchanged, or a ConfigError at the first entry whose ``key`` came before."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        if key(item) in seen:
            raise ConfigError(f"{path}[{i}]", f"{what}{key(item)!r} is listed twice")
        seen.add(key(item))
    return items


def address_spaces(value: Any, path: str) -> tuple[AddressSpace, ...]:
    return no_repeats(list_of(address_space, min_len=1)(value, path), lambda s: s.domain, path,
                      "the address space ")


def nameserver(value: Any, path: str) -> tuple[str, int]:
    return parse_hostport(value, path, default_port=53)


def time_zone(value: Any, path: str) -> str:
    """An IANA time zone name (``Europe/Paris``, ``UTC``), checked against the system's zone data."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
    name = string(value, path)
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(path, f"unknown time zone {name!r} (use an IANA name like Europe/Paris or UTC)") from None
    return name


def existing_file(value: Any, path: str) -> str:
    name = file_path(value, path)
    if not os.path.isfile(name):
        raise ConfigError(path, f"no such file {name!r} (relative paths are resolved against "
                                f"the working directory, {os.getcwd()})")
    return name


# -- the tables ----------------------------------------------------------------------------------

class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()


@dataclass(frozen=True)
class Key:
    """One YAML key: how to convert it, its default, and where it goes.

    ``default``: None leaves the dataclass default (or leaves the key out of :func:`read_keys`'
    result); :data:`REQUIRED` makes it mandatory; anything else is used as is.
    ``field``: the dataclass field when it differs from the YAML name (``except`` -> ``exceptions``).
    ``extra``: no field of its own; the value goes into the section's ``extra`` dict.
    ``null_means``: for a key whose null differs from leaving it out (``recipient_delimiter: null``
    turns the delimiter off), the value that an explicit null stands for.
    """
    convert: Convert
    default: Any = None
    field: str | None = None
    extra: bool = False
    null_means: Any = REQUIRED          # REQUIRED here: an explicit null is the same as no key


def read_keys(value: Any, path: str, keys: dict[str, Key]) -> dict[str, Any]:
    """Convert a mapping's keys; returns YAML name -> value for the keys present (or defaulted)."""
    data = expect_mapping(value, path)
    check_known(data, keys, path)
    out: dict[str, Any] = {}
    for name, spec in keys.items():
        raw = data.get(name)
        if raw is None and name in data and spec.null_means is not REQUIRED:
            out[name] = spec.null_means
            continue
        if raw is None:
            if spec.default is REQUIRED:
                raise ConfigError(join(path, name), "required key is missing")
            if spec.default is not None:
                out[name] = spec.default
            continue
        out[name] = spec.convert(raw, join(path, name))
    return out


@dataclass(frozen=True)
class Section:
    """A mapping that becomes a dataclass; ``finish`` sees the fields before construction."""
    cls: type
    keys: dict[str, Key]
    finish: Callable[[dict[str, Any], str], dict[str, Any]] | None = None
    extra_field: str | None = None

    def __call__(self, value: Any, path: str) -> Any:
        got = read_keys(value, path, self.keys)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for name, converted in got.items():
            spec = self.keys[name]
            if spec.extra:
                extra[name] = converted
            else:
                kwargs[spec.field or name] = converted
        if self.extra_field:
            kwargs[self.extra_field] = extra
        if self.finish:
            kwargs = self.finish(kwargs, path)
        return self.cls(**kwargs)


def _both_or_neither(a: str, b: str) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def finish(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
        if (kwargs.get(a) is None) != (kwargs.get(b) is None):
            given, missing = (a, b) if kwargs.get(a) is not None else (b, a)
            raise ConfigError(join(path, missing), f"required when {given} is set")
        return kwargs
    return finish


def _finish_tls(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    _both_or_neither("certificate", "key")(kwargs, path)
    if kwargs.get("required") and kwargs.get("certificate") is None:
        raise ConfigError(join(path, "required"), "TLS cannot be required without a certificate and key")
    return kwargs


def _finish_gateway(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    if "postmaster" not in kwargs:
        domains = list(kwargs.get("local_domains", {}))
        kwargs["postmaster"] = f"postmaster@{domains[0] if domains else kwargs['hostname']}"
    return kwargs


def local_domains(value: Any, path: str) -> dict[str, LocalDomain]:
    """``{example.test: {maildir: var/mail}}``; the maildir defaults to var/mail."""
    data = expect_mapping(value, path)
    out: dict[str, LocalDomain] = {}
    for raw_name, settings in data.items():
        key = join(path, str(raw_name))
        name = parse_domain(raw_name, key)
        if name in out:
            raise ConfigError(key, f"the domain {name!r} is listed twice")
        got = read_keys({} if settings is None else settings, key, LOCAL_DOMAIN_KEYS)
        out[name] = LocalDomain(name, **got)
    return out


def rate(value: Any, path: str) -> float:
    """A positive number (messages per minute may be a fraction: 0.5 is one every two minutes)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(path, f"expected a number more than zero, got {describe(value)}")
    return float(value)


def back_off(value: Any, path: str) -> float:
    return parse_duration(value, path)      # 0 is allowed: fewer connections, no pause


SHAPING_KEYS = {
    "match": Key(lambda v, p: parse_domain(v, p, wildcard=True), REQUIRED),
    "max_connections": Key(integer(1)),
    "messages_per_minute": Key(rate),
    "back_off_on_421": Key(back_off),
}


def shaping_rules(value: Any, path: str) -> tuple[ShapingRule, ...]:
    """``gateway.shaping``: ``[{match: "gmail.com", max_connections: 20, messages_per_minute: 600}, ...]``;
    the first rule that matches a destination applies, so a pattern listed twice is a mistake."""
    out: list[ShapingRule] = []
    for i, raw in enumerate(expect_list(value, path)):
        key = f"{path}[{i}]"
        got = read_keys(raw, key, SHAPING_KEYS)
        if any(r.match == got["match"] for r in out):
            raise ConfigError(join(key, "match"), f"{got['match']!r} is matched by an earlier entry already")
        out.append(ShapingRule(**got))
    return tuple(out)


def local_part(value: Any, path: str) -> str:
    """A local part as the recipient table compares it: lower-case, no '@', no white space."""
    text = string(value, path).strip().lower()
    if not text or "@" in text or any(c.isspace() or ord(c) < 32 for c in text):
        raise ConfigError(path, f"expected a local part (the part before @), got {describe(value)}")
    return text


def recipient_list(value: Any, path: str) -> tuple[str, ...] | str:
    """A list of local parts, or the path of a file holding one a line ('#' comments)."""
    if isinstance(value, str):
        return existing_file(value, path)
    return tuple(dict.fromkeys(list_of(local_part)(value, path)))


def alias_target(value: Any, path: str) -> str:
    """A local part (of the same domain) or a full address anywhere."""
    text = string(value, path).strip()
    return mail_address(text, path).lower() if "@" in text else local_part(text, path)


def aliases(value: Any, path: str) -> dict[str, tuple[str, ...]]:
    """``{sales: [alice, bob@partner.test], postmaster: alice}``: a target or a list of them."""
    out: dict[str, tuple[str, ...]] = {}
    for raw, targets in expect_mapping(value, path).items():
        key = join(path, str(raw))
        name = local_part(raw, key)
        items = targets if isinstance(targets, list) else [targets]
        if not items:
            raise ConfigError(key, "an alias needs at least one target")
        out[name] = tuple(dict.fromkeys(alias_target(t, f"{key}[{i}]") for i, t in enumerate(items)))
    return out


def delimiter(value: Any, path: str) -> str | None:
    text = string(value, path)
    if len(text) != 1 or text.isalnum() or text in "@. \t\"":
        raise ConfigError(path, f"expected one character such as + or -, or null for none; got {describe(value)}")
    return text


LISTEN_KEYS = {
    "address": Key(lambda v, p: parse_hostport(v, p, allow_zero_port=True), REQUIRED),
    "tls": Key(boolean),
}

ADDRESS_SPACE_KEYS = {
    "domain": Key(lambda v, p: parse_domain(v, p, wildcard=True), REQUIRED),
    "cost": Key(integer(1, 100)),
}

LOCAL_DOMAIN_KEYS = {
    "maildir": Key(file_path, "var/mail"),
    "recipients": Key(recipient_list),        # mta/delivery/recipients.py
    "aliases": Key(aliases),
    "catch_all": Key(local_part),
    "max_new_mailboxes_per_message": Key(integer(0)),     # mta/delivery/recipients.py NewMailboxes
}

DNS = Section(DnsConfig, {
    "nameservers": Key(list_of(nameserver, unique=True)),
    "timeout": Key(duration),
})

QUEUE = Section(QueueConfig, {
    "retry": Key(list_of(duration, min_len=1)),
    "delay_notification": Key(duration),
    "expire": Key(duration),
    "max_hops": Key(integer(1, 1000)),
})

METRICS = Section(MetricsConfig, {          # the Prometheus endpoint (mta/ops/metrics.py)
    "enabled": Key(boolean),
    "listen": Key(lambda v, p: parse_hostport(v, p, default_port=9125, allow_zero_port=True)),
})

MTA_STS = Section(MtaStsConfig, {          # outbound MTA-STS (mta/delivery/mta_sts.py)
    "ca_file": Key(existing_file),
    "cache": Key(file_path),
})


MIN_TLS_RPT_INTERVAL = 1.0


def tls_rpt_interval(value: Any, path: str) -> float:
    seconds = duration(value, path)
    if seconds < MIN_TLS_RPT_INTERVAL:
        raise ConfigError(path, f"expected at least 1s (RFC 8460 suggests 1d), got {describe(value)}")
    return seconds


def tls_rpt_contact(value: Any, path: str) -> str:
    """An address (``tlsrpt@example.com``) or a URI (``mailto:...``, ``https://...``) on one line."""
    text = string(value, path)
    if any(c in text for c in "\r\n"):
        raise ConfigError(path, f"expected one line, got {describe(value)}")
    return text


TLS_RPT = Section(TlsRptConfig, {          # TLS reporting (mta/delivery/tls_report.py)
    "enabled": Key(boolean),
    "organization": Key(tls_rpt_contact),
    "contact": Key(tls_rpt_contact),
    "interval": Key(tls_rpt_interval),
})


def _finish_console(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    if kwargs.get("enabled") and kwargs.get("users") is None:
        raise ConfigError(join(path, "users"), "the console needs a users file to log in against "
                          "(make one with `smtpgw passwd -c FILE USER`)")
    return kwargs


CONSOLE = Section(ConsoleConfig, {          # the web console (mta/console/)
    "enabled": Key(boolean),
    "listen": Key(lambda v, p: parse_hostport(v, p, default_port=8025, allow_zero_port=True)),
    "users": Key(file_path),
    "tls": Key(Section(ConsoleTls, {"certificate": Key(file_path), "key": Key(file_path)},
                       finish=_both_or_neither("certificate", "key"))),
}, finish=_finish_console)


def redis_url(value: Any, path: str) -> str:
    parse_redis_url(value, path)
    return value.strip()


CLUSTER = Section(ClusterConfig, {          # mta/cluster
    "redis": Key(redis_url, null_means=None),       # null: a single machine
    "node": Key(lambda v, p: parse_domain(v, p) if "." in str(v) else node_name(v, p)),
})


def node_name(value: Any, path: str) -> str:
    """A node's name: letters, digits, ``-`` and ``_`` (or a host name)."""
    text = string(value, path).strip()
    if not text or len(text) > 64 or not all(c.isalnum() or c in "-_" for c in text):
        raise ConfigError(path, f"expected a node name such as mx1 (letters, digits, - and _), got {describe(value)}")
    return text


GATEWAY = Section(GatewayConfig, {
    "hostname": Key(lambda v, p: parse_domain(v, p), REQUIRED),
    "spool": Key(file_path, "var/spool"),
    "postmaster": Key(mail_address),          # default: postmaster@<first local domain or hostname>
    "local_domains": Key(local_domains),
    "dns": Key(DNS),
    "queue": Key(QUEUE),
    "control_socket": Key(file_path),         # default: <spool>/control.sock (smtpgw queue)
    "metrics": Key(METRICS),
    "console": Key(CONSOLE),
    "workers": Key(lambda v, p: worker_count(v, p), 1),     # mta/workers/identity.py
    "message_memory": Key(size),              # mta/smtp/server/message_memory.py
    "recipient_delimiter": Key(delimiter, "+", null_means=None),    # null: off
    "mta_sts": Key(MTA_STS),
    "tls_rpt": Key(TLS_RPT),                  # RFC 8460 reports (mta/delivery/tls_report.py)
    "shaping": Key(lambda v, p: shaping_rules(v, p)),          # mta/delivery/shaping.py
    "cluster": Key(CLUSTER),                  # mta/cluster: several gateways as one on Redis
}, finish=_finish_gateway)

LIMITS = Section(Limits, {
    "max_message_size": Key(size),
    "max_recipients": Key(integer(1)),
    "max_connections": Key(integer(1)),
    "timeout": Key(duration),
    "max_errors": Key(integer(1)),
    "max_connections_per_client": Key(integer(1)),
    "max_connection_rate": Key(integer(0)),
    "min_data_rate": Key(parse_size),
})

RELAY = Section(RelayConfig, {
    "allow": Key(list_of(network)),
    "allow_authenticated": Key(boolean),
})

TLS = Section(TlsConfig, {
    "certificate": Key(file_path),
    "key": Key(file_path),
    "required": Key(boolean),
}, finish=_finish_tls)

def sender_pattern(value: Any, path: str) -> str:
    """An address, or ``@domain`` for every address of a domain."""
    text = string(value, path).strip()
    if text.startswith("@"):
        return "@" + parse_domain(text[1:], path)
    return mail_address(text, path).lower()


def sender_logins(value: Any, path: str) -> dict[str, tuple[str, ...]] | str:
    """``{alice: [alice@example.test, "@example.org"]}``, or the path of a YAML file holding it."""
    if isinstance(value, str):
        return existing_file(value, path)
    return sender_map(value, path)


def sender_map(value: Any, path: str) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for user, owned in expect_mapping(value, path).items():
        key = join(path, str(user))
        items = owned if isinstance(owned, list) else [owned]
        out[str(user)] = tuple(sender_pattern(a, f"{key}[{i}]") for i, a in enumerate(items))
    return out


def read_sender_file(path: str) -> dict[str, tuple[str, ...]]:
    """The file form of ``auth.senders``: the same mapping in YAML. Raises ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_StrictLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigFileError(path, f"cannot read the sender list: {getattr(e, 'strerror', None) or e}") from None
    return sender_map(data or {}, path)


FAILURE_LIMIT = Section(FailureLimit, {
    "count": Key(integer(0)),
    "per": Key(duration),
})

AUTH = Section(AuthConfig, {
    "senders": Key(sender_logins),          # mta/policy/senders.py
    "users": Key(file_path),
    "allow_plaintext": Key(boolean),
    "max_failures": Key(integer(1, 100)),
    "max_failures_per_client": Key(FAILURE_LIMIT),
    "required": Key(boolean),
})

LOG_PERIODS = ("hourly", "daily", "weekly", "monthly", "unlimited")


def log_period(value: Any, path: str) -> str | int:
    """A protocol log's "new log time period": a period name, or a size (a new file once one is full)."""
    if isinstance(value, str) and value.strip().lower() in LOG_PERIODS:
        return value.strip().lower()
    try:
        return size(value, path)
    except ConfigError:
        raise ConfigError(path, f"expected one of {', '.join(LOG_PERIODS)}, or a size such as 10MB, "
                                f"got {describe(value)}") from None


PROTOCOL_LOG = Section(ProtocolLogConfig, {
    "enabled": Key(boolean),
    "directory": Key(file_path),
    "period": Key(log_period),
    "local_time": Key(boolean),
    "fields": Key(list_of(choice(*PROTOCOL_LOG_FIELDS), min_len=1, unique=True)),
})

DSN = Section(DsnConfig, {                  # mta/dsn/params.py limit_untrusted
    "untrusted": Key(choice("headers", "off", "full")),
})

VIRTUAL_SERVER = Section(VirtualServer, {
    "name": Key(string, REQUIRED),
    "listen": Key(list_of(listen_address, min_len=1, unique=True), REQUIRED),
    "limits": Key(LIMITS),
    "relay": Key(RELAY),
    "tls": Key(TLS),
    "auth": Key(AUTH),
    "protocol_log": Key(PROTOCOL_LOG),
    "dsn": Key(DSN),
    "smart_host": Key(smart_host),
    "odmr": Key(boolean),
})

CONTENT_RESTRICTIONS = Section(ContentRestrictions, {
    "max_message_size": Key(size),
    "allowed_types": Key(subset("system", "non-system")),
    "allowed_priorities": Key(subset("high", "normal", "low")),
})

OVERSIZE = Section(OversizeConfig, {
    "threshold": Key(size),
    "schedule": Key(parse_schedule),
}, finish=_both_or_neither("threshold", "schedule"))

def _finish_trigger_authorization(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    if (kwargs.get("network") is None) == (kwargs.get("account") is None):
        raise ConfigError(path, "expected exactly one of network (a CIDR) or account (a user name)")
    return kwargs


TRIGGER_AUTHORIZATION = Section(TriggerAuthorization, {
    "network": Key(network),
    "account": Key(string),
}, finish=_finish_trigger_authorization)


def _finish_delivery(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    if kwargs.get("authorized") and not kwargs.get("remote_triggered"):
        raise ConfigError(join(path, "authorized"), "is only used with remote_triggered: true")
    return kwargs


DELIVERY = Section(DeliveryConfig, {
    "schedule": Key(parse_schedule),
    "remote_triggered": Key(boolean),
    "oversize": Key(OVERSIZE),
    "timezone": Key(time_zone),
    "authorized": Key(list_of(TRIGGER_AUTHORIZATION, unique=True)),
}, finish=_finish_delivery)

DELIVERY_RESTRICTIONS = Section(DeliveryRestrictions, {
    "default": Key(choice("accept", "reject")),
    "except": Key(list_of(restriction_entry, unique=True), field="exceptions"),
})

# -- outbound connections of a connector ---------------------------------------------------------

def secret(value: Any, path: str) -> str:
    """A password as written: YAML may read an all-digit one as a number; spaces are kept."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"expected a non-empty string, got {describe(value)}")
    return value


OUTBOUND_AUTH = Section(OutboundAuth, {
    "username": Key(string, REQUIRED),
    "password": Key(secret, REQUIRED),
    "mechanism": Key(lambda v, p: choice("plain", "login")(v, p).upper()),
})


def _finish_outbound(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    """The combinations that cannot work are refused here, not discovered at the first delivery."""
    tls, helo = kwargs.get("tls", "opportunistic"), kwargs.get("helo", "ehlo")
    if kwargs.get("ca_file") is not None and tls != "verify":
        raise ConfigError(join(path, "ca_file"), f"is only used with tls: verify (tls is {tls})")
    if helo == "helo" and tls in ("required", "verify"):
        raise ConfigError(join(path, "helo"), f"HELO cannot be used with tls: {tls} "
                                              "(STARTTLS needs EHLO)")
    if helo == "helo" and kwargs.get("auth") is not None:
        raise ConfigError(join(path, "helo"), "HELO cannot be used with auth (AUTH needs EHLO)")
    if kwargs.get("auth") is not None and tls == "none" and not kwargs.get("allow_plaintext_auth"):
        raise ConfigError(join(path, "auth"), "credentials are only sent over TLS: set tls to "
                                              "opportunistic, required or verify, or allow_plaintext_auth: true")
    return kwargs


OUTBOUND = Section(OutboundConfig, {
    "tls": Key(choice("none", "opportunistic", "required", "verify")),
    "ca_file": Key(existing_file),
    "auth": Key(OUTBOUND_AUTH),
    "allow_plaintext_auth": Key(boolean),
    "helo": Key(choice("ehlo", "helo")),
    "port": Key(integer(1, 65535)),
    "connect_timeout": Key(duration),
    "mta_sts": Key(boolean),
    "dane": Key(boolean),
}, finish=_finish_outbound)


def _finish_connector(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    """A per-host limit left out follows a smaller total; one written larger than the total is an error."""
    total = kwargs.get("max_connections", Connector.max_connections)
    if "max_connections_per_host" not in kwargs:
        kwargs["max_connections_per_host"] = min(Connector.max_connections_per_host, total)
    elif kwargs["max_connections_per_host"] > total:
        raise ConfigError(join(path, "max_connections_per_host"),
                          f"{kwargs['max_connections_per_host']} is larger than max_connections ({total})")
    return kwargs


# -- asking the ISP to dequeue (etrn_dequeue plugin) ---------------------------------------------

def etrn_command(value: Any, path: str) -> str:
    """ETRN, ATRN, or a site's own command line with ``{domain}`` (``DEQUEUE {domain}``)."""
    text = string(value, path)
    if text.upper() in ("ETRN", "ATRN"):
        return text.upper()
    if not text.isascii() or any(c in text for c in "\r\n\0") or not text.split()[0].isalpha():
        raise ConfigError(path, f"expected ETRN, ATRN or a command like \"DEQUEUE {{domain}}\", got {value!r}")
    return text


def _finish_etrn(kwargs: dict[str, Any], path: str) -> dict[str, Any]:
    command = kwargs.get("command", "ETRN")
    if kwargs.get("run") and command == "ATRN":
        raise ConfigError(join(path, "run"), "a trigger program cannot receive mail: use ETRN or a site command")
    if command == "ATRN":
        if kwargs.get("auth") is None:
            raise ConfigError(join(path, "auth"), "required with command: ATRN (RFC 2645 needs AUTH)")
        if kwargs.get("tls", "required") != "required" and not kwargs.get("allow_plaintext_auth"):
            raise ConfigError(join(path, "tls"), "ATRN needs tls: required (or allow_plaintext_auth: true)")
        kwargs.setdefault("tls", "required")
    if kwargs.get("schedule") is not None and kwargs["schedule"].kind == "always":
        raise ConfigError(join(path, "schedule"), "use \"every <duration>\" or a weekly grid (always has no moment to fire)")
    return kwargs


ETRN = Section(EtrnRequest, {
    "server": Key(smart_host, REQUIRED),
    "domains": Key(list_of(lambda v, p: parse_domain(v, p), min_len=1, unique=True), REQUIRED),
    "command": Key(etrn_command),
    "schedule": Key(parse_schedule),
    "auth": Key(OUTBOUND_AUTH),
    "tls": Key(choice("none", "opportunistic", "required")),
    "allow_plaintext_auth": Key(boolean),
    "helo": Key(lambda v, p: parse_domain(v, p)),
    "run": Key(list_of(string, min_len=1)),
}, finish=_finish_etrn)


CONNECTOR = Section(Connector, {
    "name": Key(string, REQUIRED),
    "address_spaces": Key(address_spaces),
    "smart_hosts": Key(list_of(smart_host, unique=True)),
    "bridgeheads": Key(list_of(string, min_len=1, unique=True)),   # default: every virtual server
    "content_restrictions": Key(CONTENT_RESTRICTIONS),
    "delivery": Key(DELIVERY),
    "delivery_restrictions": Key(DELIVERY_RESTRICTIONS),
    "outbound": Key(OUTBOUND),
    "max_connections": Key(integer(1)),
    "max_connections_per_host": Key(integer(1)),
    "etrn": Key(ETRN),
    "protocol_log": Key(PROTOCOL_LOG),
}, extra_field="extra", finish=_finish_connector)


# -- plugins -------------------------------------------------------------------------------------

DIAG_LEVELS = ("none", "minimum", "medium", "maximum")
DIAG_CATEGORIES = ("smtp_protocol", "queuing_engine", "routing_engine", "connection_manager",
                   "authentication", "ndr", "categorizer", "transport_security")
DIAG_TARGETS = ("log", "file", "syslog", "stdout")     # log: the daemon's own (twistd) log
DIAG_FORMATS = ("text", "json")
DIAG_DEFAULT_PATH = "var/log/smtpgw-diag.log"
DIAG_SYSLOG_SOCKET = "/dev/log"                             # ``path`` with ``target: syslog``


def _diag_logging_settings(data: dict[str, Any], path: str) -> dict[str, Any]:
    """``levels: {category: none|minimum|medium|maximum}`` (every category defaults to minimum),
    ``target: log|file|syslog|stdout``, ``path`` (the file, or the syslog socket), ``format: text|json``."""
    check_known(data, ("levels", "target", "path", "format"), path)
    out = dict(data)
    raw = data.get("levels")
    levels = {c: "minimum" for c in DIAG_CATEGORIES}
    if raw is not None:
        for category, level in expect_mapping(raw, join(path, "levels")).items():
            key = join(join(path, "levels"), str(category))
            if category not in DIAG_CATEGORIES:
                raise ConfigError(key, f"unknown category (known: {', '.join(DIAG_CATEGORIES)})")
            levels[str(category)] = choice(*DIAG_LEVELS)(level, key)
    out["levels"] = levels
    out["target"] = "log" if data.get("target") is None else choice(*DIAG_TARGETS)(data["target"], join(path, "target"))
    default = DIAG_SYSLOG_SOCKET if out["target"] == "syslog" else DIAG_DEFAULT_PATH
    out["path"] = default if data.get("path") is None else file_path(data["path"], join(path, "path"))
    out["format"] = "text" if data.get("format") is None else choice(*DIAG_FORMATS)(data["format"], join(path, "format"))
    return out


def _etrn_dequeue_settings(data: dict[str, Any], path: str) -> dict[str, Any]:
    """``rate_limit: {requests: 10, per: 1m}`` (ETRN per client address), ``turn: false`` (RFC 821
    TURN, refused with 502 unless true; then only for authenticated accounts and their own domains)."""
    check_known(data, ("rate_limit", "turn"), path)
    rate = read_keys(data.get("rate_limit") or {}, join(path, "rate_limit"), {
        "requests": Key(integer(1), 10), "per": Key(duration, 60.0)})
    return {"rate_limit": rate, "turn": boolean(data["turn"], join(path, "turn"))
            if data.get("turn") is not None else False}


DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
DKIM_DEFAULT_HEADERS = ("from", "to", "cc", "subject", "date", "message-id", "reply-to", "mime-version",
                        "content-type", "content-transfer-encoding", "in-reply-to", "references")
DKIM_NEVER_SIGNED = ("received", "return-path", "dkim-signature", "bcc", "resent-bcc", "comments", "keywords")


def header_name(value: Any, path: str) -> str:
    text = string(value, path).lower()
    if not all(33 <= ord(c) <= 126 and c != ":" for c in text):
        raise ConfigError(path, f"expected a header field name (subject, message-id...), got {describe(value)}")
    return text


def dkim_selector(value: Any, path: str) -> str:
    """A selector is one or more DNS labels (RFC 6376 3.1), placed before ``._domainkey.``."""
    text = string(value, path).lower()
    if not all(label and len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
               and label.isascii() for label in text.split(".")):
        raise ConfigError(path, f"expected a DNS label such as s2026, got {describe(value)}")
    return text


DKIM_KEY = {
    "domain": Key(lambda v, p: parse_domain(v, p), REQUIRED),
    "selector": Key(dkim_selector, REQUIRED),
    "key": Key(file_path, REQUIRED),          # read and checked by the plugin (dkim_sign.check_config)
    "algorithm": Key(choice(*DKIM_ALGORITHMS), "rsa-sha256"),
}


def _dkim_sign_settings(data: dict[str, Any], path: str) -> dict[str, Any]:
    """``keys: [{domain, selector, key, algorithm}]``, ``headers`` (From is always among them),
    ``sign: relayed|all``."""
    check_known(data, ("keys", "headers", "sign"), path)
    keys = list_of(lambda v, p: read_keys(v, p, DKIM_KEY))(data.get("keys") or [], join(path, "keys"))
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(keys):
        pair = (key["domain"], key["selector"])
        if pair in seen:
            raise ConfigError(f"{join(path, 'keys')}[{i}]",
                              f"selector {pair[1]!r} of {pair[0]!r} is listed twice (also keys[{seen[pair]}])")
        seen[pair] = i
    headers = DKIM_DEFAULT_HEADERS
    if data.get("headers") is not None:
        headers = list_of(header_name, min_len=1, unique=True)(data["headers"], join(path, "headers"))
        for i, name in enumerate(headers):
            if name in DKIM_NEVER_SIGNED:
                raise ConfigError(f"{join(path, 'headers')}[{i}]", f"{name} must not be signed (RFC 6376 5.4)")
        if "from" not in headers:
            raise ConfigError(join(path, "headers"), "must include from (RFC 6376 5.4: From is always signed)")
    sign = "relayed" if data.get("sign") is None else choice("relayed", "all")(data["sign"], join(path, "sign"))
    return {"keys": keys, "headers": tuple(headers), "sign": sign}


def _sender_auth_settings(data: dict[str, Any], path: str) -> dict[str, Any]:
    """``authserv_id`` (default gateway.hostname), ``spf``/``dkim``/``dmarc`` (true), ``arc: {verify,
    seal}``, ``reject: {spf_fail, dmarc_reject}`` (false), ``trusted_networks`` (none)."""
    out = read_keys(data, path, {
        "authserv_id": Key(lambda v, p: parse_domain(v, p)),
        "spf": Key(boolean, True),
        "dkim": Key(boolean, True),
        "dmarc": Key(boolean, True),
        "arc": Key(lambda v, p: read_keys(v, p, {
            "verify": Key(boolean, True),
            "seal": Key(lambda v2, p2: read_keys(v2, p2, {k: DKIM_KEY[k] for k in ("domain", "selector", "key")})),
        })),
        "reject": Key(lambda v, p: read_keys(v, p, {"spf_fail": Key(boolean, False),
                                                    "dmarc_reject": Key(boolean, False)})),
        "trusted_networks": Key(list_of(network)),
    })
    out.setdefault("authserv_id", None)
    out["arc"] = {"verify": True, "seal": None, **out.get("arc", {})}
    out["reject"] = {"spf_fail": False, "dmarc_reject": False, **out.get("reject", {})}
    out.setdefault("trusted_networks", ())
    return out


# plugin name -> validator of its section (raw dict in, settings dict out). A plugin with no entry
# gets its section as written. Sections listed here are filled in even when the file leaves them out.
PLUGIN_SETTINGS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "diag_logging": _diag_logging_settings,
    "etrn_dequeue": _etrn_dequeue_settings,
    "dkim_sign": _dkim_sign_settings,
    "sender_auth": _sender_auth_settings,
}


ENTRY_POINT_GROUP = "smtpgw.plugins"


def available_plugins() -> dict[str, Any]:
    """Installed plugins by name (entry points of the ``smtpgw.plugins`` group), not yet imported."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed_plugins() -> list[str]:
    return sorted(available_plugins())


def local_hook(value: Any, path: str) -> LocalHook:
    """``FILE``, or ``{path: FILE, settings: {...}}`` for a hook file with settings of its own."""
    settings: dict[str, Any] = {}
    if isinstance(value, dict):
        check_known(value, ["path", "settings"], path)
        if value.get("path") is None:
            raise ConfigError(join(path, "path"), "required: the hook file")
        if value.get("settings") is not None:
            settings = dict(expect_mapping(value["settings"], join(path, "settings")))
        name = file_path(value["path"], join(path, "path"))
    else:
        name = file_path(value, path)
    if not os.path.isfile(name):
        raise ConfigError(path, f"no such file {name!r} (relative paths are resolved against "
                                f"the working directory, {os.getcwd()})")
    return LocalHook(name, settings)


def local_hooks(value: Any, path: str) -> tuple[LocalHook, ...]:
    return no_repeats(list_of(local_hook)(value, path), lambda h: h.path, path, "")


def plugins_section(value: Any, path: str) -> PluginsConfig:
    """``enabled`` (installed plugin names), ``local`` (hook files) and one section per plugin."""
    installed = installed_plugins()
    data = expect_mapping(value, path)
    check_known(data, ["enabled", "local", *installed], path)
    kwargs: dict[str, Any] = {}
    if data.get("enabled") is not None:
        def plugin_name(raw: Any, key: str) -> str:
            if not isinstance(raw, str) or raw not in installed:
                raise ConfigError(key, f"unknown plugin {describe(raw)} (installed: "
                                       f"{', '.join(installed) or 'none'})")
            return raw
        kwargs["enabled"] = list_of(plugin_name, unique=True)(data["enabled"], join(path, "enabled"))
    if data.get("local") is not None:
        kwargs["local"] = local_hooks(data["local"], join(path, "local"))
    settings: dict[str, dict[str, Any]] = {}
    for name in installed:
        key = join(path, name)
        raw = data.get(name)
        section = {} if raw is None else dict(expect_mapping(raw, key))
        validate = PLUGIN_SETTINGS.get(name)
        if validate is not None:
            settings[name] = validate(section, key)
        elif raw is not None:
            settings[name] = section
    return PluginsConfig(**kwargs, settings=settings)


# -- the whole file ------------------------------------------------------------------------------

TOP_KEYS = {
    "gateway": Key(GATEWAY, REQUIRED),
    "virtual_servers": Key(list_of(VIRTUAL_SERVER, min_len=1), REQUIRED),
    "connectors": Key(list_of(CONNECTOR), ()),
    "plugins": Key(plugins_section),          # left out: as if empty, so plugin defaults are filled in
}


def _unique_names(items: tuple, section: str, what: str) -> None:
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        if item.name in first:
            raise ConfigError(f"{section}[{i}].name",
                              f"duplicate {what} name {item.name!r} (also {section}[{first[item.name]}])")
        first[item.name] = i


def check_names(config: Config) -> None:
    _unique_names(config.virtual_servers, "virtual_servers", "virtual server")
    _unique_names(config.connectors, "connectors", "connector")


def check_listeners(config: Config) -> None:
    """Two virtual servers cannot bind the same address and port (port 0 picks a free one)."""
    first: dict[tuple[str, int], str] = {}
    for i, vs in enumerate(config.virtual_servers):
        for j, addr in enumerate(vs.listen):
            where = f"virtual_servers[{i}].listen[{j}]"
            if addr.port and (addr.host, addr.port) in first:
                raise ConfigError(where, f"{addr.host}:{addr.port} is already used by "
                                         f"{first[(addr.host, addr.port)]}")
            first[(addr.host, addr.port)] = where


def check_bridgeheads(config: Config) -> None:
    names = {vs.name for vs in config.virtual_servers}
    for i, connector in enumerate(config.connectors):
        for j, name in enumerate(connector.bridgeheads):
            if name not in names:
                raise ConfigError(f"connectors[{i}].bridgeheads[{j}]", f"no virtual server named {name!r}")


def check_oversize(config: Config) -> None:
    """The seed: the oversize value may not exceed the Allowed sizes box of Content Restrictions."""
    for i, connector in enumerate(config.connectors):
        threshold = connector.delivery.oversize.threshold
        limit = connector.content_restrictions.max_message_size
        if threshold is not None and limit is not None and threshold > limit:
            raise ConfigError(f"connectors[{i}].delivery.oversize.threshold",
                              f"{format_size(threshold)} is larger than "
                              f"content_restrictions.max_message_size ({format_size(limit)})")


def check_tls_and_auth(config: Config) -> None:
    """An implicit-TLS listener needs a certificate; a users file needs a session AUTH can be offered on."""
    for i, vs in enumerate(config.virtual_servers):
        has_tls = vs.tls.certificate is not None
        for j, addr in enumerate(vs.listen):
            if addr.tls and not has_tls:
                raise ConfigError(f"virtual_servers[{i}].listen[{j}].tls",
                                  "implicit TLS needs tls.certificate and tls.key")
        if vs.auth.required and not vs.auth.users:
            raise ConfigError(f"virtual_servers[{i}].auth.required", "AUTH cannot be required without auth.users")
        if vs.auth.users and not has_tls and not vs.auth.allow_plaintext:
            raise ConfigError(f"virtual_servers[{i}].auth.users",
                              "AUTH is only offered over TLS: set tls.certificate and tls.key "
                              "(or auth.allow_plaintext: true, for loopback clients while testing)")


def check_control_socket(config: Config) -> None:
    """A UNIX socket path has a hard length limit (108 bytes on Linux); a spool deep in the tree would
    otherwise leave `smtpgw queue` unable to reach the running gateway."""
    path = os.path.abspath(config.gateway.control_socket_path)
    if len(os.fsencode(path)) > 107:
        key = "gateway.control_socket" if config.gateway.control_socket else "gateway.spool"
        raise ConfigError(key, f"the control socket {path} is longer than a UNIX socket path may be "
                               "(107 bytes); set gateway.control_socket to a shorter path")


CHECKS: list[Callable[[Config], None]] = [check_names, check_listeners, check_bridgeheads, check_oversize,
                                          check_tls_and_auth]
CHECKS.append(check_control_socket)         # smtpgw queue (mta/ops/control.py)


def worker_count(value: Any, path: str) -> int | str:
    """``gateway.workers``: a number of processes (1-64) or ``auto`` (one per CPU)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ConfigError(path, f"expected a number of worker processes from 1 to 64, or auto, got {describe(value)}")
    return value


CHECKS.append(check_workers)                # several worker processes (mta/config/workers.py)


def check_message_memory(config: Config) -> None:
    """A message larger than a worker's share of ``gateway.message_memory`` could never be received
    (452 for ever), so the budget must hold the largest message a virtual server accepts."""

    count = resolve_count(config)
    share = -(-config.gateway.message_memory // count)
    for i, vs in enumerate(config.virtual_servers):
        if vs.limits.max_message_size > share:
            per = f" per worker ({count} workers)" if count > 1 else ""
            raise ConfigError("gateway.message_memory",
                              f"{format_size(share)}{per} is smaller than virtual_servers[{i}].limits."
                              f"max_message_size ({format_size(vs.limits.max_message_size)}): such "
                              "messages could never be received")


CHECKS.append(check_message_memory)         # the server's memory for messages (mta/smtp/server/message_memory.py)


def _default_bridgeheads(config: Config) -> Config:
    """A connector that names no bridgehead may be used by every virtual server."""
    everyone = tuple(vs.name for vs in config.virtual_servers)
    connectors = tuple(c if c.bridgeheads else replace(c, bridgeheads=everyone) for c in config.connectors)
    return replace(config, connectors=connectors)


def build(data: Any, path: str | None = None) -> Config:
    """Validate an already-parsed YAML document and return the :class:`Config`."""
    if data is None:
        raise ConfigError("", "the configuration is empty (expected the sections "
                              "gateway, virtual_servers, connectors, plugins)")
    if not isinstance(data, dict):
        raise ConfigError("", f"expected a mapping with the sections gateway, virtual_servers, "
                              f"connectors, plugins; got {describe(data)}")
    got = read_keys(data, "", TOP_KEYS)
    if "plugins" not in got:
        got["plugins"] = plugins_section({}, "plugins")
    config = _default_bridgeheads(Config(**got, path=path))
    for check in CHECKS:
        check(config)
    return config
