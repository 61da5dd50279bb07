"""What operators use on a running gateway: the control socket (``control``) that ``smtpgw queue``
talks to, its fan-out to several workers (``fanout``), and the Prometheus endpoint (``metrics``).
"""
