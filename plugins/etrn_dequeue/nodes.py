"""Who asks for what: ETRN nodes (RFC 1985), who may ask (``delivery.authorized``) and how often.

Kept free of I/O and of the queue so the rules an administrator relies on are plain functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from mta.config import Config, Connector
from mta.model.netaddr import client_ip

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


@dataclass(frozen=True)
class Node:
    """What an ETRN names: ``domain``, ``@domain`` (it and its subdomains) or ``#queue`` (a connector)."""

    kind: str           # domain | subdomains | queue
    name: str           # lower-case domain, or the queue name as written
    text: str           # the argument as the client wrote it, for replies

    def matches_domain(self, domain: str) -> bool:
        d = domain.lower().rstrip(".")
        if self.kind == "domain":
            return d == self.name
        if self.kind == "subdomains":
            return d == self.name or d.endswith("." + self.name)
        return False

    def matches_connector(self, connector: Connector) -> bool:
        """May this connector hold mail for the node?"""
        if self.kind == "queue":
            return connector.name.lower() == self.name.lower()
        for space in connector.address_spaces:
            if space.matches(self.name):
                return True
            if self.kind == "subdomains":
                base = space.domain[2:] if space.domain.startswith("*.") else space.domain
                if base.endswith("." + self.name):
                    return True
        return False


def valid_domain(text: str) -> bool:
    labels = text.split(".")
    return 0 < len(text) <= 253 and all(_LABEL.match(label) for label in labels)


def parse_node(argument: str) -> Node | None:
    """The ETRN argument as a :class:`Node`; None when it is not one (501)."""
    text = argument.strip()
    if not text or any(c.isspace() for c in text) and not text.startswith("#"):
        return None
    if text.startswith("#"):
        name = text[1:].strip()
        return Node("queue", name, text) if name and name.isprintable() else None
    kind, name = ("subdomains", text[1:]) if text.startswith("@") else ("domain", text)
    name = name.lower().rstrip(".")
    return Node(kind, name, text) if valid_domain(name) else None


def parse_domain_list(argument: str) -> list[str] | None:
    """ATRN's ``domain1,domain2`` (RFC 2645); an empty list means every domain the account may collect."""
    text = argument.strip()
    if not text:
        return []
    out = []
    for part in text.split(","):
        name = part.strip().lower().rstrip(".")
        if not valid_domain(name):
            return None
        if name not in out:
            out.append(name)
    return out


def is_authorized(connector: Connector, session: Any) -> bool:
    """``delivery.authorized``: the client's address is in a listed network, or it authenticated as a
    listed account. An empty list authorizes nobody (held mail then only leaves by expiry)."""
    ip = client_ip(getattr(session, "peer_host", "") or "")
    user = getattr(session, "authenticated_user", None)
    for entry in connector.delivery.authorized:
        if entry.account is not None and user is not None and user == entry.account:
            return True
        if entry.network is not None and ip is not None and ip.version == entry.network.version \
                and ip in entry.network:
            return True
    return False


def account_connectors(config: Config, account: str) -> list[Connector]:
    """The remote-triggered connectors whose mail ``account`` may collect (ATRN, TURN)."""
    return [c for c in remote_triggered(config)
            if any(a.account is not None and a.account == account for a in c.delivery.authorized)]


def remote_triggered(config: Config) -> list[Connector]:
    return [c for c in config.connectors if c.delivery.remote_triggered]


def collectable_domains(connectors: Iterable[Connector]) -> list[str]:
    """The named (non-wildcard) domains of the connectors' address spaces: what plain TURN/ATRN mean."""
    out: list[str] = []
    for c in connectors:
        for space in c.address_spaces:
            name = space.domain[2:] if space.domain.startswith("*.") else space.domain
            if name != "*" and name not in out:
                out.append(name)
    return out
