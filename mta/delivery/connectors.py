"""Which connectors carry mail for a domain, in the order to try them (Exchange's address-space rule).

The most specific matching address space wins (``example.test`` over ``*.example.test`` over ``*``);
among equally specific ones the lowest cost goes first, and the rest follow as fail-over
(a higher cost is only used when the cheaper connector cannot deliver).  Configuration order breaks
the remaining ties, so routing is deterministic.
"""
from __future__ import annotations

import functools
import ipaddress

from mta.config import Config, Connector

UNSPECIFIED = frozenset({"", "*", "0.0.0.0", "::"})


def connectors_for(config: Config, domain: str) -> list[Connector]:
    """Connectors whose address spaces match ``domain``, best first; each appears once."""
    d = domain.lower().rstrip(".")
    ranked = []
    for index, connector in enumerate(config.connectors):
        matching = [space for space in connector.address_spaces if space.matches(d)]
        if not matching:
            continue
        best = min(matching, key=lambda s: (-s.specificity, s.cost))
        ranked.append(((-best.specificity, best.cost, index), connector))
    ranked.sort(key=lambda item: item[0])
    return [connector for _, connector in ranked]


def source_address(config: Config, connector: Connector) -> str | None:
    """The address outbound connections bind to: the first bridgehead's first listen host.

    ``None`` (let the kernel choose) when the connector names no bridgehead, the bridgehead is
    unknown, or it listens on a wildcard address.
    """
    for name in connector.bridgeheads:
        try:
            vs = config.virtual_server(name)
        except KeyError:
            continue
        if not vs.listen:
            return None
        host = vs.listen[0].host.strip("[]")
        return None if host in UNSPECIFIED else host
    return None


@functools.lru_cache(maxsize=4096)
def usable_source(source: str | None, destination: str) -> str | None:
    """``source`` if a socket bound to it can reach ``destination``, else None.

    A listener on 127.0.0.1 cannot originate connections to the Internet, and an IPv4 source cannot
    reach an IPv6 hop; binding anyway would only turn a deliverable message into a connect error.
    Asked for every attempt with the same few pairs: remembered (parsing both addresses was about
    1% of a worker's CPU under the bench's load).
    """
    if source is None:
        return None
    try:
        src = ipaddress.ip_address(source)
    except ValueError:
        return source                   # a host name: the client resolves it
    try:
        dst = ipaddress.ip_address(destination)
    except ValueError:
        return None if src.is_loopback else source
    if src.version != dst.version:
        return None
    if src.is_loopback and not dst.is_loopback:
        return None
    return source
