"""The core's own behaviour, registered as the ``core`` plugin with ``trylast``.

Because the defaults are hook implementations like any other, a site plugin sits beside them and
answers first when it has an opinion; when nobody has, these decide.
"""
from __future__ import annotations

from typing import Any

from mta.plugin.hookspecs import hookimpl
from mta.smtp.address import domain_of
from mta.smtp.reply import Reply
from mta.delivery.windows import delivery_window
from mta.policy.senders import SenderLogins

RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")


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
    def smtpgw_mail_from(self, session, envelope, sender, params) -> Reply | None:
        """An authenticated user may send only as the addresses ``auth.senders`` gives them."""
        return self.sender_logins().check(session.virtual_server, session.authenticated_user, sender)

    @hookimpl(trylast=True)
    def smtpgw_rcpt_to(self, session, envelope, recipient, params) -> Reply:
        """Local domains are ours; everything else is refused unless a plugin (relay_acl) accepted it."""
        if self.gateway.config.is_local_domain(domain_of(recipient)):
            if not self.gateway.recipients.accepts(recipient):
                return Reply(550, "5.1.1", f"<{recipient}>: Recipient address rejected: User unknown")
            return Reply(250, "2.1.5", "Recipient OK")
        return RELAY_DENIED

    @hookimpl(trylast=True)
    def smtpgw_next_hops(self, envelope, domain, connector):
        """Route by DNS MX (implicit MX from A/AAAA when there is none), on the connector's port."""
        port = connector.outbound.port if connector is not None else 25
        return self.gateway.resolver.mx_hops(domain, port)

    @hookimpl(trylast=True)
    def smtpgw_delivery_window(self, connector, envelope):
        """The connector's schedule, or its oversize schedule for large mail (mta.delivery.windows)."""
        if connector is None:
            return None
        return delivery_window(connector, envelope, self.gateway.reactor.seconds())
