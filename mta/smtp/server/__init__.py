"""Inbound SMTP: one session per client connection (``session``: the command state machine, where a
recipient is accepted or refused and a message handed to the queue), CHUNKING (``bdat``), AUTH
(``auth`` and its ``users`` file), STARTTLS contexts (``tls``), the message-memory budget and the
W3C protocol log.
"""
