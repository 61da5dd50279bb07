"""relay_acl: who may relay through the gateway (the seed's Access tab, "Relay restrictions"), and what
each connector may carry (its Content Restrictions and Delivery Restrictions tabs).

Mail for a local domain is always accepted (the core's business), except local parts that ask for
routing (``%``, ``!``, a quoted ``@``) or cannot be a mailbox. Mail for any other domain is relayed
only for a client whose address is in the virtual server's ``relay.allow`` list, or that
authenticated when ``relay.allow_authenticated`` is true; everyone else gets ``550 5.7.1 Relaying
denied``. The core refuses non-local recipients too when nobody accepts them, so disabling this
plugin can only make the gateway stricter, never an open relay.

A relayed recipient must then have a connector whose restrictions let the message through: checked
at RCPT (sender, system/non-system, declared SIZE), at the end of DATA (real size, priority) and at
delivery (each connector tried). See :mod:`smtpgw_plugins.relay_acl.restrictions`.
"""
from smtpgw_plugins.relay_acl.plugin import RelayACL

__all__ = ["RelayACL"]
