"""How one connector talks to its next hops: TLS mode, certificate checks, HELO or EHLO, AUTH, limits.

The deliverer builds an :class:`OutboundPolicy` from the connector (``connectors[].outbound`` and the
connection limits) and hands it to :meth:`mta.smtp.client.pool.SMTPClientPool.send` with every message. The
policy is part of the pool's key, so two connectors that reach the same host with different settings
never share a connection, and each connector's connections are counted against its own limits.

TLS modes (Postfix's ``smtp_tls_security_level`` words in brackets):

* ``none``: never STARTTLS.
* ``opportunistic`` [may]: STARTTLS when offered, no certificate check; if the handshake fails the
  host is tried again in plaintext (RFC 7435).
* ``required`` [encrypt]: no STARTTLS, no delivery -- the hop is unusable and the mail waits (4.7.10).
* ``verify`` [secure]: as ``required``, and the certificate must chain to ``ca_file`` (or the
  system's trust store) and name the host (service-identity: the smart-host or MX name, or the IP
  address of a ``[IP]`` smart host).

DANE (RFC 7672) is ``verify`` with the hop's TLSA records in ``tlsa``: the chain is matched against
them (:mod:`mta.smtp.client.dane`) instead of a CA store; :mod:`mta.delivery.dane` sets it per hop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mta.config import Connector, OutboundAuth
from mta.smtp import replies as R
from mta.smtp.reply import Reply

TLS_MODES = ("none", "opportunistic", "required", "verify")


@dataclass(frozen=True)
class OutboundPolicy:
    """Per-connector client options; hashable, as it is part of the client pool's key."""

    connector: str = ""                     # whose connections these are (limits, logs)
    tls: str = "opportunistic"
    ca_file: str | None = None
    auth: OutboundAuth | None = None
    allow_plaintext_auth: bool = False
    helo: str = "ehlo"                      # ehlo | helo
    connect_timeout: float | None = None    # None: the pool's default
    max_connections: int | None = None      # None: no limit for the connector as a whole
    max_connections_per_host: int | None = None   # None: the pool's default
    required_by: str = ""                   # who made TLS mandatory, when not the connector
                                            # (the destination's MTA-STS policy): named in replies
    ca_with_system: bool = False            # ca_file adds to the system trust store (gateway.mta_sts)
    validation: str = "verified"            # what tls: verify means in the mail log's tls=: verified
                                            # (the connector's), mta-sts (the destination's policy),
                                            # dane (the hop's TLSA records)
    tlsa: tuple = ()                        # DANE (mta.smtp.client.dane): the hop's usable TLSA records;
                                            # when set, they decide instead of ca_file and the name check
    dane_name: str = ""                     # the TLSA base domain (the MX host name): SNI, DANE-TA names
    dane_also: str = ""                     # a CNAME'd MX host: the name the base domain was not taken
                                            # from, also accepted in a DANE-TA certificate (RFC 7672 3.2.2)

    def __post_init__(self) -> None:
        if self.tls not in TLS_MODES:
            raise ValueError(f"unknown TLS mode {self.tls!r}")

    @classmethod
    def for_connector(cls, connector: Connector) -> "OutboundPolicy":
        out = connector.outbound
        return cls(connector=connector.name, tls=out.tls, ca_file=out.ca_file, auth=out.auth,
                   allow_plaintext_auth=out.allow_plaintext_auth, helo=out.helo,
                   connect_timeout=out.connect_timeout, max_connections=connector.max_connections,
                   max_connections_per_host=connector.max_connections_per_host)

    @property
    def tls_mandatory(self) -> bool:
        return self.tls in ("required", "verify")

    def label(self) -> str:
        if self.required_by:
            return self.required_by
        return f"connector '{self.connector}'" if self.connector else "this gateway"


def tls_label(policy: OutboundPolicy | None, encrypted: bool) -> str:
    """The mail log's ``tls=`` for a transaction: ``none`` in clear, ``opportunistic`` when nothing
    was checked, else what validated the certificate (``verified``, ``mta-sts``)."""
    if not encrypted:
        return "none"
    if policy is None or policy.tls != "verify":
        return "opportunistic"
    return policy.validation


# -- replies for hops that cannot be used under a policy (all temporary: the site's problem) -------

def no_starttls(policy: OutboundPolicy, hop: str) -> Reply:
    return R.tls_unavailable(f"TLS is required by {policy.label()} (tls: {policy.tls}) "
                             f"but {hop} does not offer STARTTLS")


def starttls_refused(policy: OutboundPolicy, hop: str, reply: Reply) -> Reply:
    return R.tls_unavailable(f"TLS is required by {policy.label()} but {hop} refused STARTTLS: {reply}")


def tls_failed(policy: OutboundPolicy, hop: str, why: str) -> Reply:
    if policy.tlsa:
        return R.tls_check_failed(f"DANE check with {hop} failed ({why}); {policy.label()} require a "
                                  "certificate matching one of them")
    check = "certificate verification" if policy.tls == "verify" else "TLS handshake"
    if "Mismatch" in why:                       # service-identity's DNSMismatch / IPAddressMismatch
        why = f"the certificate does not name the host; {why}"
    elif "certificate verify failed" in why:
        trusted = f"ca_file {policy.ca_file}" if policy.ca_file else "the system trust store"
        why = f"the certificate does not chain to {trusted}; {why}"
    return R.tls_check_failed(f"{check} with {hop} failed ({why}); {policy.label()} requires tls: {policy.tls}")


NO_STARTTLS = "starttls-not-supported"     # RFC 8460 4.3.1 result types, for TLS reporting


def tls_failure_type(why: str) -> str:
    """RFC 8460's result type for a failed handshake or certificate check, from OpenSSL's and
    service-identity's words."""
    low = why.lower()
    if "mismatch" in low:
        return "certificate-host-mismatch"
    if "expired" in low:
        return "certificate-expired"
    if "verify failed" in low or "self-signed" in low or "self signed" in low or "issuer" in low:
        return "certificate-not-trusted"
    return "validation-failure"


def auth_needs_tls(policy: OutboundPolicy, hop: str) -> Reply:
    return R.credentials_withheld(f"not sending credentials of {policy.label()} to {hop} without TLS "
                                  "(set outbound.allow_plaintext_auth to allow it)")


def auth_not_offered(policy: OutboundPolicy, hop: str, mechanism: str, offered: str) -> Reply:
    what = f"offers only AUTH {offered}" if offered else "does not offer AUTH"
    return R.auth_mechanism_unavailable(f"{policy.label()} authenticates with {mechanism} but {hop} {what}")


def auth_failed(policy: OutboundPolicy, hop: str, reply: Reply) -> Reply:
    """A refused login defers (never bounces): wrong credentials are the site's problem, as with
    Postfix's default ``smtp_sasl_auth_soft_bounce``."""
    return R.auth_refused(f"authentication of {policy.label()} to {hop} failed: {reply}")


# -- TLS contexts ----------------------------------------------------------------------------------

def _pem_blocks(data: bytes) -> list[bytes]:
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    blocks, pos = [], 0
    while True:
        start = data.find(begin, pos)
        if start < 0:
            return blocks
        stop = data.find(end, start)
        if stop < 0:
            return blocks
        blocks.append(data[start:stop + len(end)] + b"\n")
        pos = stop + len(end)


def load_trust_root(ca_file: str | None, with_system: bool = False) -> Any:
    """The trust root for ``tls: verify``: every certificate in the PEM file (with ``with_system``,
    added to the platform's store), or the platform's.

    Read once per file by the pool (a small local file), not per connection.
    """
    from twisted.internet import ssl
    if ca_file is None:
        return ssl.platformTrust()
    with open(ca_file, "rb") as f:
        blocks = _pem_blocks(f.read())
    if not blocks:
        raise ValueError(f"no PEM certificate in {ca_file}")
    root = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(b) for b in blocks])
    if with_system:         # Twisted offers the platform's store or given CAs, not both
        root.__class__ = _system_plus(type(root))
    return root


_SYSTEM_PLUS: dict[type, type] = {}


def _system_plus(base: type) -> type:
    """A subclass of Twisted's given-CAs trust root that also loads the platform's store."""
    cls = _SYSTEM_PLUS.get(base)
    if cls is None:
        class SystemPlus(base):  # type: ignore[misc, valid-type]
            def _addCACertsToContext(self, context: Any) -> None:
                context.set_default_verify_paths()
                super()._addCACertsToContext(context)
        cls = _SYSTEM_PLUS[base] = SystemPlus
    return cls


def verifying_options(hostname: str, trust_root: Any) -> Any:
    """Client TLS options that check the chain and, with service-identity, that it names ``hostname``."""
    from twisted.internet import ssl
    return ssl.optionsForClientTLS(hostname, trustRoot=trust_root)


__all__ = ["NO_STARTTLS", "OutboundPolicy", "TLS_MODES", "tls_failure_type", "load_trust_root", "verifying_options"]
