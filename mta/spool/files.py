"""The spool's file operations, with the durability order that the 250 after DATA relies on.

Shared by the spool writer process (the daemon's path, :mod:`mta.spool.writer`) and ``smtpgw
queue`` working on a stopped gateway's spool, so that both write files the same way: a message
appears under ``queue/`` only by a rename of a complete file from ``tmp/``, and nobody is told the
write is done before data, inode and that rename are on disk.

Two ways to get there, chosen per spool by the filesystem that holds it (:func:`one_commit_fs`):

**One commit** (:func:`write_committed`; ext4, ext3, xfs, btrfs): write ``tmp/<id>.<n>``, rename it
to ``queue/<id>``, then ``fsync`` the file. Why that single fsync also makes the rename durable:

- ext4/ext3 with a journal, xfs: the rename changes the renamed inode (its ctime) in the same
  transaction as the two directory entries, and ``fsync`` (not ``fdatasync``, which may skip a
  ctime-only change) must commit the transaction that last changed the inode; the journal commits in
  order, so everything before it (the create in ``tmp/`` included) is on disk too.
- ext4 without a journal (some virtual machines' root filesystems): adding a name to a
  directory marks the inode "new entry", and ``fsync`` of such an inode also writes the directory
  that holds its current name (``ext4_sync_parent``: the kernel's own answer to "a crash may lose
  the file"); the rename's ``ext4_add_entry`` sets that mark, so ``queue/``'s block is written and
  flushed by the same call. Today's sequence cost two flushes there, the first spent on ``tmp/``.
- btrfs: ``fsync`` of an inode created in the running transaction logs its names with it (the
  log tree), so the rename is replayed with the file.

Costs one cache flush a message instead of two. What it gives up: a crash of the *machine* (not of
the gateway: after ``kill -9`` the page cache still holds everything) while that fsync runs can
leave ``queue/<id>`` on disk before all of its data, since the name was there before the sync.
That file was never acknowledged (the 250 waits for the fsync to return), and the start-up scan
recognises it: shorter than its header says (ext4 with a journal and btrfs only ever leave a
prefix, often nothing at all), or the right length with blocks that never got written (ext4
without a journal, xfs in rare orders of completion), which the CRC-32 of the message in the
header (``crc``) finds. Either way the file is moved to ``corrupt/`` with its log line, never
delivered, never a crash; a file from before the ``crc`` key is checked by its length alone.

**Directory fsync** (:func:`write_new` then :class:`DirSyncer`; everything else: ext2, tmpfs,
overlay, network filesystems, anything not recognised): ``fdatasync`` the file in ``tmp/``, rename,
then an fsync of ``queue/`` shared by every rename that finished before it started (group commit).
A name never appears before its data, so no file is ever torn; two flushes a message.

A state file (``<id>.st``) replaces an older one, so it always takes the second way: were its new
copy torn by a power cut after the rename, the old states would be gone with it. Removals are never
synced (a crash may bring a finished message back: a duplicate, never a loss).
"""
from __future__ import annotations

import os
import re
import stat
import threading
import zlib
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


def _refuse_taken(final: str) -> None:
    if os.path.lexists(final):
        raise IdInUse(f"queue id already in use: {os.path.basename(final)}")


def write_new(tmp: str, final: str, chunks: list[bytes]) -> Callable[[], None]:
    """:func:`write_synced` for a new message; returns how to take it back if the directory sync fails."""
    _refuse_taken(final)
    write_synced(tmp, final, chunks)
    return lambda: unlink_quietly(final)


def write_committed(tmp: str, final: str, chunks: list[bytes]) -> None:
    """A new message in one commit: write ``tmp``, rename it to ``final``, ``fsync`` it (only where
    :func:`one_commit_fs` says that fsync covers the rename; see the module docstring). If the fsync
    fails the name is taken back: the client is told 4xx, so the message must not be delivered."""
    _refuse_taken(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, chunks)
            os.rename(tmp, final)
        except BaseException:
            unlink_quietly(tmp)
            raise
        try:
            os.fsync(fd)
        except BaseException:
            unlink_quietly(final)
            raise
    finally:
        os.close(fd)


def checksum(chunks: list[bytes]) -> int:
    """The CRC-32 a message's header carries (``crc``), which finds a file torn by a power cut."""
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return crc


ONE_COMMIT_TYPES = frozenset({"ext4", "ext3", "xfs", "btrfs"})


def _unescape(field: str) -> str:
    """A mount point as /proc/self/mountinfo spells it (space, tab, newline, backslash in octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_type(path: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """The type of the filesystem holding ``path`` (the longest mount point above it), or None
    when the mount table cannot be read."""
    target = os.path.realpath(path)
    best, kind = "", None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" ")
        try:
            point, fstype = _unescape(fields[4]), fields[fields.index("-") + 1]
        except (IndexError, ValueError):
            continue
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):      # the later of two mounts on one point wins
            best, kind = point, fstype
    return kind


def one_commit_fs(path: str) -> bool:
    """Whether the file's own fsync after the rename makes a new message durable, name and all,
    on the filesystem holding ``path`` (the module docstring says why for each type listed)."""
    return mount_type(path) in ONE_COMMIT_TYPES


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
