"""The relay decision, made once per RCPT from the session's client address and identity."""
from __future__ import annotations

import ipaddress
from typing import Any

from mta.config import Config, RelayConfig
from mta.defaults import domain_of
from mta.hookspecs import hookimpl
from mta.reply import Reply


def client_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The peer as an address; IPv4-mapped IPv6 peers count as their IPv4 address."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def relay_reason(relay: RelayConfig, peer_host: str, authenticated_user: str | None) -> str | None:
    """Why this client may relay, or None when it may not."""
    ip = client_ip(peer_host)
    if ip is not None:
        for net in relay.allow:
            if ip.version == net.version and ip in net:
                return f"client {ip} in relay.allow {net}"
    if authenticated_user and relay.allow_authenticated:
        return f"authenticated as {authenticated_user}"
    return None


class RelayACL:
    def __init__(self) -> None:
        self.config: Config | None = None
        self.services: Any = None

    @hookimpl
    def smtpgw_configure(self, config: Config, services: Any) -> None:
        self.config = config
        self.services = services

    @hookimpl
    def smtpgw_rcpt_to(self, session, envelope, recipient, params) -> Reply | None:
        if self.config is None or self.config.is_local_domain(domain_of(recipient)):
            return None
        relay = self.config.virtual_server(session.virtual_server).relay
        reason = relay_reason(relay, session.peer_host, session.authenticated_user)
        hooks = getattr(self.services, "hooks", None)
        if hooks is not None:
            hooks.event("smtp_protocol", "minimum", "relay decision", session=session.id,
                        recipient=recipient, decision="accept" if reason else "deny",
                        reason=reason or "client not in relay.allow and not authenticated")
        if reason:
            return Reply(250, "2.1.5", "Recipient OK")
        return None
