"""What operators use on a running gateway: the control socket (``control``) that ``smtpgw queue``
and the console talk to, its fan-out to several workers (``fanout``), the Prometheus endpoint
(``metrics``), draining the gateway for maintenance (``drain``) and the "why" trace of a message
(``trace``).
"""
