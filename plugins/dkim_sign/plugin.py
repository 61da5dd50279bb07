"""Signs accepted mail before it is spooled, so every delivery attempt sends the same signed bytes."""
from __future__ import annotations

from typing import Any, Sequence

import dkim
import dkim.util
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.config import Config, ConfigError
from mta.model.envelope import Envelope, Session
from mta.model.message import MessageData
from mta.plugin.hookspecs import hookimpl
from smtpgw_plugins.dkim_sign import openssl_rsa, relaxed
from smtpgw_plugins.dkim_sign.author import from_domain
from smtpgw_plugins.dkim_sign.keys import SigningKey, read_keys

log = Logger(namespace="smtpgw.dkim_sign")
SECTION = "plugins.dkim_sign"
HEADER = b"DKIM-Signature: "
# dkimpy looks its logger up (logging.getLogger) for every signer it makes unless handed one.
_DKIMPY_LOG = dkim.util.get_default_logger()
# Messages up to this size (times the keys that sign it) are signed on the reactor thread, bigger ones
# in a pool thread. Signing a 16 KB message with one key takes well under a millisecond (the RSA step in OpenSSL, dkimpy's
# canonicalization linear in the size), less than handing it to a thread and back costs the process in
# thread switches and contention for the interpreter lock; a big message's canonicalization and
# hashing (about 1 ms per 100 KB) never holds up the event loop.
INLINE_SIZE = 16 * 1024


def settings_of(config: Config) -> dict[str, Any]:
    return config.plugins.settings.get("dkim_sign") or {"keys": (), "headers": (), "sign": "relayed"}


def load_keys(config: Config) -> tuple[SigningKey, ...]:
    """Read every configured key; a missing or unreadable one raises ConfigError naming it."""
    return read_keys(settings_of(config)["keys"], f"{SECTION}.keys")


def sign_message(chunks: Sequence[bytes], keys: Sequence[SigningKey], headers: Sequence[str]) -> list[bytes]:
    """One DKIM-Signature field per key, relaxed/relaxed, the configured headers signed once per
    occurrence and From once more (oversigned: a From added later breaks the signature).

    dkimpy signs, with one signer for all the keys: the header section is parsed once, and the body
    reaches it already canonical (relaxed.split_message: canonicalized once from the chunks, never
    joined; dkimpy's canonicalization of it, relaxed.install, finds nothing left to change). A
    message that split_message leaves alone (a bare CR or LF, no header section) is joined and
    parsed by dkimpy as a whole."""
    split = relaxed.split_message(chunks)
    algorithm = keys[0].algorithm.encode("ascii")
    if split is None:
        signer = dkim.DKIM(b"".join(chunks), logger=_DKIMPY_LOG, signature_algorithm=algorithm, linesep=b"\r\n")
    else:
        signer = dkim.DKIM(split[0], logger=_DKIMPY_LOG, signature_algorithm=algorithm, linesep=b"\r\n")
        signer.body = split[1]
    signer.should_sign = {h.encode("ascii") for h in headers}
    signer.frozen_sign = {b"from"}
    include = signer.default_sign_headers()
    return [signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
                        signature_algorithm=key.algorithm.encode("ascii"),
                        canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
            for key in keys]


class DkimSign:
    """``plugins.dkim_sign``: ``keys`` (domain, selector, key, algorithm), ``headers``, ``sign``.

    A message is signed with every key whose domain is its From domain or a parent of it, when it
    has a recipient leaving through a connector (``sign: relayed``), or also for local delivery
    (``sign: all``; then only from clients that may relay, so mail from the Internet claiming one of
    our domains is never signed by us). Messages queued without an SMTP session (DSNs, smtpgw
    sendmail's, alias copies) are signed for their From domain; the gateway's reports (null sender)
    failing that for the postmaster's. Keys are read at start and on SIGHUP.
    """

    live_settings = ("*",)          # SIGHUP applies the whole section (keys read again)

    def __init__(self) -> None:
        self.config: Config | None = None
        self.keys: tuple[SigningKey, ...] = ()
        self.headers: tuple[str, ...] = ()
        self.sign = "relayed"
        self.reactor: Any = None
        self.services: Any = None

    @staticmethod
    def check_config(config: Config) -> None:
        """Before anything listens (``twistd smtpgw``, ``smtpgw check-config``): every key readable."""
        load_keys(config)

    @hookimpl
    def smtpgw_configure(self, config: Config, services: Any) -> None:
        self.services, self.reactor = services, services.reactor
        openssl_rsa.install()
        relaxed.install()
        self._apply(config, load_keys(config))

    def _apply(self, config: Config, keys: tuple[SigningKey, ...]) -> None:
        settings = settings_of(config)
        self.config, self.keys = config, keys
        self.headers, self.sign = tuple(settings["headers"]), settings["sign"]
        log.info("dkim_sign: {n} key(s): {keys}", n=len(keys),
                 keys=", ".join(f"{k.record_name} ({k.algorithm})" for k in keys) or "none")

    @hookimpl
    def smtpgw_reload(self, config: Config) -> defer.Deferred:
        """SIGHUP: read the keys again (in a thread); a broken file keeps the keys in use."""
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), load_keys, config)

        def failed(failure: Any) -> None:
            failure.trap(ConfigError)
            log.error("SIGHUP: {error}; dkim_sign keeps the keys it had", error=str(failure.value))

        return d.addCallbacks(lambda keys: self._apply(config, keys), failed)

    # -- which messages, which keys --------------------------------------------------------------

    def _wanted(self, session: Session | None, envelope: Envelope) -> bool:
        config = self.config
        if session is None:
            return True                 # DSNs, local programs' mail (smtpgw sendmail), alias copies
        if any(not config.is_local_domain(r.rpartition("@")[2]) for r in envelope.recipients):
            return True
        # sign: all -- local deliveries too, from clients trusted to relay (relay_acl sets relay_allowed)
        return self.sign == "all" and (session.relay_allowed or session.authenticated_user is not None)

    def keys_for(self, domain: str | None, report: bool = False) -> list[SigningKey]:
        """Every key whose domain is ``domain`` or a parent of it; for the gateway's own reports (no
        session, null sender), the postmaster's domain's keys when the From domain has none."""
        keys = [k for k in self.keys if domain and k.covers(domain)]
        if not keys and report:
            postmaster = self.config.gateway.postmaster.rpartition("@")[2].lower()
            keys = [k for k in self.keys if k.covers(postmaster)]
        return keys

    @hookimpl(trylast=True)
    def smtpgw_before_queue(self, session: Session | None, envelope: Envelope,
                            message: MessageData) -> defer.Deferred | None:
        if not self.keys or not self._wanted(session, envelope):
            return None
        domain = from_domain(message)
        keys = self.keys_for(domain, report=session is None and not envelope.sender)
        if not keys:
            return None
        if message.size * len(keys) <= INLINE_SIZE:
            try:
                fields = sign_message(message.chunks(), keys, self.headers)
            except dkim.DKIMException:
                self._failed(Failure(), envelope, domain)
            else:
                self._signed(fields, envelope, message, keys)
            return None
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), sign_message,
                              message.chunks(), keys, self.headers)
        return d.addCallbacks(self._signed, self._failed, callbackArgs=(envelope, message, keys),
                              errbackArgs=(envelope, domain))

    def _signed(self, fields: list[bytes], envelope: Envelope, message: MessageData,
                keys: list[SigningKey]) -> None:
        for field in reversed(fields):          # the first key's signature ends up on top
            message.prepend_header("DKIM-Signature", field[len(HEADER):].rstrip(b"\r\n").decode("ascii"))
        self._event("medium", "message signed", id=envelope.id,
                    signatures=", ".join(f"d={k.domain} s={k.selector} a={k.algorithm}" for k in keys))

    def _failed(self, failure: Any, envelope: Envelope, domain: str | None) -> None:
        """A message dkimpy cannot sign (say, a header it cannot parse) is queued unsigned, not refused."""
        failure.trap(dkim.DKIMException)
        self._event("minimum", "message not signed", id=envelope.id, domain=domain or "",
                    error=str(failure.value))

    def _event(self, level: str, message: str, **fields: Any) -> None:
        if self.services is not None:
            self.services.hooks.event("categorizer", level, f"dkim_sign: {message}", **fields)
