"""Which MTA-STS policy (RFC 8461) is in force for a destination domain, from DNS, HTTPS and the cache.

:meth:`MtaSts.policy` follows RFC 8461 5.1 (policy application and refresh):

1. the cached policy (memory, else the durable cache under ``<spool>/mta-sts``), if not expired;
2. the ``_mta-sts.<domain>`` TXT record through the gateway's resolver: its ``id`` equal to the
   cached policy's means the cached one still holds;
3. a new or changed id: the policy is fetched over HTTPS (:mod:`mta.delivery.sts_fetch`), cached for
   its ``max_age`` and used;
4. any failure on the way (no TXT answer, a broken record, the fetch failing, a malformed policy)
   keeps the cached policy in force; with none cached, the domain has no policy (deliver as before).

A failed fetch is not repeated for the same id for :data:`RETRY_FAILED` seconds, so a queue full of
mail for a domain whose policy host is down does not fetch once per message. Lookups for one domain
that overlap share one fetch.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.delivery.nexthops import DNSError, Resolver
from mta.delivery.sts_cache import CachedPolicy, PolicyCache
from mta.delivery.sts_fetch import FetchError, PolicyFetcher, policy_url
from mta.delivery.sts_policy import Policy, PolicyError, parse_policy, policy_id

log = Logger(namespace="smtpgw.mta-sts")

RETRY_FAILED = 300.0
MAX_DOMAINS_IN_MEMORY = 10000


class MtaSts:
    """One per gateway; :meth:`policy` is all delivery needs."""

    def __init__(self, reactor: Any, resolver: Resolver, cache_dir: str, ca_file: str | None = None,
                 fetcher: PolicyFetcher | None = None) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.cache = PolicyCache(cache_dir, reactor)
        self.fetcher = fetcher or PolicyFetcher(reactor, resolver, ca_file)
        self._memory: dict[str, CachedPolicy | None] = {}      # None: the disk had nothing
        self._failed: dict[tuple[str, str], float] = {}        # (domain, id) -> retry after
        self._inflight: dict[str, list[defer.Deferred]] = {}

    def policy(self, domain: str) -> defer.Deferred:
        """Fires with the :class:`Policy` in force for ``domain`` (mode ``none`` included), or None."""
        domain = domain.lower().rstrip(".")
        waiting = self._inflight.get(domain)
        d: defer.Deferred = defer.Deferred()
        if waiting is not None:
            waiting.append(d)
            return d
        self._inflight[domain] = [d]
        lookup = defer.Deferred.fromCoroutine(self._policy(domain))
        lookup.addErrback(self._crashed, domain)
        lookup.addCallback(self._answer, domain)
        return d

    def _crashed(self, failure: Any, domain: str) -> None:
        log.failure("MTA-STS lookup for {domain} failed", failure, domain=domain)
        return None

    def _answer(self, result: Policy | None, domain: str) -> None:
        for d in self._inflight.pop(domain, []):
            d.callback(result)

    async def _cached(self, domain: str) -> CachedPolicy | None:
        if domain not in self._memory:
            if len(self._memory) >= MAX_DOMAINS_IN_MEMORY:
                self._memory.pop(next(iter(self._memory)))
            self._memory[domain] = await self.cache.load(domain)
        cached = self._memory.get(domain)
        if cached is not None and cached.expires <= self.reactor.seconds():
            return None
        return cached

    async def _policy(self, domain: str) -> Policy | None:
        cached = await self._cached(domain)
        in_force = cached.policy if cached is not None else None
        try:
            new_id = policy_id(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DNSError as e:
            log.info("MTA-STS: _mta-sts.{domain} TXT lookup failed ({why}); {keeping}",
                     domain=domain, why=e.reply.text, keeping=_keeping(in_force))
            return in_force
        except PolicyError as e:
            log.warn("MTA-STS: _mta-sts.{domain} TXT record ignored: {why}; {keeping}",
                     domain=domain, why=str(e), keeping=_keeping(in_force))
            return in_force
        if new_id is None or (in_force is not None and in_force.id == new_id):
            return in_force
        now = self.reactor.seconds()
        if self._failed.get((domain, new_id), 0.0) > now:
            return in_force
        try:
            policy = parse_policy(await self.fetcher.fetch(domain), new_id)
        except (FetchError, PolicyError) as e:
            self._failed[(domain, new_id)] = now + RETRY_FAILED
            if len(self._failed) > MAX_DOMAINS_IN_MEMORY:
                self._failed = {k: t for k, t in self._failed.items() if t > now}
            log.warn("MTA-STS: policy of {domain} (id {id}) not fetched: {why}; {keeping}",
                     domain=domain, id=new_id, why=str(e), keeping=_keeping(in_force))
            return in_force
        fetched = self.reactor.seconds()
        entry = CachedPolicy(policy, fetched, fetched + policy.max_age)
        self._memory[domain] = entry
        log.info("MTA-STS: policy of {domain} is now id {id}, mode {mode}, mx {mx}, max_age {age}s",
                 domain=domain, id=new_id, mode=policy.mode, mx=" ".join(policy.mx) or "-", age=policy.max_age)
        try:
            await self.cache.store(domain, entry)
        except OSError as e:
            log.warn("MTA-STS: cannot write the policy cache for {domain}: {why}", domain=domain, why=str(e))
        return policy

    async def live(self, domain: str) -> tuple[str | None, Policy | None, str]:
        """For ``smtpgw dns-check``: the TXT id, the policy fetched now (no cache), and what went wrong."""
        try:
            new_id = policy_id(await self.resolver.txt(f"_mta-sts.{domain}"))
        except DNSError as e:
            return None, None, e.reply.text
        except PolicyError as e:
            return None, None, str(e)
        if new_id is None:
            return None, None, f"no v=STSv1 TXT record at _mta-sts.{domain}"
        try:
            return new_id, parse_policy(await self.fetcher.fetch(domain), new_id), ""
        except (FetchError, PolicyError) as e:
            return new_id, None, f"{policy_url(domain)}: {e}" if isinstance(e, PolicyError) else str(e)


def _keeping(policy: Policy | None) -> str:
    return (f"the cached policy (id {policy.id}, mode {policy.mode}) stays in force" if policy is not None
            else "no policy in force")


__all__ = ["MtaSts", "RETRY_FAILED"]
