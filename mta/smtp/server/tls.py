"""The server's TLS context per virtual server: built from its certificate and key files at start-up,
re-read on SIGHUP (:mod:`mta.app.reload`), shared by STARTTLS and the implicit-TLS listeners (port 465)."""
from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from zope.interface import implementer
from mta.config import ConfigError

log = Logger(namespace="smtpgw.tls")


class TLSFileError(Exception):
    """A certificate or key file cannot be used; ``which`` is ``certificate`` or ``key``."""

    def __init__(self, which: str, problem: str) -> None:
        super().__init__(problem)
        self.which = which
        self.problem = problem


def _read(path: str, which: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSFileError(which, f"cannot read {path!r}: {e.strerror}") from None


def server_context(certificate: str, key: str) -> ssl.CertificateOptions:
    """TLS 1.2 or newer, with any intermediate certificates that follow the leaf in ``certificate``.

    Raises :class:`TLSFileError` naming the file at fault, also when the key does not belong to the
    certificate. Blocking file reads: call it at start-up or in a thread.
    Cryptography objects rather than pyOpenSSL ones: pyOpenSSL deprecates its own X509/PKey.
    """
    try:
        certs = x509.load_pem_x509_certificates(_read(certificate, "certificate"))
    except ValueError as e:
        raise TLSFileError("certificate", f"{certificate!r} holds no valid PEM certificate ({e})") from None
    try:
        private_key = load_pem_private_key(_read(key, "key"), password=None)
    except (ValueError, TypeError) as e:
        raise TLSFileError("key", f"{key!r} holds no valid unencrypted PEM private key ({e})") from None
    options = ssl.CertificateOptions(
        privateKey=private_key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        options.getContext()                    # builds the context now: checks the key fits the certificate
    except SSL.Error as e:
        raise TLSFileError("key", f"{key!r} does not match the certificate in {certificate!r} ({e})") from None
    return options


@implementer(IOpenSSLContextFactory)
class ServerTLS:
    """The virtual server's current TLS settings; :meth:`reload` swaps in new files for new connections.

    Connections already running keep the context they started with.
    """

    def __init__(self, certificate: str, key: str, name: str = "") -> None:
        self.certificate = certificate
        self.key = key
        self.name = name
        self.options = server_context(certificate, key)

    def getContext(self) -> SSL.Context:
        return self.options.getContext()

    def reload(self, reactor: Any) -> Any:
        """Re-read certificate and key in a thread; on a problem, log it and keep the old ones."""
        from twisted.internet.threads import deferToThreadPool

        d = deferToThreadPool(reactor, reactor.getThreadPool(), server_context, self.certificate, self.key)

        def swap(options: ssl.CertificateOptions) -> None:
            self.options = options
            log.info("{name}: TLS certificate {certificate} reloaded", name=self.name,
                     certificate=self.certificate)

        def failed(failure: Any) -> None:
            if failure.check(TLSFileError):
                log.error("{name}: TLS reload failed, keeping the previous certificate: tls.{which}: "
                          "{problem}", name=self.name, which=failure.value.which, problem=failure.value.problem)
            else:
                log.failure("{name}: TLS reload failed, keeping the previous certificate", failure,
                            name=self.name)
        return d.addCallbacks(swap, failed)


def check_tls_files(config: Any) -> None:
    """At start-up: every virtual server's certificate and key load and fit together (else a config
    error naming the key, before anything listens)."""
    for i, vs in enumerate(config.virtual_servers):
        if vs.tls.certificate and vs.tls.key:
            try:
                server_context(vs.tls.certificate, vs.tls.key)
            except TLSFileError as e:
                raise ConfigError(f"virtual_servers[{i}].tls.{e.which}", e.problem) from None
