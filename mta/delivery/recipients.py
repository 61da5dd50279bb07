"""Who a local domain takes mail for: its recipient list, its aliases, ``+tag`` addresses, a catch-all.

Two questions, asked at two times. At RCPT (:class:`mta.policy.core.CorePolicy`): does this local
part exist? With a recipient list or aliases configured, an unknown one is refused there with
``550 5.1.1``, so nothing is accepted that would have to bounce later (Exchange's recipient
filtering, Postfix's ``local_recipient_maps``); without them any local part is taken, as before. At
delivery (:mod:`mta.delivery.attempt`): which mailboxes of this domain, and which addresses elsewhere,
does this recipient stand for?

Lookups are a set membership, so a list of 100,000 local parts costs the same per RCPT as one of
ten. Local parts compare case-insensitively. With a ``recipient_delimiter`` (``+``), ``alice+news``
is looked up whole first, then as ``alice``. A recipient list given as a file is read at start and
read again when the file changes (checked every few seconds, and on SIGHUP), in a thread.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.config.model import Config, LocalDomain
from mta.delivery.maildir import safe_mailbox_name
from mta.smtp import replies as R
from mta.smtp.reply import Reply

log = Logger(namespace="smtpgw.recipients")

CHECK_INTERVAL = 5.0        # seconds between looks at a recipient file's modification time
MAX_ALIAS_DEPTH = 10        # aliases of aliases; deeper is a loop in the configuration


@dataclass(frozen=True)
class Expansion:
    """What one recipient of a local domain stands for."""

    mailboxes: tuple[str, ...] = ()      # local parts of this domain: one Maildir each
    forward: tuple[str, ...] = ()        # full addresses elsewhere, each sent a copy through the queue

    @property
    def unknown(self) -> bool:
        return not self.mailboxes and not self.forward


def read_recipient_file(path: str) -> frozenset[str]:
    """One local part a line; '#' starts a comment; blank lines are skipped. Blocking: in a thread."""
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            name = line.split("#", 1)[0].strip().lower()
            if name:
                names.add(name)
    return frozenset(names)


class RecipientTable:
    """One local domain's recipients."""

    def __init__(self, domain: LocalDomain, delimiter: str | None) -> None:
        self.domain = domain
        self.delimiter = delimiter
        self.file = domain.recipients if isinstance(domain.recipients, str) else None
        self._names: frozenset[str] | None = (frozenset(domain.recipients)
                                              if isinstance(domain.recipients, tuple) else None)
        self._mtime: float | None = None
        if self.file is not None:
            self.load_file()            # at start, before anything listens: a missing file is an error

    # -- the file form --------------------------------------------------------------------------

    def load_file(self) -> None:
        """Read the recipient file (blocking); on failure the names read before are kept."""
        assert self.file is not None
        mtime = os.stat(self.file).st_mtime
        names = read_recipient_file(self.file)
        self._names, self._mtime = names, mtime

    def changed(self) -> bool:
        """Whether the file changed since it was read (a stat: cheap, done in a thread anyway)."""
        if self.file is None:
            return False
        try:
            return os.stat(self.file).st_mtime != self._mtime
        except OSError:
            return False                # gone for a moment (an editor's rename): keep what we have

    # -- lookups --------------------------------------------------------------------------------

    def _forms(self, local: str) -> list[str]:
        """``alice+news`` -> [``alice+news``, ``alice``]; the whole local part first."""
        local = local.lower()
        d = self.delimiter
        if d and d in local[1:]:
            return [local, local[:local.index(d, 1)]]
        return [local]

    def _known(self, name: str) -> bool:
        return name in self.domain.aliases or (self._names is not None and name in self._names)

    def accepts(self, local: str) -> bool:
        """RCPT time: False only when a recipient list or aliases exist and nothing matches."""
        if not self.domain.restricted:
            return True
        return any(self._known(form) for form in self._forms(local))

    def expand(self, local: str) -> Expansion:
        """Delivery time: the mailboxes and remote addresses ``local`` stands for."""
        mailboxes: dict[str, None] = {}
        forward: dict[str, None] = {}
        self._expand(local, mailboxes, forward, 0, set())
        if not mailboxes and not forward and self.domain.catch_all:
            self._expand(self.domain.catch_all, mailboxes, forward, 0, set())
        return Expansion(tuple(mailboxes), tuple(forward))

    def _expand(self, local: str, mailboxes: dict, forward: dict, depth: int, seen: set[str]) -> None:
        for form in self._forms(local):
            if form in self.domain.aliases:
                if depth >= MAX_ALIAS_DEPTH or form in seen:
                    log.warn("{domain}: alias {alias} loops or nests too deep; its mail stays with no "
                             "mailbox", domain=self.domain.name, alias=form)
                    return
                for target in self.domain.aliases[form]:
                    name, at, dom = target.rpartition("@")
                    if not at:
                        self._expand(target, mailboxes, forward, depth + 1, seen | {form})
                    elif dom == self.domain.name:
                        self._expand(name, mailboxes, forward, depth + 1, seen | {form})
                    else:
                        forward[target] = None
                return
            if self._names is None or form in self._names:
                # an unrestricted domain delivers "alice+news" to alice's mailbox
                mailboxes[self._forms(form)[-1] if self._names is None else form] = None
                return


class LocalRecipients:
    """The recipient tables of every local domain, and the watch on their files."""

    def __init__(self, config: Config, reactor: Any) -> None:
        self._reactor = reactor
        self.tables = {name: RecipientTable(d, config.gateway.recipient_delimiter)
                       for name, d in config.gateway.local_domains.items()}
        self._loop: task.LoopingCall | None = None

    def table(self, domain: str) -> RecipientTable | None:
        return self.tables.get(domain.lower().rstrip("."))

    def accepts(self, address: str) -> bool:
        local, _, domain = address.rpartition("@")
        table = self.table(domain)
        return table is None or table.accepts(local)

    def _files(self) -> Iterable[RecipientTable]:
        return [t for t in self.tables.values() if t.file is not None]

    def start(self) -> None:
        if not self._files():
            return
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = self._reactor
        self._loop.start(CHECK_INTERVAL, now=False).addErrback(
            lambda f: log.failure("recipient file watch stopped", f))

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def reload(self, reactor: Any = None) -> defer.Deferred:
        """SIGHUP (a ReloadService target): read every recipient file again."""
        return self._read([t for t in self._files()])

    def refresh(self) -> defer.Deferred:
        """Read again the files that changed (the stat and the read both in a thread)."""
        def changed() -> list[RecipientTable]:
            return [t for t in self._files() if t.changed()]

        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), changed)
        return d.addCallback(self._read)

    def _read(self, tables: list[RecipientTable]) -> defer.Deferred:
        def one(table: RecipientTable) -> defer.Deferred:
            d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), table.load_file)

            def done(_: Any) -> None:
                log.info("{domain}: recipients read again from {file}", domain=table.domain.name,
                         file=table.file)

            def failed(f: Any) -> None:
                log.error("{domain}: cannot read {file} ({error}); keeping the recipients read before",
                          domain=table.domain.name, file=table.file, error=f.getErrorMessage())
            return d.addCallbacks(done, failed)

        return defer.gatherResults([one(t) for t in tables]) if tables else defer.succeed(None)


def existing_mailboxes(root: str, names: Iterable[str]) -> set[str]:
    """Which of ``names`` already have a Maildir under ``root`` (blocking: in a thread). A name that
    can never be a mailbox counts as existing: delivery refuses it without creating anything."""
    found = set()
    for name in names:
        try:
            if os.path.isdir(os.path.join(root, safe_mailbox_name(name))):
                found.add(name)
        except ValueError:
            found.add(name)
    return found


class NewMailboxes:
    """One transaction's mailboxes in the local domains where any local part makes one (no recipient
    list, no aliases), held to ``local_domains.<d>.max_new_mailboxes_per_message``.

    Without it one message to 300 made-up local parts writes 300 copies and 1,200 folders. A
    recipient whose mailbox does not exist yet, past the limit, gets ``452 4.5.3``, so the client
    sends the rest later in another message. The disk is only asked (in a thread, a stat per
    mailbox not asked before) once a message names more mailboxes than the limit: ordinary mail
    costs nothing. Kept in ``envelope.extra``; not JSON, so it never goes to the queue.
    """

    KEY = "core.new_mailboxes"

    def __init__(self) -> None:
        self._exists: dict[str, dict[str, bool | None]] = {}   # domain -> mailbox -> exists (None: not asked)
        self._unasked: dict[str, list[str]] = {}               # domain -> the mailboxes still None above
        self._maybe_new: dict[str, int] = {}                   # domain -> mailboxes not known to exist

    @classmethod
    def of(cls, envelope: Any) -> "NewMailboxes":
        guard = envelope.extra.get(cls.KEY)
        if not isinstance(guard, cls):
            guard = envelope.extra[cls.KEY] = cls()
        return guard

    def admit(self, domain: LocalDomain, mailboxes: Iterable[str], reactor: Any) -> Reply | None | defer.Deferred:
        """None to accept the recipient that stands for ``mailboxes``, the 452 to refuse it, or a
        Deferred of either when the disk has to be asked."""
        known = self._exists.setdefault(domain.name, {})
        fresh = [m for m in dict.fromkeys(mailboxes) if m not in known]
        if not fresh:
            return None
        unasked = self._unasked.setdefault(domain.name, [])
        for m in fresh:
            known[m] = None
            unasked.append(m)
        maybe_new = self._maybe_new[domain.name] = self._maybe_new.get(domain.name, 0) + len(fresh)
        if maybe_new <= domain.max_new_mailboxes_per_message:
            return None
        self._unasked[domain.name] = []
        d = deferToThreadPool(reactor, reactor.getThreadPool(), existing_mailboxes, domain.maildir, unasked)
        return d.addCallback(self._decide, domain, unasked, fresh)

    def _decide(self, existing: set[str], domain: LocalDomain, asked: list[str], fresh: list[str]) -> Reply | None:
        known = self._exists[domain.name]
        for m in asked:
            known[m] = m in existing
        self._maybe_new[domain.name] -= len(existing)
        if self._maybe_new[domain.name] <= domain.max_new_mailboxes_per_message:
            return None
        for m in fresh:                 # refused: not part of this message after all
            if not known.pop(m):
                self._maybe_new[domain.name] -= 1
        return R.TOO_MANY_NEW_MAILBOXES
