"""Checks arriving mail at the end of DATA and says what it found in one Authentication-Results header."""
from __future__ import annotations

from typing import Any

import dkim
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.config import Config, ConfigError
from mta.model.envelope import LOG_FIELDS, Envelope, Session
from mta.model.message import MessageData
from mta.model.netaddr import client_ip
from mta.plugin.hookspecs import hookimpl
from mta.smtp.reply import Reply
from smtpgw_plugins.dkim_sign.keys import SigningKey, read_key
from smtpgw_plugins.sender_auth.checks import Options, Results, check_message
from smtpgw_plugins.sender_auth.lookups import Lookups

log = Logger(namespace="smtpgw.sender_auth")
MAX_THREADS = 8                 # messages checked at once; DNS waits, not CPU, fill them

DEFAULTS = {"authserv_id": None, "spf": True, "dkim": True, "dmarc": True,
            "arc": {"verify": True, "seal": None}, "reject": {"spf_fail": False, "dmarc_reject": False},
            "trusted_networks": ()}


def settings_of(config: Config) -> dict[str, Any]:
    return config.plugins.settings.get("sender_auth") or DEFAULTS


def seal_key(config: Config) -> SigningKey | None:
    """``arc.seal: {domain, selector, key}`` read (RSA: RFC 8617 defines no other), or None."""
    seal = settings_of(config)["arc"]["seal"]
    if not seal:
        return None
    return read_key({**seal, "algorithm": "rsa-sha256"}, "plugins.sender_auth.arc.seal")


def arc_seal(chunks: list[bytes], key: SigningKey, authserv_id: str) -> list[bytes]:
    """Runs in a pool thread: the next ARC set (ARC-Seal, ARC-Message-Signature,
    ARC-Authentication-Results) over the message with our Authentication-Results on top."""
    return dkim.arc_sign(b"".join(chunks), key.selector.encode("ascii"), key.domain.encode("ascii"),
                         key.private, authserv_id.encode("ascii"))


def claims(authserv_id: str) -> Any:
    """A predicate for ``MessageData.remove_headers``: an Authentication-Results field whose
    authserv-id is ours (RFC 8601 5: a forged verdict in our name never passes through)."""
    ours = authserv_id.lower()
    return lambda name, value: name.lower() == "authentication-results" and _authserv_id(value) == ours


def _authserv_id(value: str) -> str:
    first = value.split(";", 1)[0].strip().split()
    return first[0].lower() if first else ""


class SenderAuth:
    """``plugins.sender_auth``: SPF, DKIM, ARC and DMARC verdicts on arriving mail; see README."""

    live_settings = ("*",)          # SIGHUP applies the whole section to the next message

    def __init__(self) -> None:
        self.settings: dict[str, Any] = dict(DEFAULTS)
        self.authserv_id = ""
        self.lookups: Lookups | None = None
        self.services: Any = None
        self.reactor: Any = None
        self._pool: Any = None
        self.config: Config | None = None
        self.seal: SigningKey | None = None

    @staticmethod
    def check_config(config: Config) -> None:
        """Before anything listens: the ARC sealing key, when one is configured, can be read."""
        seal_key(config)

    @hookimpl
    def smtpgw_configure(self, config: Config, services: Any) -> None:
        self.services, self.reactor = services, services.reactor
        dns = config.gateway.dns
        self.lookups = Lookups(dns.nameservers, dns.timeout)
        self.lookups.install_for_spf()
        self._apply(config, seal_key(config))

    @hookimpl
    def smtpgw_reload(self, config: Config) -> defer.Deferred:
        """SIGHUP: the checks, the refusals and the trusted networks apply to the next message; the
        sealing key is read again (in a thread), and one that cannot be read keeps the old settings."""
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), seal_key, config)

        def failed(failure: Any) -> None:
            failure.trap(ConfigError)
            log.error("SIGHUP: {error}; sender_auth keeps its settings", error=str(failure.value))

        return d.addCallbacks(lambda key: self._apply(config, key), failed)

    def _apply(self, config: Config, seal: SigningKey | None) -> None:
        self.config, self.seal = config, seal
        self.settings = settings_of(config)
        self.authserv_id = self.settings["authserv_id"] or config.gateway.hostname
        self.options = Options(self.settings["spf"], self.settings["dkim"], self.settings["dmarc"],
                               self.settings["arc"]["verify"])
        checks = [name for name, on in zip(("spf", "dkim", "dmarc", "arc"), (
            self.options.spf, self.options.dkim, self.options.dmarc, self.options.arc)) if on]
        refusing = [name for name, on in self.settings["reject"].items() if on]
        log.info("sender_auth: as {authserv_id}, checking {checks}; refusing on {refusing}; ARC seal {seal}",
                 authserv_id=self.authserv_id, checks=", ".join(checks) or "nothing",
                 refusing=", ".join(refusing) or "nothing",
                 seal=f"d={seal.domain} s={seal.selector}" if seal else "off")

    def _threads(self) -> Any:
        if self._pool is None:
            from twisted.python.threadpool import ThreadPool
            self._pool = ThreadPool(minthreads=0, maxthreads=MAX_THREADS, name="smtpgw-sender-auth")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        return self._pool

    def _trusted(self, session: Session) -> bool:
        ip = client_ip(session.peer_host)
        return ip is not None and any(ip.version == net.version and ip in net
                                      for net in self.settings["trusted_networks"])

    @hookimpl(tryfirst=True)
    def smtpgw_data(self, session: Session, envelope: Envelope, message: MessageData) -> defer.Deferred | None:
        """First of the verdict hooks, so every message is checked before anyone answers for it."""
        original = message.original()
        removed = message.remove_headers(claims(self.authserv_id))
        if removed:
            self._event("minimum", "forged Authentication-Results removed", envelope=envelope.id, count=removed)
        if session.authenticated_user or self._trusted(session):
            return None                 # a submission (signed, not verified) or a trusted network
        d = deferToThreadPool(self.reactor, self._threads(), check_message, self.lookups, self.options,
                              original, message.headers, session.peer_host, envelope.sender,
                              session.helo or "")
        return d.addCallback(self._checked, envelope, message)

    def _checked(self, results: Results, envelope: Envelope, message: MessageData) -> Reply | None:
        summary = results.summary()
        message.prepend_header("Authentication-Results", results.header_value(self.authserv_id))
        envelope.extra.setdefault(LOG_FIELDS, {})["auth"] = summary
        refusal = self._refusal(results)
        self._event("minimum" if refusal else "medium", "message refused" if refusal else "results",
                    envelope=envelope.id, sender=envelope.sender or "<>", results=summary,
                    **({"reply": str(refusal)} if refusal else {}))
        return refusal

    def _refusal(self, results: Results) -> Reply | None:
        reject = self.settings["reject"]
        if reject["dmarc_reject"] and results.dmarc is not None and results.dmarc.result == "fail" \
                and results.dmarc.policy == "reject":
            return Reply(550, "5.7.1", f"Email rejected per DMARC policy for {results.from_domain}")
        if reject["spf_fail"] and results.spf == "fail":
            return Reply(550, "5.7.23", f"SPF validation failed for {results.spf_identity}")
        return None

    @hookimpl(trylast=True)
    def smtpgw_before_queue(self, session: Session | None, envelope: Envelope,
                            message: MessageData) -> defer.Deferred | None:
        """``arc.seal``: a message we checked that leaves through a connector gets an ARC set, so the
        next hop can trust our verdicts after a forwarding (mailing lists, aliases) broke SPF or DKIM."""
        if self.seal is None or "auth" not in (envelope.extra.get(LOG_FIELDS) or {}):
            return None
        if all(self.config.is_local_domain(r.rpartition("@")[2]) for r in envelope.recipients):
            return None
        d = deferToThreadPool(self.reactor, self._threads(), arc_seal, message.chunks(), self.seal,
                              self.authserv_id)

        def sealed(fields: list[bytes]) -> None:
            for field in reversed(fields):          # ARC-Seal on top
                name, _, value = field.partition(b":")
                message.prepend_header(name.decode("ascii"), value.strip().decode("ascii"))
            self._event("medium", "ARC set added", envelope=envelope.id,
                        seal=f"d={self.seal.domain} s={self.seal.selector}")

        def failed(failure: Any) -> None:
            failure.trap(dkim.DKIMException)
            self._event("minimum", "ARC set not added", envelope=envelope.id, error=str(failure.value))

        return d.addCallbacks(sealed, failed)

    def _event(self, level: str, message: str, **fields: Any) -> None:
        if self.services is not None:
            self.services.hooks.event("categorizer", level, f"sender_auth: {message}", **fields)
