"""dkim_sign: DKIM signatures (RFC 6376, RSA and Ed25519 per RFC 8463) on mail leaving the gateway.

Signed at acceptance, before the message is spooled (the ``smtpgw_before_queue`` hook, after every
other plugin's header edits), so the queued copy carries the signature and each retry sends the same
bytes. dkimpy does the signing (on the reactor thread for small messages, in a pool thread for big
ones), with OpenSSL's RSA (openssl_rsa.py) and a canonicalization without no-op passes (relaxed.py);
keys are read with ``cryptography`` (keys.py).
"""
from smtpgw_plugins.dkim_sign.plugin import DkimSign

__all__ = ["DkimSign"]
