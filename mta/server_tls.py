"""The server's TLS context, built once per virtual server from its certificate and key files."""
from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet import ssl


def server_context(certificate: str, key: str) -> ssl.CertificateOptions:
    """TLS 1.2 or newer, with any intermediate certificates that follow the leaf in ``certificate``.

    Read at start-up (before anything listens), so the blocking file reads are harmless here.
    Cryptography objects rather than pyOpenSSL ones: pyOpenSSL deprecates its own X509/PKey.
    """
    with open(certificate, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    with open(key, "rb") as f:
        private_key = load_pem_private_key(f.read(), password=None)
    return ssl.CertificateOptions(
        privateKey=private_key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
