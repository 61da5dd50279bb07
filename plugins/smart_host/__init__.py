"""smart_host: forward a connector's mail through its smart hosts instead of MX (the seed's
"Forward all mail through this connector to the following smart hosts").

A connector's ``smart_hosts`` override the smart host of the virtual server that carried the mail
(``virtual_servers[].smart_host``), as in Exchange. ``[host]`` or ``[IP]`` means "no MX lookup", as in
Postfix's relayhost; a bare name is looked up by MX, then A/AAAA. Disable the plugin and every connector
routes by MX.
"""
from smtpgw_plugins.smart_host.plugin import SmartHost

__all__ = ["SmartHost"]
