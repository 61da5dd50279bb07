"""The ``smtpgw`` command: one module per administrative job (``queue``, ``dns``, ``etrn``,
``passwd``), the parser and ``check-config`` in ``main``. Commands import what they use when they
run, so that ``smtpgw --help`` stays fast.
"""
