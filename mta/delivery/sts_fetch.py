"""Fetching an MTA-STS policy file over HTTPS with Twisted's own web client, within RFC 8461's limits.

``https://mta-sts.<domain>/.well-known/mta-sts.txt`` is fetched with :class:`twisted.web.client.Agent`:

* the policy host is resolved through the gateway's resolver (``gateway.dns.nameservers``), as every
  name delivery uses, not the system's;
* the certificate must chain to ``gateway.mta_sts.ca_file`` plus the system store (or the system
  store alone) and name the policy host (service-identity);
* only a ``200`` with ``text/plain`` is a policy: redirects are not followed (RFC 8461 3.3);
* the body is cut at 64 KB, and the whole fetch (connect, handshake, headers, body) has a deadline.

Every failure is a :class:`FetchError` whose text says what went wrong, for the log and ``dns-check``,
and whose ``kind`` is its RFC 8460 result type for TLS reporting: ``sts-webpki-invalid`` (the policy
host's certificate did not verify), ``sts-policy-invalid`` (an answer that is no policy file: not
``text/plain``, too big, not UTF-8) or ``sts-policy-fetch-error`` (anything else: no address, no
connection, an HTTP error, a timeout).
"""
from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mta.delivery.nexthops import DNSError, Resolver
from mta.smtp.client.policy import load_trust_root, verifying_options

MAX_POLICY_BYTES = 64 * 1024        # RFC 8461 3.3: senders may refuse larger policies
FETCH_TIMEOUT = 60.0                # RFC 8461 3.3 suggests at least a minute for the whole fetch
CONNECT_TIMEOUT = 20.0
USER_AGENT = b"smtpgw MTA-STS"


FETCH_ERROR, POLICY_INVALID, WEBPKI_INVALID = "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"


class FetchError(Exception):
    """The policy could not be fetched; the text is the reason, ``kind`` its RFC 8460 result type."""

    def __init__(self, text: str, kind: str = FETCH_ERROR) -> None:
        super().__init__(text)
        self.kind = kind


def policy_url(domain: str) -> str:
    return f"https://mta-sts.{domain}/.well-known/mta-sts.txt"


@implementer(IStreamClientEndpoint)
class _ResolvedTLSEndpoint:
    """TLS to a host name looked up through the gateway's resolver, each address in turn."""

    def __init__(self, reactor: Any, resolver: Resolver, host: str, port: int, options: Any,
                 timeout: float) -> None:
        self.reactor, self.resolver, self.host, self.port = reactor, resolver, host, port
        self.options, self.timeout = options, timeout

    def connect(self, factory: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._connect(factory))

    async def _connect(self, factory: Any) -> Any:
        try:
            hops = await self.resolver.address_hops(self.host, self.port)
        except DNSError as e:
            raise FetchError(f"{self.host}: {e.reply.text}") from None
        last: Exception | None = None
        for hop in hops:
            cls = TCP6ClientEndpoint if ":" in hop.host else TCP4ClientEndpoint
            tcp = cls(self.reactor, hop.host, self.port, timeout=self.timeout)
            try:
                return await wrapClientTLS(self.options, tcp).connect(factory)
            except Exception as e:          # refused, unreachable: the next address
                last = e
        raise FetchError(f"cannot connect to {self.host}:{self.port}: {last}")


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """An Agent's endpoints: TLS to hosts found through the gateway's resolver, the certificate
    checked against ``fetcher.trust_root()``."""

    def __init__(self, fetcher: "VerifiedHttpsClient") -> None:
        self.fetcher = fetcher

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        options = verifying_options(host, self.fetcher.trust_root())
        return _ResolvedTLSEndpoint(self.fetcher.reactor, self.fetcher.resolver, host, uri.port, options,
                                    self.fetcher.connect_timeout)


class _Body(Protocol):
    """Collects a response body up to the cap; beyond it the connection is dropped."""

    def __init__(self, done: defer.Deferred, limit: int) -> None:
        self.done, self.limit, self.data = done, limit, bytearray()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.data += data
        if len(self.data) > self.limit:
            self.done.errback(FetchError(f"policy larger than {self.limit // 1024} KB", POLICY_INVALID))
            self.transport.stopProducing()

    def connectionLost(self, reason: Any) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(bytes(self.data))
        else:
            self.done.errback(FetchError(f"connection lost while reading the policy: "
                                         f"{reason.getErrorMessage()}"))


class VerifiedHttpsClient:
    """An Agent for HTTPS to hosts found through the gateway's resolver, certificates checked against
    ``ca_file`` plus the system store: the MTA-STS policy fetch, the TLS-RPT report POST."""

    def __init__(self, reactor: Any, resolver: Resolver, ca_file: str | None, timeout: float,
                 connect_timeout: float) -> None:
        self.reactor, self.resolver, self.ca_file = reactor, resolver, ca_file
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self._trust_root: Any = None
        self._agent = Agent.usingEndpointFactory(reactor, _EndpointFactory(self))

    def set_ca_file(self, ca_file: str | None) -> None:
        """A new ``gateway.mta_sts.ca_file`` (SIGHUP): read at the next request, as is the same path's
        new content. Connections already open keep the trust they were made with."""
        self.ca_file, self._trust_root = ca_file, None

    def trust_root(self) -> Any:
        """``ca_file`` plus the system store, read at the first request (a small local file)."""
        if self._trust_root is None:
            self._trust_root = load_trust_root(self.ca_file, with_system=True)
        return self._trust_root


class PolicyFetcher(VerifiedHttpsClient):
    """One per gateway: fetches policy files (never blocking the reactor)."""

    def __init__(self, reactor: Any, resolver: Resolver, ca_file: str | None = None,
                 timeout: float = FETCH_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT,
                 port: int = 443) -> None:
        super().__init__(reactor, resolver, ca_file, timeout, connect_timeout)
        self.port = port

    def fetch(self, domain: str) -> defer.Deferred:
        """The policy text of ``domain``; fails with :class:`FetchError`."""
        d = defer.Deferred.fromCoroutine(self._fetch(domain))
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=self._timed_out)
        return d

    def _timed_out(self, result: Any, timeout: float) -> Failure:
        return Failure(FetchError(f"no policy within {timeout:g}s"))

    async def _fetch(self, domain: str) -> str:
        url = policy_url(domain)
        if self.port != 443:
            url = url.replace(f"mta-sts.{domain}/", f"mta-sts.{domain}:{self.port}/")
        try:
            response = await self._agent.request(b"GET", url.encode("ascii"),
                                                 Headers({b"User-Agent": [USER_AGENT]}))
        except FetchError:
            raise
        except defer.CancelledError:
            raise
        except Exception as e:
            raise FetchError(f"{url}: {agent_error(e)}", WEBPKI_INVALID if certificate_failure(e) else FETCH_ERROR) \
                from None
        if response.code != 200:
            response.deliverBody(Discard())
            moved = " (redirects are not followed)" if 300 <= response.code < 400 else ""
            raise FetchError(f"{url}: HTTP {response.code}{moved}")
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if kind.split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(Discard())
            raise FetchError(f"{url}: content type {kind.decode('latin-1')!r}, not text/plain", POLICY_INVALID)
        if isinstance(response.length, int) and response.length > MAX_POLICY_BYTES:
            response.deliverBody(Discard())
            raise FetchError(f"{url}: policy larger than {MAX_POLICY_BYTES // 1024} KB", POLICY_INVALID)
        done: defer.Deferred = defer.Deferred()
        response.deliverBody(_Body(done, MAX_POLICY_BYTES))
        body = await done
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            raise FetchError(f"{url}: policy is not UTF-8", POLICY_INVALID) from None


class Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.stopProducing()


def certificate_failure(e: BaseException) -> bool:
    """Whether an Agent failure was the server's certificate not verifying (OpenSSL's verify error,
    or service-identity's name check), wrapped as deep as the Agent wraps it."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        return any(certificate_failure(r.value if hasattr(r, "value") else r) for r in reasons)
    if isinstance(e, (SSL.Error, VerificationError)):
        return True
    text = str(e)
    return "certificate verify failed" in text or "VerificationError" in text


def agent_error(e: BaseException) -> str:
    """Agent failures wrap the real reason (ResponseNeverReceived([Failure]), ...)."""
    reasons = getattr(e, "reasons", None)
    if reasons:
        inner = reasons[0]
        return agent_error(inner.value) if hasattr(inner, "value") else str(inner)
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:200]


__all__ = ["Discard", "FETCH_ERROR", "FetchError", "POLICY_INVALID", "WEBPKI_INVALID", "certificate_failure", "MAX_POLICY_BYTES", "PolicyFetcher", "VerifiedHttpsClient", "agent_error",
           "policy_url"]
