"""One delivery attempt for a queued message: route each domain, try its hops, report per recipient.

The queue manager hands over the pending recipients; this module answers with one
:class:`~mta.model.nexthop.RecipientResult` each and never fails as a whole, so the queue only has to
record outcomes.  Local domains go to Maildir; other domains go through the connectors the router and
the ``smtpgw_route`` hook choose, in order:

* a connector whose delivery window is closed holds the recipients (not an attempt), with the
  reason the window gives (``held: connector 'X' schedule, opens at ...``, see :mod:`mta.delivery.windows`);
* its next hops come from ``smtpgw_next_hops`` (smart hosts, or the core's MX lookup);
* hops are tried in order, with the connector's :class:`~mta.smtp.client.policy.OutboundPolicy` (TLS, AUTH,
  limits); a hop that cannot take the message (connect refused, 4xx greeting or MAIL, TLS or AUTH
  impossible) passes it to the next, and recipients a hop answers with 4xx are tried on the next hop
  too (as Postfix does with its backup MX hosts); a permanent refusal of the whole transaction fails it;
* recipients no hop of a connector could take go to the next connector (higher cost); when none is
  left they are deferred with their last temporary reason.

Domains are delivered concurrently; recipients of one domain share one transaction per hop.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Coroutine, Sequence

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from mta.config import Connector
from mta.smtp.address import domain_of
from mta.queue import mail_lines
from mta.dsn.params import OutboundDSN
from mta.model.nexthop import Hop, HostUnusable, Outcome, RecipientResult
from mta.smtp.client.policy import OutboundPolicy
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.model.window import Hold
from mta.smtp import replies as R
from mta.smtp.reply import Reply
from mta.delivery.connectors import connectors_for, source_address, usable_source
from mta.delivery import dane as dane_, tls_policy
from mta.smtp.client import requiretls, smtputf8
from mta.delivery.maildir import already_delivered_to, deliver_to_maildir, delivery_headers
from mta.delivery.recipients import Expansion, RecipientTable
from mta.delivery.shaping import Shaper, Verdict, verdict_of, verdict_of_results

log = Logger(namespace="smtpgw.delivery")

MAX_RCPTS_PER_TRANSACTION = 100     # RFC 5321 4.5.3.1.8: servers must take at least 100
MAX_BATCHES_IN_FLIGHT = 20          # per message and domain (Postfix's default_destination_concurrency_limit)

Data = bytes | list[bytes]


def _all(recipients: Sequence[str], reply: Reply, hop: str = "",
         held_until: float | None = None) -> list[RecipientResult]:
    return [RecipientResult(r, reply, hop, held_until) for r in recipients]


# What a routing hook's answer is when it came at once: ``type(x) in AT_ONCE`` spares the
# isinstance check against Deferred (an ABC, whose negative answer is two more Python calls).
AT_ONCE = frozenset({type(None), list, tuple, Reply, Hold})


def _later(result: Any) -> bool:
    """Whether a verdict hook's answer is still to come (a Deferred): most answer at once, and a
    Deferred or a coroutine per hook per message is measurable."""
    return type(result) not in AT_ONCE and isinstance(result, defer.Deferred)


class Shared:
    """One Deferred's outcome for any number of waiters, before or after it fired."""

    def __init__(self, d: defer.Deferred) -> None:
        self._result: Any = _UNSET
        self._waiters: list[defer.Deferred] = []
        d.addBoth(self._settle)

    def _settle(self, result: Any) -> None:
        self._result = result
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            self._fire(w)

    def _fire(self, w: defer.Deferred) -> None:
        if isinstance(self._result, Failure):
            w.errback(self._result)
        else:
            w.callback(self._result)

    def outcome(self) -> defer.Deferred:
        w: defer.Deferred = defer.Deferred()
        if self._result is _UNSET:
            self._waiters.append(w)
        else:
            self._fire(w)
        return w


_UNSET = object()


class Deliverer:
    """Delivery for the queue manager; holds no per-message state between calls."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self._policies: dict[str, OutboundPolicy] = {}        # connector name -> its client options
        self._policy_source: dict[str, Connector] = {}
        self._shaper: Shaper | None = None

    @property
    def shaper(self) -> Shaper:
        """``gateway.shaping`` in this process (mta.delivery.shaping), following reloads."""
        rules = self.gateway.config.gateway.shaping
        if self._shaper is None:
            worker = self.gateway.worker
            self._shaper = Shaper(rules, self.gateway.reactor, share=worker.share if worker.many else (lambda n: n),
                                  parts=worker.count if worker.many else 1)
        elif self._shaper.rules != rules:
            self._shaper.configure(rules)
        return self._shaper

    # -- entry point --------------------------------------------------------------------------

    def deliver(self, entry: QueueEntry, data: Data,
                recipients: list[RecipientState]) -> defer.Deferred:
        """Try ``recipients`` of ``entry`` now; fires with one result per recipient, in their order."""
        return defer.Deferred.fromCoroutine(self._deliver_all(entry, data, recipients))

    def deliver_async(self, entry: QueueEntry, data: Data,
                      recipients: list[RecipientState]) -> Coroutine[Any, Any, list[RecipientResult | None]]:
        """``deliver`` as a coroutine, for the queue to await inside its own attempt: one Deferred
        and its callbacks fewer per message."""
        return self._deliver_all(entry, data, recipients)

    async def _deliver_all(self, entry: QueueEntry, data: Data,
                           recipients: list[RecipientState]) -> list[RecipientResult | None]:
        """One job per (domain, batch of at most 100 recipients); domains run at once, and
        each domain has at most :data:`MAX_BATCHES_IN_FLIGHT` batches in flight (Postfix's destination
        concurrency), the next starting when one ends. The reactor gets a turn between starting two,
        since starting one runs its hooks and routing at once. So a message to 64,000 recipients
        never has 640 batches answering in the same reactor turn while every other session waits.
        The batches of a local domain share one record of the Maildirs written (one copy each)."""
        results: list[RecipientResult | None] = [None] * len(recipients)
        by_domain: dict[str, list[int]] = defaultdict(list)
        for i, rcpt in enumerate(recipients):
            by_domain[domain_of(rcpt.address)].append(i)

        if len(by_domain) == 1 and len(recipients) <= MAX_RCPTS_PER_TRANSACTION:
            # One transaction (most mail): awaited directly, without the semaphore, the gathering
            # and their Deferreds, about 40 Python calls a message; the same results and errors.
            domain, indexes = next(iter(by_domain.items()))
            addresses = [r.address for r in recipients]
            try:
                batch_results = await self._deliver_domain(entry, domain, addresses, data, {})
            except Exception:
                batch_results = self._crashed(Failure(), entry, domain, addresses)
            self._place(batch_results, results, indexes)
            return results

        jobs = []
        for domain, indexes in by_domain.items():
            batches = [indexes[i:i + MAX_RCPTS_PER_TRANSACTION]
                       for i in range(0, len(indexes), MAX_RCPTS_PER_TRANSACTION)]
            written: dict[str, Shared] = {}     # a local domain's Maildirs written in this attempt
            gate = defer.DeferredSemaphore(MAX_BATCHES_IN_FLIGHT)
            for batch in batches:
                if jobs:
                    await task.deferLater(self.gateway.reactor, 0, lambda: None)
                addresses = [recipients[i].address for i in batch]
                d = gate.run(self._batch, entry, domain, addresses, data, written)
                d.addErrback(self._crashed, entry, domain, addresses)
                d.addCallback(self._place, results, batch)
                jobs.append(d)
        if jobs:
            await defer.gatherResults(jobs, consumeErrors=True)
        return results

    def _batch(self, entry: QueueEntry, domain: str, addresses: list[str], data: Data,
               written: dict[str, Shared]) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._deliver_domain(entry, domain, addresses, data, written))

    @staticmethod
    def _place(batch_results: list[RecipientResult], results: list, indexes: list[int]) -> None:
        for i, result in zip(indexes, batch_results):
            results[i] = result

    def _crashed(self, failure: Any, entry: QueueEntry, domain: str,
                 recipients: list[str]) -> list[RecipientResult]:
        log.failure("delivery of {id} to {domain} failed", failure, id=entry.id, domain=domain)
        return _all(recipients, R.DELIVERY_ERROR)

    def _event(self, entry: QueueEntry, message: str, level: str = "medium", **fields: Any) -> None:
        self.gateway.hooks.event("routing_engine", level, message, id=entry.id, **fields)

    async def _deliver_domain(self, entry: QueueEntry, domain: str, recipients: list[str], data: Data,
                              written: dict[str, "Shared"] | None = None) -> list[RecipientResult]:
        if not domain:
            return _all(recipients, R.NO_DOMAIN)
        local = self.gateway.config.is_local_domain(domain)
        self.gateway.hooks.event("categorizer", "medium", f"{domain}: {'local' if local else 'remote'} domain",
                                 id=entry.id, domain=domain, recipients=len(recipients))
        if local:
            return await self._deliver_local(entry, domain, recipients, data, {} if written is None else written)
        return await self._deliver_remote(entry, domain, recipients, data)

    # -- local --------------------------------------------------------------------------------

    async def _deliver_local(self, entry: QueueEntry, domain: str, recipients: list[str], data: Data,
                             written: dict[str, "Shared"]) -> list[RecipientResult]:
        """Each recipient: its mailboxes (aliases and +tag resolved, mta.delivery.recipients), a copy
        queued for its addresses elsewhere; delivered only when all of them are."""
        table = self.gateway.recipients.table(domain)
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        started = self.gateway.reactor.seconds()
        replies = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._deliver_one_local(entry, domain, rcpt, chunks, table, written))
             for rcpt in recipients], consumeErrors=True)
        finished = self.gateway.reactor.seconds()
        results = []
        for rcpt, reply in zip(recipients, replies):
            self._event(entry, f"{rcpt}: local delivery {reply.code}", recipient=rcpt, reply=str(reply))
            results.append(RecipientResult(rcpt, reply, "maildir", started=started, finished=finished))
        return results

    async def _deliver_one_local(self, entry: QueueEntry, domain: str, rcpt: str, data: list[bytes],
                                 table: RecipientTable | None, written: dict[str, "Shared"]) -> Reply:
        """One recipient's mailboxes and forwards. A mailbox gets one copy per attempt however many
        recipients stand for it (``alice``, ``Alice``, ``alice+news``: one file, as Postfix's
        duplicate filter does), so one message to 10,000 tags of an address writes one file, not
        10,000; the copy carries the first such recipient's Delivered-To."""
        config = self.gateway.config
        root = config.gateway.local_domains[domain].maildir
        reactor = self.gateway.reactor
        local = rcpt.rpartition("@")[0]
        expansion = table.expand(local) if table is not None else Expansion((local.lower(),))
        if expansion.unknown:
            return R.local_user_unknown(rcpt)
        if already_delivered_to(data, rcpt):
            return R.forwarding_loop(rcpt)
        jobs = []
        for box in expansion.mailboxes:
            if box not in written:
                written[box] = Shared(deferToThreadPool(reactor, reactor.getThreadPool(), deliver_to_maildir, root,
                                                        box, data, config.gateway.hostname,
                                                        delivery_headers(entry.sender, rcpt)))
            jobs.append(written[box].outcome())
        if expansion.forward:
            copy = [f"Delivered-To: {rcpt}\r\n".encode("utf-8", "surrogateescape"), *data]
            jobs.append(self.gateway.queue.inject(entry.sender, list(expansion.forward), b"".join(copy),
                                                  {mail_lines.FORWARDED_FOR: rcpt}))
        outcomes = await defer.DeferredList(jobs, consumeErrors=True)
        for ok, value in outcomes:
            if ok:
                continue
            if value.check(ValueError):
                return R.mailbox_unavailable(value.value)
            if value.check(OSError):
                return R.local_delivery_failed(value.value)
            log.failure("local delivery of {id} to {rcpt}", value, id=entry.id, rcpt=rcpt)
            return R.DELIVERY_ERROR
        return R.DELIVERED_LOCALLY

    # -- remote -------------------------------------------------------------------------------

    async def _deliver_remote(self, entry: QueueEntry, domain: str, recipients: list[str],
                              data: Data) -> list[RecipientResult]:
        hooks = self.gateway.hooks
        candidates = connectors_for(self.gateway.config, domain)
        routed = hooks.route(entry, recipients[0], candidates)
        if _later(routed):
            routed = await routed
        if isinstance(routed, Reply):
            self._event(entry, f"{domain}: routing hook failed: {routed}", "minimum", domain=domain)
            return _all(recipients, routed)
        connectors: list[Connector] = list(routed) if routed is not None else candidates
        if not connectors:
            self._event(entry, f"{domain}: no connector matches", "minimum", domain=domain)
            return _all(recipients, R.no_route(domain))
        self._event(entry, f"{domain}: connectors {', '.join(c.name for c in connectors)}", domain=domain)

        # results[i] settles recipients[i]; tentative[i] is its last 4xx answer, used only if no
        # later hop or connector settles it
        results: list[RecipientResult | None] = [None] * len(recipients)
        tentative: list[RecipientResult | None] = [None] * len(recipients)
        last = R.no_connector_delivered(domain)
        last_hop = ""
        for n, connector in enumerate(connectors, 1):
            last, last_hop = await self._try_connector(entry, domain, recipients, data, connector,
                                                       results, tentative)
            if all(r is not None for r in results):
                return results  # type: ignore[return-value]
            if n < len(connectors):     # the outcome itself is the queue's mail log line
                self._event(entry, f"{domain}: connector {connector.name} unusable ({last}), failing over "
                            f"to {connectors[n].name}", domain=domain, connector=connector.name)
        return [r if r is not None else (t or RecipientResult(rcpt, last, last_hop))
                for rcpt, r, t in zip(recipients, results, tentative)]

    def _policy(self, connector: Connector) -> OutboundPolicy:
        """The connector's client options. With several workers (``gateway.workers``) each takes
        ``ceil(limit / N)`` of the connection limits, so the gateway's total towards a host or through
        the connector stays within the configured limit rounded up to a multiple of N."""
        policy = self._policies.get(connector.name)
        if policy is None or self._policy_source.get(connector.name) is not connector:
            from dataclasses import replace

            policy = OutboundPolicy.for_connector(connector)
            worker = self.gateway.worker
            if worker.many:
                policy = replace(policy, max_connections=worker.share(policy.max_connections),
                                 max_connections_per_host=worker.share(policy.max_connections_per_host))
            self._policies[connector.name] = policy
            self._policy_source[connector.name] = connector
        return policy

    async def _try_connector(self, entry: QueueEntry, domain: str, recipients: list[str], data: Data,
                             connector: Connector, results: list, tentative: list) -> tuple[Reply, str]:
        """Try the recipients not yet settled in ``results`` through ``connector``'s hops, in order.

        A hop that cannot take the message (connection refused, 4xx greeting/MAIL, TLS or AUTH not
        possible) passes every recipient to the next hop; one that answers 4xx for some recipients
        passes those. Settles ``results`` in place; returns the last temporary reason for the rest,
        which fail over to the next connector.
        """
        hooks = self.gateway.hooks
        name = connector.name
        todo = [i for i, r in enumerate(results) if r is None]
        window = hooks.delivery_window(connector, entry, domain)
        if _later(window):
            window = await window
        if isinstance(window, Reply):
            return window, ""
        if isinstance(window, Hold) and not window.is_over(self.gateway.reactor.seconds()):
            reason = window.reason or f"held: connector '{name}' schedule until {window.until:.0f}"
            self._event(entry, f"{domain}: {reason}", domain=domain, connector=name)
            held = R.held(reason)
            for i in todo:
                results[i] = RecipientResult(recipients[i], held, "", window.until)
            return held, ""

        hops = hooks.next_hops(entry, domain, connector)    # a DNS error is its Reply
        if _later(hops):
            hops = await hops
        if isinstance(hops, Reply):
            if hops.is_permanent:
                self._event(entry, f"{domain}: {hops}", "minimum", domain=domain, connector=name)
                for i in todo:
                    results[i] = RecipientResult(recipients[i], hops)
            return hops, ""
        hops = list(hops or [])
        if not hops:
            return R.no_next_hop(domain, name), ""
        self._event(entry, f"{domain}: via {name}: hops {', '.join(map(str, hops))}",
                    domain=domain, connector=name)

        source = source_address(self.gateway.config, connector)
        policy = self._policy(connector)
        dsn = OutboundDSN.of(entry)     # RFC 3461 parameters for the next hop, when the sender gave any
        send_options: dict[str, Any] = {"dsn": dsn} if dsn is not None else {}
        if smtputf8.requested(entry):           # RFC 6531: the client decides per hop (mta.smtp.client.smtputf8)
            send_options["smtputf8"] = True
        route = await self._route(entry, domain, connector, hops, policy, data)
        if route.refusal is not None:
            self._event(entry, f"{domain}: {route.refusal}", domain=domain, connector=name)
            if route.refusal.is_permanent:
                for i in todo:
                    results[i] = RecipientResult(recipients[i], route.refusal)
            return route.refusal, str(route.skipped[0]) if route.skipped else ""
        if route.requiretls:
            send_options["requiretls"] = True
        last = R.no_hop_answered(name)
        last_hop = ""
        unmet: tuple[Reply, str] | None = None      # a hop refused for REQUIRETLS's sake
        only_unmet = True                           # ... and every other hop tried, too
        shaper = self.shaper
        paused_until: float | None = None
        for hop in route.hops:
            if not todo:
                break
            batch = [recipients[i] for i in todo]
            destination = shaper.destination(domain, hop) if shaper else None
            if destination is not None:
                paused = await shaper.enter(destination)
                if paused is not None:
                    paused_until = paused if paused_until is None else min(paused, paused_until)
                    continue
            try:
                answers = await self._send(destination, route, hop, entry.sender, batch, data,
                                           source_address=usable_source(source, hop.host), **send_options)
            except HostUnusable as e:
                self._event(entry, f"{domain}: {hop} unusable: {e.reply}", domain=domain,
                            connector=name, hop=str(hop))
                if e.reply.is_permanent and not requiretls.unmet(e.reply):
                    for i in todo:
                        results[i] = RecipientResult(recipients[i], e.reply, str(hop))
                    return e.reply, str(hop)
                if requiretls.unmet(e.reply):       # RFC 8689 4.2.1: the next MX host may offer it
                    unmet = unmet or (e.reply, str(hop))
                else:
                    only_unmet = False
                last, last_hop = e.reply, str(hop)
                continue
            except Exception as e:
                log.failure("client error sending {id} to {hop}", id=entry.id, hop=str(hop))
                last, last_hop = R.hop_error(str(hop), e), str(hop)
                continue
            self._event(entry, f"{domain}: {hop} answered", domain=domain, connector=name, hop=str(hop))
            only_unmet = False
            still = []
            for i, result in zip(todo, self._match(batch, answers, hop)):
                if result.outcome is Outcome.DEFERRED:
                    tentative[i] = result
                    last, last_hop = result.reply, result.hop
                    still.append(i)
                else:
                    results[i] = result
            todo = still
        if todo and unmet is not None and only_unmet and paused_until is None:
            # no MX host gave REQUIRETLS what it needs: the message bounces (5.7.10) rather than wait
            for i in todo:
                results[i] = RecipientResult(recipients[i], unmet[0], unmet[1])
            return unmet
        if todo and paused_until is not None and last_hop == "":
            # every hop was the paused destination's: hold the rest until the pause ends
            held = R.held(f"held: destination {domain} paused by traffic shaping")
            self._event(entry, f"{domain}: {held.text}", domain=domain, connector=name)
            for i in todo:
                results[i] = RecipientResult(recipients[i], held, "", paused_until)
            return held, ""
        return last, last_hop

    async def _route(self, entry: QueueEntry, domain: str, connector: Connector, hops: list[Hop],
                     policy: OutboundPolicy, data: Data) -> tls_policy.Route:
        """The hops to try and the TLS each needs: the MX hosts' DANE TLSA records, the destination's
        MTA-STS policy and the sender's REQUIRETLS or ``TLS-Required: No`` over the connector's
        settings (mta.delivery.tls_policy)."""
        required = requiretls.requested(entry)
        waived = not required and requiretls.waives_policy([data] if isinstance(data, bytes) else data)
        mta_sts = self.gateway.mta_sts
        lookup = self.gateway.dane
        sts = None
        dane = None
        pending = None
        if lookup is not None and not waived and dane_.subject_to_dane(connector):
            pending = lookup.hosts(hops)            # both lookups at once
        if mta_sts is not None and not waived and tls_policy.subject_to_sts(connector):
            sts = await mta_sts.policy(domain)
        if pending is not None:
            dane = await pending
        route = tls_policy.plan(domain, hops, policy, sts, self.gateway.config.gateway.mta_sts.ca_file,
                                requiretls=required, dane=dane)
        if lookup is not None:
            route.record = lookup.record
        route.sessions = getattr(self.gateway, "tls_reports", None)
        route.count_refusal()
        return route

    def _send(self, destination: Any, route: tls_policy.Route, hop: Hop, sender: str, batch: list[str],
              data: Data, **options: Any) -> Coroutine[Any, Any, list[RecipientResult]]:
        """The client's send, its outcome told to the destination's shaping (entered by the caller).
        Without shaping, the route's own coroutine: no layer of ours to resume at every reply."""
        if destination is None:
            return route.send(self.gateway.client, hop, sender, batch, data, **options)
        return self._send_shaped(destination, route, hop, sender, batch, data, **options)

    async def _send_shaped(self, destination: Any, route: tls_policy.Route, hop: Hop, sender: str,
                           batch: list[str], data: Data, **options: Any) -> list[RecipientResult]:
        verdict, trouble = Verdict.NEUTRAL, None
        try:
            answers = await route.send(self.gateway.client, hop, sender, batch, data, **options)
            verdict = verdict_of_results(answers)
            trouble = next((a.reply for a in answers if a.reply.code >= 400), None)
            return answers
        except HostUnusable as e:
            if e.reply is not R.CLIENT_SHUTTING_DOWN:
                verdict, trouble = verdict_of([e.reply.code]), e.reply
            raise
        finally:
            self.shaper.leave(destination, verdict, trouble)

    @staticmethod
    def _match(recipients: list[str], results: Sequence[RecipientResult], hop: Hop) -> list[RecipientResult]:
        """The client's results in our recipients' order; one it left out is a temporary failure."""
        pending: dict[str, list[RecipientResult]] = defaultdict(list)
        for result in results:
            pending[result.recipient.lower()].append(result)
        out = []
        for rcpt in recipients:
            found = pending.get(rcpt.lower())
            if found:
                result = found.pop(0)
                if not result.hop:
                    result = RecipientResult(result.recipient, result.reply, str(hop), result.held_until)
                out.append(result)
            else:
                out.append(RecipientResult(rcpt, R.no_recipient_answer(str(hop)),
                                           str(hop)))
        return out
