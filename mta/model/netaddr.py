"""Client addresses as policy sees them: one parse, shared by every plugin that matches networks."""
from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)     # asked at every RCPT: a peer's address is parsed once
def client_ip(host: str) -> IPAddress | None:
    """The peer as an address; an IPv4-mapped IPv6 peer counts as its IPv4 address, a scope id is
    ignored, and anything that is not an address (a UNIX socket, a test transport) gives None."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
