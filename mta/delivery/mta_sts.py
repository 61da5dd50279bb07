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
that overlap share one fetch. Each failed fetch is told to :attr:`MtaSts.observers` (TLS reporting
counts it, RFC 8460 4.3.2.2: one failed session of type ``sts-policy-fetch-error``,
``sts-policy-invalid`` or ``sts-webpki-invalid``, under the cached policy still in force, else as
``no-policy-found``).

Proactive refresh (RFC 8461 10.2): an attacker who blocks the TXT lookup or the fetch when a cached
policy runs out strips the protection, and an unchanged id never makes a sender fetch again, so the
expiry is never pushed back. So a cached policy of a domain that saw mail since it was fetched is
fetched again in the background (TXT, then HTTPS even for an unchanged id) once a day, or at half its
``max_age`` when that is shorter -- well before it expires; delivery never waits for it. A domain
that saw no mail is left to lapse. Several workers share the cache: one that finds a fresher copy on
disk takes it instead of fetching.

``gateway.mta_sts.ca_file`` is applied on SIGHUP (:meth:`MtaSts.reload`): the next fetch reads it.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from mta.delivery.nexthops import DNSError, Resolver
from mta.delivery.sts_cache import CachedPolicy, PolicyCache
from mta.delivery.sts_fetch import POLICY_INVALID, FetchError, PolicyFetcher, policy_url
from mta.delivery.sts_policy import Policy, PolicyError, parse_policy, policy_id

log = Logger(namespace="smtpgw.mta-sts")

RETRY_FAILED = 300.0
MAX_DOMAINS_IN_MEMORY = 10000
REFRESH_EVERY = 86400.0             # RFC 8461 10.2: refresh cached policies daily, in the background
MIN_REFRESH = 1.0                   # however short max_age is, no refresh loop


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
        self._mail_seen: dict[str, float] = {}                 # domain -> when a delivery last asked
        self._refresh_at: dict[str, Any] = {}                  # domain -> its refresh timer (IDelayedCall)
        self.refreshes = 0                                     # background refreshes done (tests, metrics)
        # TLS reporting: called with (domain, RFC 8460 result type, why, the policy still in force or
        # None) for every fetch that failed (RFC 8460 4.3.2.2: sts-policy-fetch-error, ...)
        self.observers: list[Callable[[str, str, str, Policy | None], Any]] = []

    def reload(self, ca_file: str | None) -> None:
        """SIGHUP: ``gateway.mta_sts.ca_file`` (path or contents) is read again at the next fetch, and
        fetches that failed under the old trust are no longer held back."""
        self.fetcher.set_ca_file(ca_file)
        self._failed.clear()

    def stop(self) -> None:
        for timer in self._refresh_at.values():
            if timer.active():
                timer.cancel()
        self._refresh_at.clear()

    def policy(self, domain: str) -> defer.Deferred:
        """Fires with the :class:`Policy` in force for ``domain`` (mode ``none`` included), or None."""
        domain = domain.lower().rstrip(".")
        self._mail_seen[domain] = self.reactor.seconds()
        if len(self._mail_seen) > MAX_DOMAINS_IN_MEMORY:
            self._mail_seen.pop(next(iter(self._mail_seen)))
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
            self._memory[domain] = loaded = await self.cache.load(domain)
            if loaded is not None:
                self._plan_refresh(domain, loaded)
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
        return await self._fetch(domain, new_id, in_force)

    async def _fetch(self, domain: str, new_id: str, in_force: Policy | None, refresh: bool = False) -> Policy | None:
        """Fetch, cache and return the policy of id ``new_id``; on failure ``in_force`` stays."""
        now = self.reactor.seconds()
        if self._failed.get((domain, new_id), 0.0) > now:
            return in_force
        try:
            policy = parse_policy(await self.fetcher.fetch(domain), new_id)
        except (FetchError, PolicyError) as e:
            for observer in self.observers:
                observer(domain, e.kind if isinstance(e, FetchError) else POLICY_INVALID, str(e), in_force)
            self._failed[(domain, new_id)] = now + RETRY_FAILED
            if len(self._failed) > MAX_DOMAINS_IN_MEMORY:
                self._failed = {k: t for k, t in self._failed.items() if t > now}
            log.warn("MTA-STS: policy of {domain} (id {id}) not fetched: {why}; {keeping}",
                     domain=domain, id=new_id, why=str(e), keeping=_keeping(in_force))
            return in_force
        fetched = self.reactor.seconds()
        entry = CachedPolicy(policy, fetched, fetched + policy.max_age)
        self._memory[domain] = entry
        self._plan_refresh(domain, entry)
        if refresh and in_force is not None and in_force.id == new_id:
            log.info("MTA-STS: policy of {domain} (id {id}, mode {mode}) refreshed in the background; "
                     "in force for another {age}s", domain=domain, id=new_id, mode=policy.mode, age=policy.max_age)
        else:
            log.info("MTA-STS: policy of {domain} is now id {id}, mode {mode}, mx {mx}, max_age {age}s",
                     domain=domain, id=new_id, mode=policy.mode, mx=" ".join(policy.mx) or "-",
                     age=policy.max_age)
        try:
            await self.cache.store(domain, entry)
        except OSError as e:
            log.warn("MTA-STS: cannot write the policy cache for {domain}: {why}", domain=domain, why=str(e))
        return policy

    # -- proactive refresh (RFC 8461 10.2) ---------------------------------------------------------

    def _plan_refresh(self, domain: str, cached: CachedPolicy) -> None:
        """Refresh ``cached`` a day after it was fetched, or at half its max_age if sooner."""
        old = self._refresh_at.pop(domain, None)
        if old is not None and old.active():
            old.cancel()
        period = max(MIN_REFRESH, min(REFRESH_EVERY, (cached.expires - cached.fetched) / 2))
        if len(self._refresh_at) < MAX_DOMAINS_IN_MEMORY:
            delay = max(MIN_REFRESH, cached.fetched + period - self.reactor.seconds())
            self._refresh_at[domain] = self.reactor.callLater(delay, self._refresh_due, domain, period)

    def _refresh_due(self, domain: str, period: float) -> None:
        """``period`` after the last fetch (or failed refresh): refresh if the domain saw mail in it."""
        self._refresh_at.pop(domain, None)
        if self._mail_seen.get(domain, 0.0) < self.reactor.seconds() - period - MIN_REFRESH:
            return              # no mail for it lately: let the policy lapse, the next message looks it up
        if domain in self._inflight:       # a lookup is running: it may refresh; look again later
            self._refresh_at[domain] = self.reactor.callLater(MIN_REFRESH, self._refresh_due, domain, period)
            return
        self._inflight[domain] = []         # lookups arriving meanwhile wait for the refresh
        d = defer.Deferred.fromCoroutine(self._refresh(domain))
        d.addErrback(self._crashed, domain)
        d.addCallback(self._answer, domain)

    async def _refresh(self, domain: str) -> Policy | None:
        """Fetch the policy again whatever the TXT id says; keep what is cached when anything fails."""
        self.refreshes += 1
        held = self._memory.get(domain)
        disk = await self.cache.load(domain)
        if disk is not None and (held is None or disk.fetched > held.fetched):
            self._memory[domain] = disk                 # another worker refreshed it already
            self._plan_refresh(domain, disk)
            return disk.policy
        in_force = held.policy if held is not None and held.expires > self.reactor.seconds() else None
        until = " until it expires" if in_force is not None else ""
        try:
            new_id = policy_id(await self.resolver.txt(f"_mta-sts.{domain}"))
        except (DNSError, PolicyError) as e:
            why = e.reply.text if isinstance(e, DNSError) else str(e)
            new_id, problem = None, f"_mta-sts.{domain} TXT: {why}"
        else:
            problem = f"no v=STSv1 TXT record at _mta-sts.{domain}"
        if new_id is None:
            log.warn("MTA-STS: background refresh of {domain} skipped: {why}; {keeping}{until}",
                     domain=domain, why=problem, keeping=_keeping(in_force), until=until)
            self._retry_refresh(domain, held)
            return in_force
        policy = await self._fetch(domain, new_id, in_force, refresh=True)
        if policy is in_force:                          # the fetch failed (logged): try again later
            self._retry_refresh(domain, held)
        return policy

    def _retry_refresh(self, domain: str, held: CachedPolicy | None) -> None:
        """After a failed refresh: again at half the time left (at least RETRY_FAILED apart), while
        the cached policy lasts; once it has expired, the next message looks the domain up anew."""
        now = self.reactor.seconds()
        if held is None or held.expires <= now or len(self._refresh_at) >= MAX_DOMAINS_IN_MEMORY:
            return
        delay = max(RETRY_FAILED, min(REFRESH_EVERY, (held.expires - now) / 2))
        self._refresh_at[domain] = self.reactor.callLater(delay, self._refresh_due, domain, delay)

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
