"""Outbound SMTP: a pool of connections per next hop (``pool``), one connection's session (``session``),
reply parsing and DATA encoding (``wire``), a connector's TLS/AUTH/limits (``policy``), ETRN/ATRN
requests (``etrn``), SMTPUTF8 and REQUIRETLS on the way out (``smtputf8``, ``requiretls``), DANE
certificate matching (``dane``) and the outbound protocol log (``protocol_log``).
"""
