"""Next hops from DNS: MX records (RFC 5321 5.1), implicit MX, null MX (RFC 7505), with a TTL cache.

dnspython's blocking resolver runs in a small thread pool of its own, one query per call, so the
reactor thread never waits on the network, and a DNS outage (every lookup waiting for its timeout)
cannot take the threads the spool's fsyncs and Maildir writes run in.  The cache and the coalescing
of identical in-flight queries live in the reactor thread, so neither needs a lock.

Queries ask for the AD bit (RFC 6840 5.7); an answer's ``secure`` says it came with it from servers
trusted to validate (``gateway.dns.nameservers``, or the system's with ``options trust-ad``), and hops
carry it (``Hop.dnssec``) so DANE (:mod:`mta.delivery.dane`) knows whose TLSA records may count.

Failures are sorted the way delivery needs them: :class:`PermanentDNSError` (the domain does not
exist or takes no mail: bounce) and :class:`TemporaryDNSError` (timeouts, SERVFAIL, unreachable
servers, no MX host resolves: retry later).
"""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from mta.model.nexthop import Hop
from mta.smtp import replies as R
from mta.smtp.reply import Reply

MAX_TTL = 3600.0          # never trust an answer longer than this
NEGATIVE_TTL = 60.0       # NXDOMAIN / NODATA are kept at most this long (a new domain shows up soon)
MAX_CACHE_ENTRIES = 20000
MAX_THREADS = 10          # concurrent lookups; more wait their turn

__all__ = ["Hop", "PermanentDNSError", "TemporaryDNSError", "Resolver", "dns_resolver", "ip_literal"]


class DNSError(Exception):
    """A lookup that gave no hops; ``reply`` is what the recipients get."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class PermanentDNSError(DNSError):
    """The domain cannot receive mail (NXDOMAIN, null MX, no MX and no address): bounce."""


class TemporaryDNSError(DNSError):
    """DNS could not answer now (timeout, SERVFAIL, no server reachable, no MX host resolves): retry."""


def _temporary(what: str) -> TemporaryDNSError:
    return TemporaryDNSError(R.dns_failed(what))


def ip_literal(name: str) -> str | None:
    """The address in an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``), else None."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
        try:
            return str(ipaddress.IPv6Address(inner))
        except ValueError:
            return None
    try:
        return str(ipaddress.IPv4Address(inner))
    except ValueError:
        return None


def _bare_ip(name: str) -> str | None:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return None


@dataclass(frozen=True)
class _Answer:
    """One cached lookup result: ``kind`` is ok, nxdomain or nodata; ``values`` the records;
    ``secure``: the answer came with the AD bit from a resolver we trust to validate (DNSSEC)."""

    kind: str
    values: tuple = ()
    ttl: float = 0.0
    secure: bool = False
    canonical: str = ""         # the owner the answer's records have, when a CNAME chain led there


def _authenticated(response: Any) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _failure_response(exc: dns.exception.DNSException) -> Any:
    """The response an NXDOMAIN or NoAnswer came in, for its AD bit (None if dnspython kept none)."""
    try:
        if isinstance(exc, dns.resolver.NXDOMAIN):
            return next(iter(exc.responses().values()), None)
        return exc.response()
    except Exception:
        return None


def system_trusts_ad(path: str = "/etc/resolv.conf") -> bool:
    """Whether the system's resolv.conf says ``options trust-ad``: as glibc does, the AD bit of the
    system's name servers is believed only when the administrator says they validate."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(line.split()[:1] == ["options"] and "trust-ad" in line.split()[1:] for line in f)
    except OSError:
        return False


def _negative_ttl(exc: dns.exception.DNSException, cap: float) -> float:
    """The SOA's negative TTL (RFC 2308) when the server sent one, capped; else the cap."""
    try:
        responses = exc.responses().values() if isinstance(exc, dns.resolver.NXDOMAIN) else [exc.response()]
    except Exception:
        return cap
    for response in responses:
        for rrset in getattr(response, "authority", []):
            if rrset.rdtype == dns.rdatatype.SOA:
                return min(cap, rrset.ttl, rrset[0].minimum)
    return cap


def dns_resolver(nameservers: Sequence[tuple[str, int]], timeout: float) -> dns.resolver.Resolver:
    """A blocking dnspython resolver asking ``gateway.dns.nameservers`` (``(ip, port)`` pairs; empty:
    the system's), ``timeout`` seconds for a whole lookup. Shared by delivery and by the plugins whose
    libraries need a blocking lookup function (sender_auth's SPF and DKIM), so that every query goes
    to the configured servers."""
    if nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(ip, int(port)) for ip, port in nameservers]
    else:
        resolver = dns.resolver.Resolver(configure=True)
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 2.0)       # per try; several tries fit in the lifetime
    return resolver


class Resolver:
    """MX / address lookups for delivery; one per gateway, shared by every delivery.

    :param nameservers: ``(ip, port)`` pairs; empty uses the system resolver (/etc/resolv.conf).
    :param timeout: the whole lookup's lifetime in seconds, retries included.
    :param rng: orders equal MX preferences (inject a seeded ``random.Random`` in tests).
    :param local_names: this gateway's own host names: MX records at or below our own preference are
        dropped (RFC 5321 5.1), and a domain whose best MX is us is a loop.
    :param clock: cache time source; defaults to ``reactor.seconds``.

    Lookups need a running reactor (results come back through ``callFromThread``); the thread pool
    starts with the first lookup and stops at reactor shutdown or :meth:`close`.
    """

    def __init__(self, nameservers: Sequence[tuple[str, int]] = (), timeout: float = 5.0,
                 reactor: Any = None, rng: random.Random | None = None, *,
                 local_names: Iterable[str] = (), clock: Callable[[], float] | None = None,
                 max_ttl: float = MAX_TTL, negative_ttl: float = NEGATIVE_TTL) -> None:
        self._reactor = reactor
        self.timeout = float(timeout)
        self.rng = rng or random.Random()
        self.local_names = {n.lower().rstrip(".") for n in local_names}
        self._clock = clock
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._dns = dns_resolver(nameservers, self.timeout)
        # DNSSEC: ask for the AD bit (RFC 6840 5.7) and believe it from the configured servers (they
        # must be a validating resolver the gateway trusts), or from the system's with trust-ad
        self._dns.flags = dns.flags.RD | dns.flags.AD
        self.trust_ad = bool(nameservers) or system_trusts_ad()
        self._cache: dict[tuple[str, str], tuple[float, _Answer]] = {}
        self._inflight: dict[tuple[str, str], list[defer.Deferred]] = {}
        self._threadpool: Any = None
        self._shutdown_trigger: Any = None
        self.hits = 0       # cache hits, for tests and diagnostics
        self.queries = 0    # queries sent to a server

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def _now(self) -> float:
        return self._clock() if self._clock is not None else self.reactor.seconds()

    def clear_cache(self) -> None:
        self._cache.clear()

    def _pool(self) -> Any:
        if self._threadpool is None:
            from twisted.python.threadpool import ThreadPool
            pool = ThreadPool(minthreads=0, maxthreads=MAX_THREADS, name="smtpgw-dns")
            pool.start()
            self._threadpool = pool
            self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self.close)
        return self._threadpool

    def close(self) -> None:
        """Stop the lookup threads (waits for running lookups, at most ``timeout``); idempotent."""
        pool, self._threadpool = self._threadpool, None
        if pool is None:
            return
        if self._shutdown_trigger is not None:
            try:
                self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            except (ValueError, KeyError):
                pass                    # we are running as that trigger
            self._shutdown_trigger = None
        pool.stop()

    def _query_sync(self, name: str, rdtype: str) -> _Answer:
        """Runs in a pool thread: one blocking lookup, errors sorted into kinds."""
        try:
            answer = self._dns.resolve(dns.name.from_text(name), rdtype, search=False,
                                       raise_on_no_answer=True, lifetime=self.timeout)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer) as e:
            kind = "nxdomain" if isinstance(e, dns.resolver.NXDOMAIN) else "nodata"
            return _Answer(kind, (), _negative_ttl(e, self.negative_ttl),
                           self.trust_ad and _authenticated(_failure_response(e)))
        except dns.resolver.LifetimeTimeout:
            raise _temporary(f"{name} {rdtype}: timed out after {self.timeout:g}s") from None
        except dns.resolver.NoNameservers:
            raise _temporary(f"{name} {rdtype}: no name server answered (SERVFAIL or refused)") from None
        except dns.exception.DNSException as e:
            raise _temporary(f"{name} {rdtype}: {e.__class__.__name__}") from None
        ttl = min([rrset.ttl for rrset in answer.response.answer] or [0])
        if rdtype == "MX":
            values = tuple((r.preference, r.exchange.to_text(omit_final_dot=True).lower()) for r in answer)
        elif rdtype == "TXT":       # one string per record, its character-strings joined (RFC 7208 3.3)
            values = tuple(b"".join(r.strings).decode("utf-8", "replace") for r in answer)
        elif rdtype == "TLSA":
            values = tuple((r.usage, r.selector, r.mtype, bytes(r.cert)) for r in answer)
        else:
            values = tuple(r.address for r in answer)
        canonical = answer.canonical_name.to_text(omit_final_dot=True).lower()
        return _Answer("ok", values, min(float(ttl), self.max_ttl), self.trust_ad and _authenticated(answer.response),
                       canonical if canonical != name.lower().rstrip(".") else "")

    def _lookup(self, name: str, rdtype: str) -> defer.Deferred:
        """A cached, coalesced lookup; fires with an :class:`_Answer` or fails with TemporaryDNSError."""
        key = (name, rdtype)
        now = self._now()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                self.hits += 1
                return defer.succeed(cached[1])
            del self._cache[key]
        waiting = self._inflight.get(key)
        d: defer.Deferred = defer.Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._inflight[key] = [d]
        self.queries += 1
        q = deferToThreadPool(self.reactor, self._pool(), self._query_sync, name, rdtype)
        q.addBoth(self._answered, key)
        return d

    def _answered(self, result: Any, key: tuple[str, str]) -> None:
        if isinstance(result, _Answer) and result.ttl > 0:
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._evict()
            self._cache[key] = (self._now() + result.ttl, result)
        for d in self._inflight.pop(key, []):
            if isinstance(result, _Answer):
                d.callback(result)
            else:
                d.errback(result)

    def _evict(self) -> None:
        now = self._now()
        for k in [k for k, (exp, _) in self._cache.items() if exp <= now]:
            del self._cache[k]
        while len(self._cache) >= MAX_CACHE_ENTRIES:
            del self._cache[next(iter(self._cache))]

    # -- addresses --------------------------------------------------------------------------

    async def _addresses(self, host: str, port: int, preference: int, label: str,
                         secure: bool = True) -> tuple[list[Hop], TemporaryDNSError | None]:
        """A then AAAA of ``host`` as hops; a temporary failure is returned only if nothing resolved.
        A hop is ``dnssec`` when its address answer was validated and ``secure`` (the MX answer that
        named the host was)."""
        a, aaaa = await defer.DeferredList([self._lookup(host, "A"), self._lookup(host, "AAAA")],
                                           consumeErrors=True)
        hops: list[Hop] = []
        error: TemporaryDNSError | None = None
        for ok, result in (a, aaaa):
            if not ok:
                error = error or (result.value if isinstance(result.value, TemporaryDNSError)
                                  else _temporary(f"{host}: {result.value!r}"))
            elif result.kind == "ok":
                hops += [Hop(ip, port, label, preference, secure and result.secure, result.canonical)
                         for ip in result.values]
        return hops, (None if hops else error)

    def address_hops(self, name: str, port: int = 25, preference: int = 0) -> defer.Deferred:
        """Hops for a host name (A then AAAA, no MX): smart hosts, ``[IP]`` literals.

        Fails with :class:`TemporaryDNSError` when the name has no address: a smart host that does
        not resolve is the site's configuration problem, not the recipient's, so mail waits.
        """
        return defer.Deferred.fromCoroutine(self._address_hops(name, port, preference))

    async def _address_hops(self, name: str, port: int, preference: int) -> list[Hop]:
        host = name.strip().lower().rstrip(".")
        ip = ip_literal(host) or _bare_ip(host)
        if ip is not None:
            return [Hop(ip, port, ip, preference)]
        self._check_name(host, temporary=True)
        hops, error = await self._addresses(host, port, preference, host)
        if hops:
            return hops
        raise error or _temporary(f"{host}: no A or AAAA record")

    def tlsa(self, name: str) -> defer.Deferred:
        """The TLSA records of ``name`` (``_25._tcp.mx.example``) as ``(usage, selector, mtype, data)``
        tuples, and whether the answer was DNSSEC-validated: ``(records, secure)``; no records for
        NXDOMAIN or NODATA; fails with :class:`TemporaryDNSError` (SERVFAIL -- a validating resolver's
        answer to a bogus signature -- or a timeout)."""
        d = self._lookup(name.strip().lower().rstrip("."), "TLSA")
        d.addCallback(lambda answer: (list(answer.values) if answer.kind == "ok" else [], answer.secure))
        return d

    def txt(self, name: str) -> defer.Deferred:
        """The TXT records of ``name`` (each record's strings joined), cached like any answer; an
        empty list when there are none (NXDOMAIN, NODATA); fails with :class:`TemporaryDNSError`."""
        d = self._lookup(name.strip().lower().rstrip("."), "TXT")
        d.addCallback(lambda answer: list(answer.values) if answer.kind == "ok" else [])
        return d

    # -- MX -----------------------------------------------------------------------------------

    def _check_name(self, name: str, temporary: bool = False) -> None:
        try:
            dns.name.from_text(name)
            ok = bool(name)
        except (dns.exception.DNSException, UnicodeError, ValueError):
            ok = False
        if not ok:
            if temporary:
                raise _temporary(f"{name!r}: not a valid host name")
            raise PermanentDNSError(R.bad_destination(f"bad destination domain {name!r}"))

    def _order(self, records: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """Lowest preference first; equal preferences in random order (RFC 5321 5.1) to spread load."""
        by_pref: dict[int, list[str]] = {}
        for pref, host in records:
            if host not in by_pref.setdefault(pref, []):
                by_pref[pref].append(host)
        ordered = []
        for pref in sorted(by_pref):
            hosts = by_pref[pref]
            self.rng.shuffle(hosts)
            ordered += [(pref, h) for h in hosts]
        return ordered

    def mx_hops(self, domain: str, port: int = 25) -> defer.Deferred:
        """Every address to try for ``domain``, best first; fails with Permanent/TemporaryDNSError."""
        return defer.Deferred.fromCoroutine(self._mx_hops(domain, port))

    async def _mx_hops(self, domain: str, port: int) -> list[Hop]:
        name = domain.strip().lower().rstrip(".")
        literal = ip_literal(name)
        if literal is not None:
            return [Hop(literal, port, literal, 0)]
        if name.startswith("["):
            raise PermanentDNSError(R.bad_destination(f"bad address literal {domain!r}"))
        self._check_name(name)
        answer = await self._lookup(name, "MX")
        if answer.kind == "nxdomain":
            raise PermanentDNSError(R.bad_destination(f"domain not found: {name}"))
        if answer.kind == "nodata":
            # implicit MX: the domain itself, preference 0 (RFC 5321 5.1)
            hops, error = await self._addresses(name, port, 0, name, answer.secure)
            if hops:
                return hops
            if error is not None:
                raise error
            raise PermanentDNSError(R.bad_destination(f"domain has no MX or address records: {name}"))
        records = list(answer.values)
        secure = answer.secure
        real = [(p, h) for p, h in records if h not in ("", ".")]
        if not real:
            raise PermanentDNSError(R.null_mx(name))
        mine = [p for p, h in real if h in self.local_names]
        if mine:
            real = [(p, h) for p, h in real if p < min(mine)]
            if not real:
                raise PermanentDNSError(R.loops_back(name))
        ordered = self._order(real)
        found = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self._addresses(h, port, p, h, secure)) for p, h in ordered],
            consumeErrors=True)
        hops: list[Hop] = []
        seen: set[tuple[str, int]] = set()
        errors: list[str] = []
        for (pref, host), (ok, result) in zip(ordered, found):
            if not ok:
                errors.append(f"{host}: {result.value}")
                continue
            host_hops, error = result
            if error is not None:
                errors.append(str(error.reply.text))
            for hop in host_hops:
                if (hop.host, hop.port) not in seen:
                    seen.add((hop.host, hop.port))
                    hops.append(hop)
        if not hops:
            why = "; ".join(errors) if errors else "no MX host has an address"
            raise _temporary(f"{name}: {why}")
        return hops
