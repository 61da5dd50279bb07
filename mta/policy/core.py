"""The core's own behaviour, registered as the ``core`` plugin with ``trylast``.

Because the defaults are hook implementations like any other, a site plugin sits beside them and
answers first when it has an opinion; when nobody has, these decide (each hook's "The core answers"
line in :mod:`mta.plugin.hookspecs`).
"""
from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred

from mta.config import Connector
from mta.delivery.recipients import NewMailboxes
from mta.delivery.windows import delivery_window
from mta.model.envelope import Envelope, Session
from mta.model.nexthop import Hop
from mta.model.queue_entry import QueueEntry
from mta.model.window import Hold
from mta.plugin.hookspecs import hookimpl
from mta.policy.senders import SenderLogins
from mta.smtp import replies as R
from mta.smtp.address import domain_of
from mta.smtp.reply import Reply


class CorePolicy:
    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self._senders: SenderLogins | None = None

    def sender_logins(self) -> SenderLogins:
        """``auth.senders`` of every virtual server, read when first needed (the Gateway asks at
        start, so a bad file stops the start). A method, not a property: pluggy looks at every
        attribute of a plugin when it is registered."""
        if self._senders is None:
            self._senders = SenderLogins(self.gateway.config)
        return self._senders

    @hookimpl(trylast=True)
    def smtpgw_mail_from(self, session: Session, sender: str) -> Reply | None:
        """An authenticated user may send only as the addresses ``auth.senders`` gives them."""
        return self.sender_logins().check(session.virtual_server, session.authenticated_user, sender)

    @hookimpl(trylast=True)
    def smtpgw_rcpt_to(self, envelope: Envelope, recipient: str) -> Reply | Deferred:
        """Local domains are ours (their known recipients); everything else is refused unless a plugin
        (relay_acl) accepted it."""
        if self.gateway.config.is_local_domain(domain_of(recipient)):
            if not self.gateway.recipients.accepts(recipient):
                return R.user_unknown(recipient)
            refusal = self._new_mailbox_refusal(envelope, recipient)
            if isinstance(refusal, Deferred):
                return refusal.addCallback(lambda r: r or R.RECIPIENT_OK)
            return refusal or R.RECIPIENT_OK
        return R.RELAY_DENIED

    def _new_mailbox_refusal(self, envelope: Envelope, recipient: str) -> Reply | None | Deferred:
        """``max_new_mailboxes_per_message`` where any local part makes a mailbox (mta.delivery.recipients)."""
        local, _, domain = recipient.rpartition("@")
        table = self.gateway.recipients.table(domain)
        if table is None or not table.domain.any_local_part:
            return None
        return NewMailboxes.of(envelope).admit(table.domain, table.expand(local).mailboxes, self.gateway.reactor)

    @hookimpl(trylast=True)
    def smtpgw_next_hops(self, domain: str, connector: Connector | None) -> Deferred[Sequence[Hop]]:
        """Route by DNS MX (implicit MX from A/AAAA when there is none), on the connector's port."""
        port = connector.outbound.port if connector is not None else 25
        return self.gateway.resolver.mx_hops(domain, port)

    @hookimpl(trylast=True)
    def smtpgw_delivery_window(self, connector: Connector | None, envelope: QueueEntry) -> Hold | None:
        """The connector's schedule, or its oversize schedule for large mail (mta.delivery.windows)."""
        if connector is None:
            return None
        return delivery_window(connector, envelope, self.gateway.reactor.seconds())
