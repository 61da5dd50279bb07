"""DANE for SMTP (RFC 7672) on the client side: matching the certificate chain a next hop presents
against the TLSA records of its MX name, and the TLS options that do it during the handshake.

Which records count (RFC 7672 3.1, RFC 7671 5):

* DANE-EE (usage 3): the server's own certificate (selector 0) or public key (selector 1), exact
  (matching 0) or by SHA-256 (1) / SHA-512 (2) digest. Names and expiry dates are not checked: the
  DNSSEC-signed record is the trust.
* DANE-TA (usage 2): a certificate in the chain the server presents (its issuer, or a CA above it)
  matches the record; the chain from the server's certificate up to it must verify (signatures and
  validity dates), and the server's certificate must name the TLSA base domain (the MX host name,
  or with a CNAME'd MX host the expanded name; either is accepted, RFC 7672 3.2.2). A ``2 0 0``
  record holds the whole trust-anchor certificate: a server that does not send it (RFC 7672 3.1.2
  lets it leave the anchor out) is checked against the certificate from the record.
* PKIX-TA / PKIX-EE (usages 0 and 1) are unusable for SMTP (RFC 7672 3.1.3), as are unknown
  selectors and matching types and digests of the wrong length.

The lookups that decide whether a hop has usable records live in :mod:`mta.delivery.dane`; this
module only sees records already known to be DNSSEC-validated.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.python.failure import Failure
from zope.interface import implementer

PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
CERT, SPKI = 0, 1
FULL, SHA256, SHA512 = 0, 1, 2
_DIGEST_SIZES = {SHA256: 32, SHA512: 64}


@dataclass(frozen=True)
class TLSA:
    """One TLSA record (RFC 6698 2.1): certificate usage, selector, matching type, association data."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """Usable for SMTP (RFC 7672 3.1): DANE-TA or DANE-EE, a known selector and matching type,
        a digest of the right length."""
        if self.usage not in (DANE_TA, DANE_EE) or self.selector not in (CERT, SPKI):
            return False
        if self.mtype == FULL:
            return bool(self.data)
        return len(self.data) == _DIGEST_SIZES.get(self.mtype, -1)

    def __str__(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    def matches(self, cert: x509.Certificate) -> bool:
        """Whether ``cert`` (its DER, or its public key's SubjectPublicKeyInfo) is what this names."""
        if self.selector == CERT:
            raw = cert.public_bytes(Encoding.DER)
        else:
            raw = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if self.mtype == SHA256:
            raw = hashlib.sha256(raw).digest()
        elif self.mtype == SHA512:
            raw = hashlib.sha512(raw).digest()
        return raw == self.data


def usable(records: Iterable[TLSA]) -> tuple[TLSA, ...]:
    return tuple(r for r in records if r.usable)


class DaneMismatch(Exception):
    """The chain the next hop presented matches none of its usable TLSA records."""


def check_chain(chain: Sequence[x509.Certificate], records: Sequence[TLSA], name: str,
                also: Sequence[str] = ()) -> str | None:
    """None when ``chain`` (the server's certificate first) satisfies one of ``records`` for the TLSA
    base domain ``name`` (DANE-TA: the certificate may name ``name`` or one of ``also``); otherwise
    why not, for the reply that defers the mail."""
    if not chain:
        return "the server presented no certificate"
    leaf = chain[0]
    names = (name, *[n for n in also if n and n != name])
    tried: list[str] = []
    for record in records:
        if record.usage == DANE_EE and record.matches(leaf):
            return None
    ta_records = [r for r in records if r.usage == DANE_TA]
    if ta_records:
        for depth, cert in enumerate(chain[1:], 1):
            if any(r.matches(cert) for r in ta_records):
                why = _verify_to_anchor(chain[:depth], cert, names)
                if why is None:
                    return None
                tried.append(why)
        for anchor in _anchors_in_records(ta_records):     # 2 0 0: the anchor need not be sent
            if any(c.public_bytes(Encoding.DER) == anchor.public_bytes(Encoding.DER) for c in chain):
                continue                                    # sent after all: checked above
            why = _verify_to_anchor(chain, anchor, names)
            if why is None:
                return None
            tried.append(why)
    kinds = sorted({f"{r.usage} {r.selector} {r.mtype}" for r in records})
    found = f" ({'; '.join(tried)})" if tried else ""
    return (f"DANE: no TLSA record of {name} ({', '.join(kinds)}) matches the certificate chain the server "
            f"presented{found}")


def _anchors_in_records(records: Iterable[TLSA]) -> list[x509.Certificate]:
    """The trust-anchor certificates that ``2 0 0`` records carry whole (unparseable data: none)."""
    found = []
    for record in records:
        if record.usage == DANE_TA and record.selector == CERT and record.mtype == FULL:
            try:
                found.append(x509.load_der_x509_certificate(record.data))
            except ValueError:
                continue
    return found


def _verify_to_anchor(below: Sequence[x509.Certificate], anchor: x509.Certificate,
                      names: Sequence[str]) -> str | None:
    """DANE-TA: ``below`` (server certificate first) chains up to ``anchor`` and names one of ``names``."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(anchor))
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)      # the anchor need not be self-signed
    context = crypto.X509StoreContext(store, crypto.X509.from_cryptography(below[0]),
                                      [crypto.X509.from_cryptography(c) for c in below[1:]])
    try:
        context.verify_certificate()
    except crypto.X509StoreContextError as e:
        return f"the chain to the DANE-TA certificate does not verify: {e}"
    problems = []
    for name in names:
        try:
            verify_certificate_hostname(below[0], name)
            return None
        except (VerificationError, ValueError) as e:
            problems.append(str(e))
    return f"the certificate does not name {' or '.join(names)}: {problems[0]}"


@implementer(IOpenSSLClientConnectionCreator)
class DaneOptions:
    """Client TLS options for a DANE-secured hop: SNI with the TLSA base domain, no PKIX check, and
    once the handshake is done the chain is matched against the records; a mismatch aborts the
    connection with :class:`DaneMismatch`, which the pool reports as the reason the hop was unusable.

    The digests are of a few kilobytes of certificates: cheap enough for the reactor thread, as the
    handshake itself is."""

    def __init__(self, records: Sequence[TLSA], name: str, also: Sequence[str] = ()) -> None:
        self.records = tuple(records)
        self.name = name
        self.also = tuple(also)
        self._context = ssl.CertificateOptions().getContext()
        self._context.set_info_callback(self._info)

    def clientConnectionForTLS(self, tls_protocol: Any) -> Any:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tls_protocol)
        connection.set_tlsext_host_name(self.name.encode("idna"))
        connection.set_connect_state()
        return connection

    def _info(self, connection: Any, where: int, ret: int) -> None:
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        try:
            chain = connection.get_peer_cert_chain(as_cryptography=True) or []
            why = check_chain(chain, self.records, self.name, self.also)
        except Exception as e:                  # a certificate we cannot parse matches nothing
            why = f"DANE: the server's certificate chain cannot be checked: {e}"
        if why is not None:
            connection.get_app_data().failVerification(Failure(DaneMismatch(why)))


__all__ = ["DANE_EE", "DANE_TA", "DaneMismatch", "DaneOptions", "TLSA", "check_chain", "usable"]
