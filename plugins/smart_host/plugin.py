"""Turns smart-host strings into next hops through the gateway's resolver.

Every configured smart host gives hops, in the configured order, and the deliverer tries them in that
order: a host that is down, answers 4xx or cannot satisfy the connector's TLS/AUTH settings passes the
mail to the next one; only when every smart host is unusable does the connector fail over (by cost).

A smart host that does not resolve is the site's configuration problem, not the recipient's: its
lookup errors are always temporary (mail waits), even NXDOMAIN.
"""
from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

from twisted.internet import defer

from mta.plugin.hookspecs import hookimpl
from mta.model.nexthop import Hop
from mta.smtp import replies as R
from mta.delivery.nexthops import DNSError, TemporaryDNSError
from mta.config.values import parse_smart_host


class SmartHost:
    def __init__(self) -> None:
        self.config: Any = None
        self.services: Any = None

    @hookimpl
    def smtpgw_configure(self, config: Any, services: Any) -> None:
        self.config = config
        self.services = services

    @hookimpl
    def smtpgw_reload(self, config: Any) -> None:
        """Smart hosts apply live: the connectors' come with each delivery, the virtual servers' from here."""
        self.config = config

    def smart_hosts_for(self, envelope: Any, connector: Any) -> tuple[str, ...]:
        if connector is not None and connector.smart_hosts:
            return tuple(connector.smart_hosts)
        vs_name = getattr(envelope, "virtual_server", "")
        for vs in self.config.virtual_servers:
            if vs.name == vs_name and vs.smart_host:
                return (vs.smart_host,)
        return ()

    @hookimpl(tryfirst=True)
    def smtpgw_next_hops(self, envelope, domain, connector):
        if self.config is None:
            return None
        hosts = self.smart_hosts_for(envelope, connector)
        if not hosts:
            return None
        port = connector.outbound.port if connector is not None else 25
        literal = self._literal_hops(hosts, port)
        if literal is not None:         # only [IP] smart hosts: nothing to look up, no Deferred
            return list(literal)
        return self._resolve_all(hosts, port)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def _literal_hops(hosts: tuple[str, ...], default_port: int) -> tuple[Hop, ...] | None:
        hops = []
        for pref, text in enumerate(hosts):
            host, port, literal, _ = parse_smart_host(text, "smart_hosts", default_port)
            if not literal:
                return None
            hops.append(Hop(host=host, port=port, name=host, preference=pref))
        return tuple(hops)

    @defer.inlineCallbacks
    def _resolve_all(self, hosts: tuple[str, ...], default_port: int = 25):
        """Hops for every smart host, in the configured order; a host that does not resolve is
        skipped so the next one is tried, and only when none resolves is the lookup error raised."""
        resolver = self.services.resolver
        hops: list[Hop] = []
        last_error: Exception | None = None
        for pref, text in enumerate(hosts):
            host, port, literal, bracketed = parse_smart_host(text, "smart_hosts", default_port)
            if literal:
                hops.append(Hop(host=host, port=port, name=host, preference=pref))
                continue
            try:
                if bracketed:
                    found = yield resolver.address_hops(host, port, preference=pref)
                else:
                    found = yield resolver.mx_hops(host, port)
                    found = [replace(h, preference=pref) for h in found]     # keeps dnssec (DANE)
            except DNSError as e:
                last_error = e if isinstance(e, TemporaryDNSError) else TemporaryDNSError(
                    R.next_hop_unresolved(f"smart host {text}: {e.reply.text}"))
                continue
            except Exception as e:      # noqa: BLE001 - lookup failures are reported per host
                last_error = e
                continue
            hops.extend(found)
        if not hops and last_error is not None:
            raise last_error
        return hops
