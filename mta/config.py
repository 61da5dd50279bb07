"""The configuration (etc/gateway.yaml) as typed, validated objects.

The YAML keys are a public interface (see ARCHITECTURE.md). Everything is validated before anything
listens; a bad file raises :class:`ConfigError` naming the key path, e.g.
``virtual_servers[0].limits.max_recipients: expected an integer, got 'lots'``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from mta.schedule import Schedule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration problem; ``str()`` is ``<key path>: <what is wrong>``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


@dataclass(frozen=True)
class LocalDomain:
    name: str                       # lower-case domain
    maildir: str                    # folder holding one Maildir per recipient (local part, lower-case)


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[tuple[str, int], ...] = ()      # (ip, port); empty = system resolver
    timeout: float = 5.0


@dataclass(frozen=True)
class QueueConfig:
    retry: tuple[float, ...] = (600.0, 600.0, 600.0, 900.0)   # seconds: 1st, 2nd, 3rd, subsequent
    delay_notification: float = 12 * 3600.0
    expire: float = 2 * 86400.0
    max_hops: int = 30

    def retry_interval(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based); the last entry repeats."""
        i = max(0, min(attempts - 1, len(self.retry) - 1))
        return self.retry[i]


@dataclass(frozen=True)
class GatewayConfig:
    hostname: str
    spool: str
    postmaster: str
    local_domains: dict[str, LocalDomain] = field(default_factory=dict)
    dns: DnsConfig = field(default_factory=DnsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int
    tls: bool = False               # implicit TLS (e.g. port 465)


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 10 * 1024 * 1024
    max_recipients: int = 64000
    max_connections: int = 1000
    timeout: float = 300.0


@dataclass(frozen=True)
class RelayConfig:
    allow: tuple[IPNetwork, ...] = ()
    allow_authenticated: bool = True


@dataclass(frozen=True)
class TlsConfig:
    certificate: str | None = None
    key: str | None = None
    required: bool = False


@dataclass(frozen=True)
class AuthConfig:
    users: str | None = None


@dataclass(frozen=True)
class ProtocolLogConfig:
    enabled: bool = False
    directory: str = "var/log/smtp"
    period: str = "daily"


@dataclass(frozen=True)
class VirtualServer:
    name: str
    listen: tuple[ListenAddress, ...]
    limits: Limits = field(default_factory=Limits)
    relay: RelayConfig = field(default_factory=RelayConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    protocol_log: ProtocolLogConfig = field(default_factory=ProtocolLogConfig)
    smart_host: str | None = None   # the virtual server's own smart host; a connector's overrides it


@dataclass(frozen=True)
class AddressSpace:
    domain: str                     # "*", "example.test" or "*.example.test" (lower-case)
    cost: int = 1

    def matches(self, domain: str) -> bool:
        d = domain.lower().rstrip(".")
        if self.domain == "*":
            return True
        if self.domain.startswith("*."):
            base = self.domain[2:]
            return d == base or d.endswith("." + base)
        return d == self.domain

    @property
    def specificity(self) -> int:
        """Higher is more specific: exact > *.sub.domain > *.domain > *."""
        if self.domain == "*":
            return 0
        if self.domain.startswith("*."):
            return 2 * self.domain.count(".")
        return 2 * self.domain.count(".") + 1000


@dataclass(frozen=True)
class ContentRestrictions:
    max_message_size: int | None = None
    allowed_types: tuple[str, ...] = ("system", "non-system")
    allowed_priorities: tuple[str, ...] = ("high", "normal", "low")


@dataclass(frozen=True)
class OversizeConfig:
    threshold: int | None = None
    schedule: Schedule | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    schedule: Schedule = field(default_factory=Schedule.always)
    remote_triggered: bool = False
    oversize: OversizeConfig = field(default_factory=OversizeConfig)


@dataclass(frozen=True)
class DeliveryRestrictions:
    default: str = "accept"                 # accept | reject
    exceptions: tuple[str, ...] = ()        # YAML key "except": addresses and "@domain" entries


@dataclass(frozen=True)
class Connector:
    name: str
    address_spaces: tuple[AddressSpace, ...] = (AddressSpace("*", 1),)
    smart_hosts: tuple[str, ...] = ()
    bridgeheads: tuple[str, ...] = ()
    content_restrictions: ContentRestrictions = field(default_factory=ContentRestrictions)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    delivery_restrictions: DeliveryRestrictions = field(default_factory=DeliveryRestrictions)
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # keys for later plugins


@dataclass(frozen=True)
class PluginsConfig:
    enabled: tuple[str, ...] = ("relay_acl", "smart_host", "etrn_dequeue", "diag_logging")
    local: tuple[str, ...] = ()
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)   # per-plugin sections, raw


@dataclass(frozen=True)
class Config:
    gateway: GatewayConfig
    virtual_servers: tuple[VirtualServer, ...]
    connectors: tuple[Connector, ...]
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    path: str | None = None                 # the file it came from; relative paths are resolved against cwd

    def virtual_server(self, name: str) -> VirtualServer:
        for vs in self.virtual_servers:
            if vs.name == name:
                return vs
        raise KeyError(name)

    def is_local_domain(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.gateway.local_domains


def load_config(path: str) -> Config:
    """Read and validate a YAML file. Raises :class:`ConfigError` (naming the key) on any problem."""
    from mta.config_loader import load
    return load(path)


def parse_config(data: Any, path: str | None = None) -> Config:
    """Validate an already-parsed YAML document (a dict)."""
    from mta.config_loader import build
    return build(data, path)
