"""The ``smtpgw`` command: one module per administrative job (``queue``, ``dns`` with ``sts_check``
and ``dane_check``, ``etrn``, ``passwd``, ``sendmail``, ``dkim``, ``cluster``, ``tls_rpt``), the
parser and ``check-config`` in ``main``, terminal-safe printing in ``output``. Commands import what they use when they
run, so that ``smtpgw --help`` stays fast.
"""
