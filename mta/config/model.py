"""The configuration (etc/gateway.yaml) as typed, validated objects.

The YAML keys are a public interface (docs/configuration.md). Everything is validated before anything
listens; a bad file raises :class:`ConfigError` naming the key path, e.g.
``virtual_servers[0].limits.max_recipients: expected an integer, got 'lots'``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from mta.config.errors import ConfigError  # noqa: F401  (re-exported: the model and its error travel together)
from mta.config.schedules import Schedule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class LocalDomain:
    name: str                       # lower-case domain
    maildir: str                    # folder holding one Maildir per recipient (local part, lower-case)
    # Who may receive (Exchange's recipient filtering, Postfix's local_recipient_maps): a tuple of
    # local parts, or the path of a file with one a line; None with no aliases = any local part.
    recipients: tuple[str, ...] | str | None = None
    aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)    # local part -> targets
    catch_all: str | None = None    # local part that gets the mail of unknown recipients
    # With neither recipients nor aliases, any local part makes a Maildir: how many that do not exist
    # yet one message may ask for (more get 452 4.5.3 at RCPT; mta/delivery/recipients.py NewMailboxes)
    max_new_mailboxes_per_message: int = 50

    @property
    def restricted(self) -> bool:
        """Whether unknown local parts are refused at RCPT time."""
        return (self.recipients is not None or bool(self.aliases)) and self.catch_all is None

    @property
    def any_local_part(self) -> bool:
        """Whether every local part gets a mailbox of its own (no recipient list, no aliases)."""
        return self.recipients is None and not self.aliases


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
class MetricsConfig:
    """``gateway.metrics``: the Prometheus endpoint (mta/ops/metrics.py); off by default, loopback by default."""
    enabled: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 9125)


@dataclass(frozen=True)
class MtaStsConfig:
    """``gateway.mta_sts``: where MTA-STS (RFC 8461) policies are trusted from and kept."""
    ca_file: str | None = None      # extra CAs for policy hosts and MX certificates; None: the system store
    cache: str | None = None        # the durable policy cache; None: <spool>/mta-sts


@dataclass(frozen=True)
class TlsRptConfig:
    """``gateway.tls_rpt``: TLS reporting (RFC 8460) on the sessions MTA-STS and DANE govern; off by default."""
    enabled: bool = False
    organization: str | None = None     # the reports' organization-name; None: gateway.hostname
    contact: str | None = None          # the reports' contact-info; None: gateway.postmaster
    interval: float = 86400.0           # one report per domain per interval (RFC 8460: daily, UTC days)


@dataclass(frozen=True)
class ClusterConfig:
    """``gateway.cluster``: several gateways as one through a Redis server (mta/cluster); off by default."""
    redis: str | None = None        # redis://[:password@]host[:port][/db] or rediss://; None: a single machine
    node: str | None = None         # this gateway's name in the cluster; default: gateway.hostname


@dataclass(frozen=True)
class ShapingRule:
    """One entry of ``gateway.shaping``: how hard to push one destination (mta/delivery/shaping.py).

    ``match`` is a destination domain (``gmail.com``), a suffix of the domain or of its MX host names
    (``*.outlook.com``: every domain whose MX hosts are outlook's shares one budget), or ``*`` (each
    destination domain on its own)."""
    match: str
    max_connections: int | None = None          # transactions in flight at once; None: no limit
    messages_per_minute: float | None = None    # None: no rate limit
    back_off_on_421: float = 60.0               # the pause after a 421 or a burst of 4xx; 0: no pause


@dataclass(frozen=True)
class ConsoleTls:
    """``gateway.console.tls``: the console's certificate and key (HTTPS when both are given)."""
    certificate: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    """``gateway.console``: the web console (mta/console/); off by default, loopback by default,
    logins from a users file written by ``smtpgw passwd``."""
    enabled: bool = False
    listen: tuple[str, int] = ("127.0.0.1", 8025)
    users: str | None = None
    tls: ConsoleTls = field(default_factory=ConsoleTls)


@dataclass(frozen=True)
class GatewayConfig:
    hostname: str
    spool: str
    postmaster: str
    local_domains: dict[str, LocalDomain] = field(default_factory=dict)
    dns: DnsConfig = field(default_factory=DnsConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    control_socket: str | None = None       # `smtpgw queue` talks to the daemon here; None: <spool>/control.sock
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    workers: int | str = 1                  # processes sharing the listeners (mta/workers/identity.py); "auto": one per CPU
    message_memory: int = 256 * 1024 * 1024     # bytes of messages being received (mta/smtp/server/message_memory.py)
    recipient_delimiter: str | None = "+"   # alice+news@ -> alice's mailbox; None: off
    mta_sts: MtaStsConfig = field(default_factory=MtaStsConfig)
    tls_rpt: TlsRptConfig = field(default_factory=TlsRptConfig)
    shaping: tuple[ShapingRule, ...] = ()   # per-destination traffic shaping, first match wins
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def node_name(self) -> str:
        """This gateway's name in a cluster (``gateway.cluster.node``, else the hostname)."""
        return self.cluster.node or self.hostname

    @property
    def mta_sts_cache(self) -> str:
        import os
        return self.mta_sts.cache or os.path.join(self.spool, "mta-sts")

    @property
    def tls_rpt_directory(self) -> str:
        """Where TLS-RPT counts are kept across restarts (mta/delivery/tls_report.py)."""
        import os
        return os.path.join(self.spool, "tls-rpt")

    @property
    def control_socket_path(self) -> str:
        import os
        return self.control_socket or os.path.join(self.spool, "control.sock")


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
    timeout: float = 300.0          # a command line must be complete this long after the last one
    max_errors: int = 20            # error replies in a session before 421 4.7.0 (Postfix smtpd_hard_error_limit)
    max_connections_per_client: int = 50    # one address's open connections (smtpd_client_connection_count_limit)
    max_connection_rate: int = 0    # one address's connections per minute; 0: no limit (smtpd_client_connection_rate_limit)
    min_data_rate: int = 1024       # bytes/s DATA and BDAT must average after the first minute; 0: none (smtpd_min_data_rate)


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
class FailureLimit:
    """``auth.max_failures_per_client``: ``count`` failed AUTH attempts from one address within ``per``
    seconds, across connections, and AUTH answers 454 to that address until the window ends; 0: off."""
    count: int = 10
    per: float = 600.0


@dataclass(frozen=True)
class AuthConfig:
    users: str | None = None        # the users file (mta/smtp/server/users.py); AUTH is offered only when set
    allow_plaintext: bool = False   # also offer AUTH without TLS, to loopback clients only (testing)
    max_failures: int = 3           # failed AUTH attempts in one connection before 421 and close
    max_failures_per_client: FailureLimit = field(default_factory=FailureLimit)   # across connections
    required: bool = False          # refuse MAIL before AUTH (530 5.7.0): no anonymous mail
    # the sender addresses each user may use (Postfix's smtpd_sender_login_maps): user -> addresses
    # and "@domain" patterns, or the path of a YAML file holding that mapping; None = no check
    senders: dict[str, tuple[str, ...]] | str | None = None


# The IIS/Exchange SMTP W3C Extended fields, in the order Exchange writes them (mta/smtp/server/protocol_log.py).
PROTOCOL_LOG_FIELDS = ("date", "time", "c-ip", "cs-username", "s-sitename", "s-computername", "s-ip", "s-port",
                       "cs-method", "cs-uri-stem", "cs-uri-query", "sc-status", "sc-win32-status", "sc-bytes",
                       "cs-bytes", "time-taken", "cs-version", "cs-host")


@dataclass(frozen=True)
class ProtocolLogConfig:
    enabled: bool = False
    directory: str = "var/log/smtp"
    period: str | int = "daily"     # hourly, daily, weekly, monthly, unlimited, or a size in bytes (int)
    local_time: bool = False        # name and roll files over by local time (entries stay in UTC)
    fields: tuple[str, ...] = PROTOCOL_LOG_FIELDS


@dataclass(frozen=True)
class DsnConfig:
    """``virtual_servers[].dsn``: what a client neither relay-allowed nor authenticated may ask of
    success and delay notices (mta/dsn/params.py limit_untrusted): ``headers`` returns headers only,
    ``off`` ignores NOTIFY=SUCCESS,DELAY, ``full`` takes RET and NOTIFY as given."""
    untrusted: str = "headers"


@dataclass(frozen=True)
class VirtualServer:
    name: str
    listen: tuple[ListenAddress, ...]
    limits: Limits = field(default_factory=Limits)
    relay: RelayConfig = field(default_factory=RelayConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    protocol_log: ProtocolLogConfig = field(default_factory=ProtocolLogConfig)
    dsn: DsnConfig = field(default_factory=DsnConfig)
    smart_host: str | None = None   # the virtual server's own smart host; a connector's overrides it
    odmr: bool = False              # an On-Demand Mail Relay listener (RFC 2645, port 366): ATRN only


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
class TriggerAuthorization:
    """Who may release a remote-triggered connector's mail (ETRN, ATRN): a client network or an
    authenticated account (etrn_dequeue plugin)."""
    network: IPNetwork | None = None
    account: str | None = None


@dataclass(frozen=True)
class DeliveryConfig:
    schedule: Schedule = field(default_factory=Schedule.always)
    remote_triggered: bool = False
    oversize: OversizeConfig = field(default_factory=OversizeConfig)
    timezone: str = "UTC"           # IANA zone the weekly grids are read in
    authorized: tuple[TriggerAuthorization, ...] = ()   # who may ETRN/ATRN (remote_triggered only)


# -- outbound connections of a connector (issue 4) --------------------------------------------------

@dataclass(frozen=True)
class OutboundAuth:
    username: str
    password: str = field(repr=False)
    mechanism: str = "PLAIN"        # PLAIN | LOGIN


@dataclass(frozen=True)
class OutboundConfig:
    tls: str = "opportunistic"      # none | opportunistic | required | verify
    ca_file: str | None = None      # PEM bundle for tls: verify; None: the system's trust store
    auth: OutboundAuth | None = None
    allow_plaintext_auth: bool = False
    helo: str = "ehlo"              # ehlo | helo
    port: int = 25                  # for MX hosts and smart hosts written without a port
    connect_timeout: float = 30.0
    mta_sts: bool = True            # honour the destination's MTA-STS policy (MX delivery only)
    dane: bool = True               # honour the next hop's DNSSEC-validated TLSA records (RFC 7672)


@dataclass(frozen=True)
class DeliveryRestrictions:
    default: str = "accept"                 # accept | reject
    exceptions: tuple[str, ...] = ()        # YAML key "except": addresses and "@domain" entries


@dataclass(frozen=True)
class EtrnRequest:
    """A connector's ``etrn`` section: ask the ISP's server to send the mail it holds for us."""
    server: str                             # "host", "host:port", "[IP]:port" (port: 25, ATRN 366)
    domains: tuple[str, ...]
    command: str = "ETRN"                   # ETRN | ATRN | a site command, e.g. "DEQUEUE {domain}"
    schedule: Schedule | None = None        # None: only at start-up (and `smtpgw etrn`)
    auth: OutboundAuth | None = None        # ATRN: the account at the ISP
    tls: str = "opportunistic"              # none | opportunistic | required (ATRN: required)
    allow_plaintext_auth: bool = False      # ATRN credentials without TLS (loopback tests only)
    helo: str | None = None                 # default: gateway.hostname
    run: tuple[str, ...] = ()               # a trigger program instead of SMTP (FINGER...): argv, {domain} {server}


@dataclass(frozen=True)
class Connector:
    name: str
    address_spaces: tuple[AddressSpace, ...] = (AddressSpace("*", 1),)
    smart_hosts: tuple[str, ...] = ()
    bridgeheads: tuple[str, ...] = ()
    content_restrictions: ContentRestrictions = field(default_factory=ContentRestrictions)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    delivery_restrictions: DeliveryRestrictions = field(default_factory=DeliveryRestrictions)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    max_connections: int = 1000             # Exchange's outbound connection limit
    max_connections_per_host: int = 100     # Exchange's "per domain" limit, applied per next-hop host
    etrn: "EtrnRequest | None" = None        # ask the ISP to dequeue our mail (etrn_dequeue plugin)
    protocol_log: ProtocolLogConfig = field(default_factory=ProtocolLogConfig)   # outbound W3C log
    extra: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)  # keys for later plugins


@dataclass(frozen=True)
class LocalHook:
    """A site's hook file (``plugins.local``) and its own settings, handed to it as ``settings`` in
    ``smtpgw_configure`` and ``smtpgw_reload`` (the plain path form has none)."""

    path: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PluginsConfig:
    enabled: tuple[str, ...] = ("relay_acl", "smart_host", "etrn_dequeue", "diag_logging")
    local: tuple[LocalHook, ...] = ()
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
