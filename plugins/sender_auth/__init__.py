"""sender_auth: SPF (RFC 7208, MAIL FROM and HELO), DKIM (RFC 6376), ARC (RFC 8617) and DMARC
(RFC 7489) checks on arriving mail, reported in one Authentication-Results header (RFC 8601).

The checks run at the end of DATA, before any other plugin answers and before dkim_sign signs, in a
small pool of threads (pyspf and dkimpy block on DNS), against ``gateway.dns.nameservers``. A DNS
failure gives ``temperror``, never a refusal. Mail from authenticated clients and from
``trusted_networks`` is not checked; an incoming Authentication-Results header in our name is always
removed.
"""
from smtpgw_plugins.sender_auth.plugin import SenderAuth

__all__ = ["SenderAuth"]
