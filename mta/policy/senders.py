"""Which sender addresses an authenticated user may use (Postfix's ``smtpd_sender_login_maps`` with
``reject_sender_login_mismatch``), per virtual server: ``virtual_servers[].auth.senders``.

Without it, a user who may submit mail could send as anyone (``alice`` as ``ceo@example.test``); a
submission service must stop that at MAIL FROM, where the client can still correct it. Entries are
full addresses or ``@domain`` for every address of a domain; addresses compare case-insensitively.
The null sender is not checked (bounces carry no owner), and neither are unauthenticated sessions:
relay.allow clients are trusted by address, as before. A file form is read at start and on SIGHUP.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.config.loader import read_sender_file
from mta.config.model import Config
from mta.smtp import replies as R
from mta.smtp.reply import Reply

log = Logger(namespace="smtpgw.senders")


def owns(patterns: tuple[str, ...], sender: str) -> bool:
    sender = sender.lower()
    domain = "@" + sender.rpartition("@")[2].rstrip(".")
    return any(p == sender or p == domain for p in patterns)


class SenderLogins:
    """The sender lists of every virtual server that has one."""

    def __init__(self, config: Config) -> None:
        self._sources = {vs.name: vs.auth.senders for vs in config.virtual_servers
                         if vs.auth.senders is not None}
        self._maps: dict[str, dict[str, tuple[str, ...]]] = {}
        self._read()                    # at start, before anything listens

    def _read(self) -> None:
        for name, source in self._sources.items():
            self._maps[name] = read_sender_file(source) if isinstance(source, str) else source

    def check(self, virtual_server: str, user: str | None, sender: str) -> Reply | None:
        """None when the sender may be used; the 553 when it may not."""
        table = self._maps.get(virtual_server)
        if table is None or not user or not sender:
            return None
        return None if owns(table.get(user, ()), sender) else R.sender_not_owned(user)

    def reload(self, reactor: Any) -> defer.Deferred:
        """SIGHUP (a ReloadService target): read the sender files again; a bad file keeps the old lists."""
        if not any(isinstance(s, str) for s in self._sources.values()):
            return defer.succeed(None)
        d = deferToThreadPool(reactor, reactor.getThreadPool(), self._read)
        return d.addErrback(lambda f: log.error("SIGHUP: {error}; the sender lists read before are kept",
                                                error=f.getErrorMessage()))
