"""Pickup: moving what ``smtpgw sendmail`` left in the maildrop into the queue (Postfix's pickup).

Runs in the worker that answers the control socket for the whole gateway (worker 0): at start,
when ``smtpgw sendmail`` pokes it (control request ``{"op": "pickup"}``), and every ``interval``
seconds, so a message dropped while the gateway was down, or whose poke was lost, still goes out.
Reading the folder and the files happens in a thread (a disk scan never holds the reactor). Each
message is queued with the queue's own durability before its maildrop file is removed, so a crash in
between sends it twice rather than never. A file that is not a maildrop file is set aside once
(``maildrop/corrupt/``) and logged, never retried in a loop.
"""
from __future__ import annotations

import pwd
from typing import Any, Callable

from twisted.internet import defer, task, threads
from twisted.logger import Logger

from mta.spool import maildrop

log = Logger(namespace="smtpgw.pickup")

INTERVAL = 60.0


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


class Pickup:
    """Scans the maildrop; ``inject(sender, recipients, data, extra)`` queues one message durably."""

    def __init__(self, spool_dir: str, inject: Callable[..., defer.Deferred], reactor: Any,
                 interval: float = INTERVAL) -> None:
        self.spool_dir = spool_dir
        self._inject = inject
        self._reactor = reactor
        self.interval = interval
        self._loop: task.LoopingCall | None = None
        self._running: defer.Deferred | None = None
        self._again = False
        self._unreadable: str | None = None     # why the folder cannot be listed, said once

    def start(self) -> None:
        self._loop = task.LoopingCall(self.run)
        self._loop.clock = self._reactor
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("maildrop pickup stopped", f))

    def stop(self) -> defer.Deferred:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._running if self._running is not None else defer.succeed(None)

    def run(self) -> defer.Deferred:
        """Pick up everything waiting now; a poke during a run makes one more run after it."""
        if self._running is not None:
            self._again = True
            return self._running
        self._running = d = defer.ensureDeferred(self._drain())

        def done(result: Any) -> Any:
            self._running = None
            if self._again:
                self._again = False
                self.run()
            return result

        return d.addBoth(done)

    async def _drain(self) -> int:
        try:
            names = await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                                    maildrop.pending, self.spool_dir)
        except OSError as e:    # e.g. a file where the folder should be: say so once, keep polling
            why = f"{e.filename or maildrop.maildrop_dir(self.spool_dir)}: {e.strerror or e}"
            if why != self._unreadable:
                log.error("maildrop: cannot read {why}; mail from `smtpgw sendmail` waits until it can be",
                          why=why)
                self._unreadable = why
            return 0
        if self._unreadable is not None:
            log.info("maildrop: readable again")
            self._unreadable = None
        queued = 0
        for name in names:
            try:
                item = await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                                       maildrop.read, self.spool_dir, name)
            except FileNotFoundError:
                continue                        # another run took it
            except (maildrop.MaildropError, OSError) as e:
                await self._set_aside(name, e)
                continue
            user = _user_name(item.uid)
            try:
                queue_id = await self._inject(item.sender, item.recipients, item.data,
                                              {"submitted_by": user})
            except Exception as e:              # the spool refused: the file stays for the next run
                log.error("maildrop {name}: not queued, kept for the next pickup: {error}", name=name, error=e)
                break
            await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                            maildrop.remove, self.spool_dir, name)
            queued += 1
            log.info("{id}: uid={uid} from=<{sender}> nrcpt={n} (queued from the maildrop by {user})",
                     id=queue_id, uid=item.uid, sender=item.sender, n=len(item.recipients), user=user)
        return queued

    async def _set_aside(self, name: str, error: Exception) -> None:
        try:
            where = await threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                                    maildrop.set_aside, self.spool_dir, name)
        except OSError as e:
            log.error("maildrop {name}: unreadable ({error}) and cannot be set aside: {why}",
                      name=name, error=error, why=e)
            return
        log.error("maildrop {name}: unreadable, moved to {where}: {error}", name=name, where=where, error=error)
