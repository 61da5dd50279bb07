"""The relay settings relay_acl applies, as one immutable snapshot that SIGHUP can replace.

``postfix reload`` semantics: a session takes the snapshot current when it connects and keeps it to
the end (so a transaction never sees two policies), new connections get the new one, and delivery
checks use the newest. What a snapshot holds is exactly what relay_acl decides alone:

* per virtual server: ``relay.allow`` and ``relay.allow_authenticated``;
* per connector: ``content_restrictions`` and ``delivery_restrictions``.

Everything else the core also uses (listeners, local domains, which connectors exist and their
address spaces) stays as loaded at start; a reload that changes those is applied for the parts above
and warned about for the rest (a restart takes them).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterable

from mta.config import Config, Connector, RelayConfig
from smtpgw_plugins.relay_acl import restrictions

ALL_PRIORITIES = frozenset({restrictions.HIGH, restrictions.NORMAL, restrictions.LOW})


@dataclass(frozen=True)
class Policy:
    relay: dict[str, RelayConfig]               # virtual server name -> its relay settings
    connectors: dict[str, Connector]            # connector name -> connector with these restrictions
    entries: dict[str, frozenset[str]]          # connector name -> its delivery-restriction exceptions
    priorities_matter: bool                     # some connector refuses some priority

    @classmethod
    def of(cls, config: Config) -> "Policy":
        connectors = {c.name: c for c in config.connectors}
        return cls({vs.name: vs.relay for vs in config.virtual_servers}, connectors,
                   restrictions.entries_by_connector(connectors.values()),
                   _priorities_matter(connectors.values()))

    def relay_for(self, virtual_server: str) -> RelayConfig:
        return self.relay.get(virtual_server) or RelayConfig()

    def connector(self, connector: Connector) -> Connector:
        """``connector`` (as the core routes with it) carrying this snapshot's restrictions."""
        return self.connectors.get(connector.name, connector)

    def reloaded(self, running: Config, new: Config) -> tuple["Policy", list[str]]:
        """The snapshot ``new`` gives, kept to the virtual servers and connectors ``running`` has,
        and a note for each change a reload cannot apply."""
        notes: list[str] = []
        new_vs = {vs.name: vs for vs in new.virtual_servers}
        relay = dict(self.relay)
        for name in relay:
            if name in new_vs:
                relay[name] = new_vs[name].relay
            else:
                notes.append(f"virtual server {name!r} is no longer in the file; it keeps its relay "
                             f"settings until a restart")
        notes += [f"virtual server {name!r} is new; it needs a restart" for name in new_vs if name not in relay]
        new_connectors = {c.name: c for c in new.connectors}
        connectors = {}
        for c in running.connectors:
            fresh = new_connectors.get(c.name)
            if fresh is None:
                notes.append(f"connector {c.name!r} is no longer in the file; it keeps its restrictions "
                             f"until a restart")
                connectors[c.name] = self.connectors.get(c.name, c)
                continue
            connectors[c.name] = replace(c, content_restrictions=fresh.content_restrictions,
                                         delivery_restrictions=fresh.delivery_restrictions)
            if fresh.address_spaces != c.address_spaces:
                notes.append(f"connectors[{c.name!r}].address_spaces changed; routing needs a restart")
        notes += [f"connector {name!r} is new; it needs a restart"
                  for name in new_connectors if name not in connectors]
        if new.gateway.local_domains.keys() != running.gateway.local_domains.keys():
            notes.append("gateway.local_domains changed; it needs a restart")
        policy = Policy(relay, connectors, restrictions.entries_by_connector(connectors.values()),
                        _priorities_matter(connectors.values()))
        return policy, notes

    def describe_changes(self, old: "Policy") -> list[str]:
        """One line per setting that differs from ``old``, for the log."""
        lines = []
        for name, relay in self.relay.items():
            before = old.relay.get(name)
            if before is not None and before != relay:
                allow = ", ".join(str(n) for n in relay.allow) or "nobody"
                lines.append(f"virtual server {name!r}: relay.allow {allow}; allow_authenticated "
                             f"{str(relay.allow_authenticated).lower()}")
        for name, c in self.connectors.items():
            before = old.connectors.get(name)
            if before is None:
                continue
            if before.content_restrictions != c.content_restrictions:
                lines.append(f"connector {name!r}: content_restrictions changed")
            if before.delivery_restrictions != c.delivery_restrictions:
                lines.append(f"connector {name!r}: delivery_restrictions changed")
        return lines


def _priorities_matter(connectors: Iterable[Connector]) -> bool:
    return any(not ALL_PRIORITIES <= set(c.content_restrictions.allowed_priorities) for c in connectors)


def session_policy(session: Any, key: str, current: Policy) -> Policy:
    """The snapshot ``session`` took when it connected (``current`` for one that did not)."""
    extra = getattr(session, "extra", None)
    if extra is None:
        return current
    return extra.get(key) or current
