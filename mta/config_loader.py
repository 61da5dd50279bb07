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
* a key that is left out or set to null takes its default (listed in ARCHITECTURE.md);
* relative paths (spool, maildir, TLS files, users file, protocol log directory, ``plugins.local``)
  are kept as written and resolve against the working directory of the process, not the file's folder;
* domains are lower-cased; sizes are binary (KB = 1024).
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, replace
from typing import Any, Callable

import yaml

from mta.config import (
    AddressSpace, AuthConfig, Config, ConfigError, Connector, ContentRestrictions, DeliveryConfig,
    DeliveryRestrictions, DnsConfig, GatewayConfig, Limits, ListenAddress, LocalDomain, OversizeConfig,
    PluginsConfig, ProtocolLogConfig, QueueConfig, RelayConfig, TlsConfig, VirtualServer,
)
from mta.schedule import parse_schedule
from mta.units import (
    describe, format_size, parse_domain, parse_duration, parse_hostport, parse_size, parse_smart_host,
)

Convert = Callable[[Any, str], Any]      # (raw YAML value, key path) -> value, or raise ConfigError


class ConfigFileError(ConfigError):
    """The file itself could not be read or parsed; ``str()`` already names the file (and line)."""


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


def load(path: str) -> Config:
    """Read and validate the YAML file at ``path``.

    File and YAML problems raise :class:`ConfigFileError` (``FILE: line N, column M: ...``); problems
    with a key raise :class:`ConfigError` naming the key path.
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
    return build(data, path)


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


def address_spaces(value: Any, path: str) -> tuple[AddressSpace, ...]:
    spaces = list_of(address_space, min_len=1)(value, path)
    seen: set[str] = set()
    for i, space in enumerate(spaces):
        if space.domain in seen:
            raise ConfigError(f"{path}[{i}]", f"the address space {space.domain!r} is listed twice")
        seen.add(space.domain)
    return spaces


def nameserver(value: Any, path: str) -> tuple[str, int]:
    return parse_hostport(value, path, default_port=53)


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
    """
    convert: Convert
    default: Any = None
    field: str | None = None
    extra: bool = False


def read_keys(value: Any, path: str, keys: dict[str, Key]) -> dict[str, Any]:
    """Convert a mapping's keys; returns YAML name -> value for the keys present (or defaulted)."""
    data = expect_mapping(value, path)
    check_known(data, keys, path)
    out: dict[str, Any] = {}
    for name, spec in keys.items():
        raw = data.get(name)
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
        out[name] = LocalDomain(name, got["maildir"])
    return out


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

GATEWAY = Section(GatewayConfig, {
    "hostname": Key(lambda v, p: parse_domain(v, p), REQUIRED),
    "spool": Key(file_path, "var/spool"),
    "postmaster": Key(mail_address),          # default: postmaster@<first local domain or hostname>
    "local_domains": Key(local_domains),
    "dns": Key(DNS),
    "queue": Key(QUEUE),
}, finish=_finish_gateway)

LIMITS = Section(Limits, {
    "max_message_size": Key(size),
    "max_recipients": Key(integer(1)),
    "max_connections": Key(integer(1)),
    "timeout": Key(duration),
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

AUTH = Section(AuthConfig, {
    "users": Key(file_path),
})

PROTOCOL_LOG = Section(ProtocolLogConfig, {
    "enabled": Key(boolean),
    "directory": Key(file_path),
    "period": Key(choice("hourly", "daily", "weekly", "monthly")),
})

VIRTUAL_SERVER = Section(VirtualServer, {
    "name": Key(string, REQUIRED),
    "listen": Key(list_of(listen_address, min_len=1, unique=True), REQUIRED),
    "limits": Key(LIMITS),
    "relay": Key(RELAY),
    "tls": Key(TLS),
    "auth": Key(AUTH),
    "protocol_log": Key(PROTOCOL_LOG),
    "smart_host": Key(smart_host),
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

DELIVERY = Section(DeliveryConfig, {
    "schedule": Key(parse_schedule),
    "remote_triggered": Key(boolean),
    "oversize": Key(OVERSIZE),
})

DELIVERY_RESTRICTIONS = Section(DeliveryRestrictions, {
    "default": Key(choice("accept", "reject")),
    "except": Key(list_of(restriction_entry, unique=True), field="exceptions"),
})

CONNECTOR = Section(Connector, {
    "name": Key(string, REQUIRED),
    "address_spaces": Key(address_spaces),
    "smart_hosts": Key(list_of(smart_host, unique=True)),
    "bridgeheads": Key(list_of(string, min_len=1, unique=True)),   # default: every virtual server
    "content_restrictions": Key(CONTENT_RESTRICTIONS),
    "delivery": Key(DELIVERY),
    "delivery_restrictions": Key(DELIVERY_RESTRICTIONS),
}, extra_field="extra")


# -- plugins -------------------------------------------------------------------------------------

DIAG_LEVELS = ("none", "minimum", "medium", "maximum")
DIAG_CATEGORIES = ("smtp_protocol", "queuing_engine", "routing_engine", "connection_manager",
                   "authentication", "ndr")


def _diag_logging_settings(data: dict[str, Any], path: str) -> dict[str, Any]:
    """``levels: {category: none|minimum|medium|maximum}``; the six categories default to minimum."""
    out = dict(data)
    raw = data.get("levels")
    levels = {c: "minimum" for c in DIAG_CATEGORIES}
    if raw is not None:
        for category, level in expect_mapping(raw, join(path, "levels")).items():
            levels[str(category)] = choice(*DIAG_LEVELS)(level, join(join(path, "levels"), str(category)))
    out["levels"] = levels
    return out


# plugin name -> validator of its section (raw dict in, settings dict out). A plugin with no entry
# gets its section as written. Sections listed here are filled in even when the file leaves them out.
PLUGIN_SETTINGS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "diag_logging": _diag_logging_settings,
}


def installed_plugins() -> list[str]:
    from mta.hooks import available_plugins
    return sorted(available_plugins())


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
        def hook_file(raw: Any, key: str) -> str:
            name = file_path(raw, key)
            if not os.path.isfile(name):
                raise ConfigError(key, f"no such file {name!r} (relative paths are resolved against "
                                       f"the working directory, {os.getcwd()})")
            return name
        kwargs["local"] = list_of(hook_file, unique=True)(data["local"], join(path, "local"))
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


CHECKS: list[Callable[[Config], None]] = [check_names, check_listeners, check_bridgeheads, check_oversize]


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
