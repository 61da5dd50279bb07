"""relay_acl: who may relay through the gateway (the seed's Access tab, "Relay restrictions").

Mail for a local domain is the core's business and always accepted there. Mail for any other domain is
relayed only for a client whose address is in the virtual server's ``relay.allow`` list, or that
authenticated when ``relay.allow_authenticated`` is true. For everyone else this plugin keeps quiet and
the core answers ``550 5.7.1 Relaying denied`` -- so disabling the plugin can only make the gateway
stricter, never an open relay.
"""
from smtpgw_plugins.relay_acl.plugin import RelayACL

__all__ = ["RelayACL"]
