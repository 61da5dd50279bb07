"""The spool's file operations, with the durability order that the 250 after DATA relies on.

Shared by the spool writer process (the daemon's path, :mod:`mta.spool.writer`) and ``smtpgw
queue`` working on a stopped gateway's spool, so that both write files the same way: data synced
before the rename that makes a file visible under ``queue/``, and the rename made durable by an
fsync of the directory before anyone is told the write is done.
"""
from __future__ import annotations

import os
import stat
import threading
from typing import BinaryIO, Callable

IOV_MAX = 1024
STATE_SUFFIX = ".st"           # queue/<id>.st: the recipient states that supersede the header's
FINISHED_SUFFIX = ".st.done"   # queue/<id>.st.done: a finished message's states, for the moment of its removal


class IdInUse(Exception):
    """A new message's queue id already names a file: never overwrite a queued message."""


class NotAFile(Exception):
    """A name in the spool that is not a regular file (a directory, a FIFO, a device, a symbolic link)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str) -> BinaryIO:
    """Open a spool file for reading, refusing what the gateway never writes: a FIFO would block the
    reading thread forever, a symbolic link could point anywhere, a directory is not data. Raises
    :class:`NotAFile` naming what it is (OSError as ``open`` does for the rest)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise NotAFile("a symbolic link") from None
        raise e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise NotAFile(_kind(mode))
    return os.fdopen(fd, "rb")


def write_all(fd: int, chunks: list[bytes]) -> None:
    """writev in IOV_MAX batches, coping with short writes."""
    for start in range(0, len(chunks), IOV_MAX):
        batch = [memoryview(c) for c in chunks[start:start + IOV_MAX] if c]
        while batch:
            n = os.writev(fd, batch)
            while batch and n >= len(batch[0]):
                n -= len(batch[0])
                batch.pop(0)
            if batch and n:
                batch[0] = batch[0][n:]


def sync_data(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_synced(tmp: str, final: str, chunks: list[bytes]) -> None:
    """Write ``tmp``, sync its data, then rename it to ``final`` (the directory is not synced)."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, chunks)
            sync_data(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        unlink_quietly(tmp)
        raise


def write_new(tmp: str, final: str, chunks: list[bytes]) -> Callable[[], None]:
    """:func:`write_synced` for a new message; returns how to take it back if the directory sync fails."""
    if os.path.lexists(final):
        raise IdInUse(f"queue id already in use: {os.path.basename(final)}")
    write_synced(tmp, final, chunks)
    return lambda: unlink_quietly(final)


def unlink_message(path: str) -> None:
    """Forget a finished message. Its state file is first renamed to ``<id>.st.done``, then the message
    goes, then that name: a crash at any moment leaves a name saying the message was finished, so a
    start-up scan tells it from a state file whose message was lost (that one gets a report). The
    state file cannot simply go first: the message's header would then bring back recipients already
    delivered. A message that never had a state file costs the same syscalls as before."""
    done: str | None = path + FINISHED_SUFFIX
    try:
        os.rename(path + STATE_SUFFIX, done)
    except FileNotFoundError:
        done = None
    for p in (path, done):
        if p is not None:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def sync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSyncer:
    """Group commit of directory fsyncs, led by the writer threads themselves.

    A writer hands over its job only after its rename has finished. If no directory fsync is
    running, that writer becomes the leader: it takes everything handed over so far, runs one fsync
    of the directory (which therefore started after each of those renames and covers them all),
    reports the whole batch with one call of ``done``, and goes on while more arrived meanwhile.
    Otherwise it leaves its job to the running leader and goes back to the next write. So the
    other writers never wait for the directory and keep many file fsyncs in flight.
    """

    def __init__(self, fd: int, done: Callable[[list[int], BaseException | None], None]) -> None:
        self._fd = fd
        self._done = done
        self._lock = threading.Lock()
        self._pending: list[tuple[int, Callable[[], None] | None]] = []
        self._leading = False

    def submit(self, tag: int, undo: Callable[[], None] | None = None) -> None:
        """Called from a writer thread after its rename; ``undo`` runs (in the leader's thread) if
        the sync fails, so that a message the client will be told 4xx for is not delivered as well."""
        with self._lock:
            self._pending.append((tag, undo))
            if self._leading:
                return
            self._leading = True
        try:
            self._lead()
        except BaseException:
            with self._lock:        # never leave the leadership taken: the next writer leads
                self._leading = False
            raise

    def _lead(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._leading = False
                    return
                batch, self._pending = self._pending, []
            error: BaseException | None = None
            try:
                os.fsync(self._fd)
            except OSError as e:
                error = e
                for _, undo in batch:
                    if undo is not None:
                        undo()
            self._done([tag for tag, _ in batch], error)
