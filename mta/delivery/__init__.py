"""One delivery attempt: which connectors carry a domain (``connectors``), where the next hop is
chosen (``nexthops``: MX, implicit MX, null MX), when a connector may send (``windows``), the
attempt itself (``attempt``), local delivery (``maildir``, ``recipients``), per-destination shaping
(``shaping``) and the outbound TLS a destination requires (``tls_policy`` over MTA-STS: ``mta_sts``,
``sts_*``; DANE: ``dane``), with its reports (``tls_report``, ``tls_report_send``).
"""
