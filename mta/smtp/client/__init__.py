"""Outbound SMTP: a pool of connections per next hop (``pool``), one connection's session (``session``),
reply parsing and DATA encoding (``wire``), a connector's TLS/AUTH/limits (``policy``), ETRN/ATRN
requests (``etrn``) and SMTPUTF8 on the way out (``smtputf8``).
"""
