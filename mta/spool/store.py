"""The durable spool: queued messages and their per-recipient state, on disk or in memory.

The queue manager sees only the narrow interface below (put, read, update, remove, scan), in the
manner of OpenSMTPD's ``queue_backend``: :class:`Spool` keeps files, :class:`MemorySpool` keeps
dicts for unit tests. Neither knows anything about scheduling.

On-disk layout under the spool directory::

    tmp/          files being written; anything here at startup is an unfinished write and is removed
    queue/<id>    one file per message: a header line (magic + JSON: body length and the envelope
                  with its recipient states as queued) followed by the message bytes
    queue/<id>.st the current recipient states (same JSON envelope); supersedes the header's copy
    queue/<id>.st.done  a finished message's states while it is being removed (see unlink_message)
    corrupt/      files that could not be read (at scan time, or when an attempt needed the message),
                  kept for the postmaster; ``<id>.st`` there is the envelope as the queue last knew it,
                  with the reason under ``extra["corrupt"]``
    trace/<id>    the "why" steps of a message that stays queued (mta/spool/traces.py; not fsync'd)

Why this shape: the 250 after DATA waits for ``put()``, so put() is the hot path. One file per
message, written complete in ``tmp/`` and renamed into ``queue/``, so a gateway killed at any moment
never leaves a half-written message there. On ext4, xfs and btrfs one ``fsync`` of the file after
the rename makes data and name durable together (one commit a message); elsewhere the file is
synced before the rename and the rename by an fsync of ``queue/``, group-committed: one directory
fsync covers every rename that finished before it started. :mod:`mta.spool.files` gives the argument
for each, and why a power cut during the one commit can leave a torn file that was never acknowledged:
the header's length and CRC-32 (``crc``) let the scan below set such a file aside. Writes, syncs and
unlinks run in the spool writer, a child process with threads of its own (:mod:`mta.spool.writer`,
which says why not threads here), so that many fsyncs overlap (the journal batches them) and the
reactor thread never blocks on the disk. Reads and scans are rare and use the reactor's threads.

State updates are rare (only when an attempt leaves something pending) and always use the
tmp -> fdatasync -> rename -> directory fsync sequence, so a retry never resends to a recipient that
succeeded. ``remove()`` deliberately skips the directory fsync: a crash right after it can at worst
bring a finished message back, which then delivers again (a duplicate, never a loss).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
import zlib
from typing import Any, Callable, Iterable, Iterator

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.model.queue_entry import QueueEntry, RecipientState
from mta.spool.files import (FINISHED_SUFFIX, STATE_SUFFIX, NotAFile, checksum, open_regular, unlink_message,
                              unlink_quietly, write_synced)
from mta.spool.writer import OP_NEW, OP_REPLACE, OP_UNLINK
from mta.spool.link import WriterLink

log = Logger(namespace="smtpgw.spool")

MESSAGE_MAGIC = b"smtpgw-spool 1 "
STATE_MAGIC = b"smtpgw-state 1 "
SLICE = 500                            # recipients per call of the JSON encoder for a large envelope
_ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_ASIDE_SUFFIX = re.compile(r"\.\d+\.\d+$")     # what _move_aside adds to a name already taken
_WORKER_SUFFIX = re.compile(r"-\d{1,2}$")     # a queue id's owner (mta/workers/identity.py)
MOVED_FROM = "moved_from"       # entry.extra of a copy made when another worker took an entry over
CORRUPT_REASON = "corrupt"                     # extra key on an envelope kept in corrupt/: what was wrong


def _is_state_name(name: str) -> bool:
    return _ASIDE_SUFFIX.sub("", name).endswith(STATE_SUFFIX)


@dataclasses.dataclass
class CorruptMessage:
    """A message in ``corrupt/``: its id, the envelope when a file there still gives it, its files."""

    id: str
    entry: QueueEntry | None
    files: list[str]
    since: float                        # when it was moved there (the newest file's mtime)


@dataclasses.dataclass
class Damaged:
    """Something in ``queue/`` that a start-up scan could not queue: a message whose file is missing,
    truncated or unparsable, or a file the gateway never wrote. ``entry`` is the envelope when the
    message's header or state file still gives it: then its sender can be told."""

    name: str                           # the name under queue/ (a queue id, or what a stranger is called)
    reason: str                         # what is wrong, for the log line and the report
    entry: QueueEntry | None = None
    where: str = "moved to corrupt/"    # or "left in queue/: cannot move it (<why>)"

    def line(self, moved: bool = True) -> str:
        """The log line of a message nobody can be told about (the queue logs the others itself)."""
        where = self.where if moved else "the gateway moves it to corrupt/ when it starts"
        return f"queue/{self.name}: {self.reason}; {where}; no envelope to read, nobody is told"


@dataclasses.dataclass
class ScanResult:
    """What a start-up scan found: the entries to schedule, what it moved to ``corrupt/`` (for the
    queue to log and report as it does at run time), and notes for the log (repairs that lost nothing)."""

    entries: list[QueueEntry]
    damaged: list[Damaged]
    notes: list[str]

    def lines(self, moved: bool = True) -> list[str]:
        return self.notes + [d.line(moved) if d.entry is None else
                             f"queue/{d.name}: {d.reason}; {d.where if moved else 'not moved yet'}"
                             for d in self.damaged]


class SpoolError(Exception):
    """The spool cannot do what was asked (bad id, duplicate id, closed)."""


class CorruptFile(Exception):
    """A spool file that does not parse; scan() moves it to ``corrupt/``."""


def spool_problem(directory: str) -> str | None:
    """Why a gateway could not use ``directory`` as its spool, found without changing anything
    (``smtpgw check-config``); None when it can, a missing spool that can be created included."""
    path = os.path.abspath(directory)
    if os.path.lexists(path) and not os.path.isdir(path):
        return f"{path} is not a directory"
    if not os.path.exists(path):
        parent = os.path.dirname(path)
        while not os.path.lexists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            return f"{path} cannot be created: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{path} does not exist and cannot be created: {parent} is not writable"
        return None
    for sub in ("", "tmp", "queue", "corrupt"):
        folder = os.path.join(path, sub) if sub else path
        if os.path.lexists(folder) and not os.path.isdir(folder):
            return f"{folder} is not a directory"
        if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            return f"{folder} is not writable" + (" (read-only file system)" if _read_only(folder) else "")
        if os.path.isdir(folder) and not os.access(folder, os.R_OK):
            return f"{folder} is not readable"
    return None


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def prepare_spool(directory: str) -> None:
    """Create the spool's folders and prove that a file can be written there; at start-up, as the
    user the gateway runs as. Raises SpoolError with the reason."""
    path = os.path.abspath(directory)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise SpoolError(f"{path} is not a directory")
    tmp = os.path.join(path, "tmp")
    try:
        for folder in (path, tmp, os.path.join(path, "queue"), os.path.join(path, "corrupt")):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        for folder in ("queue", "corrupt"):             # read back at every start
            os.listdir(os.path.join(path, folder))
        probe = os.path.join(tmp, f"probe.{os.getpid()}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise SpoolError(f"{e.filename or path}: {e.strerror or e}") from None


def check_id(entry_id: str) -> str:
    """Ids become file names, so only a safe alphabet is allowed."""
    if not _ID_RE.match(entry_id) or entry_id.endswith((STATE_SUFFIX, FINISHED_SUFFIX)):
        raise SpoolError(f"invalid queue id {entry_id!r}")
    return entry_id


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_ENTRY_FIELDS = {f.name for f in dataclasses.fields(QueueEntry)}
_RCPT_FIELDS = {f.name for f in dataclasses.fields(RecipientState)}


def _entry_doc(entry: QueueEntry) -> dict[str, Any]:
    """``entry.to_dict()`` without its deep copy (``dataclasses.asdict``): the same JSON, for a
    fraction of the cost on the path of every message. Anything but the known shape takes the long way."""
    doc = dict(vars(entry))
    rcpts = doc.get("rcpts")
    if (type(entry) is not QueueEntry or doc.keys() != _ENTRY_FIELDS or type(rcpts) is not list
            or not all(type(r) is RecipientState and vars(r).keys() == _RCPT_FIELDS for r in rcpts)):
        return entry.to_dict()
    doc["rcpts"] = [vars(r) for r in rcpts]
    return doc


def encode_message_header(entry: QueueEntry, length: int, crc: int | None = None) -> bytes:
    """The first line of ``queue/<id>``; ``crc`` is :func:`checksum` of the message (what finds a
    file torn by a power cut, see :mod:`mta.spool.files`)."""
    doc: dict[str, Any] = {"len": length} if crc is None else {"len": length, "crc": crc}
    doc["entry"] = _entry_doc(entry)
    return MESSAGE_MAGIC + _ENCODER.encode(doc).encode("ascii") + b"\n"


def _sliced(value: Any) -> Iterator[str]:
    """The JSON of ``value``, long lists and dicts a slice at a time: each slice is one call of the C
    encoder, and between two of them the interpreter may switch threads, so encoding a large
    envelope in a thread never holds the reactor thread up for longer than one slice."""
    if isinstance(value, list) and len(value) > SLICE:
        yield "["
        for i in range(0, len(value), SLICE):
            yield ("," if i else "") + _ENCODER.encode(value[i:i + SLICE])[1:-1]
        yield "]"
    elif isinstance(value, dict) and all(type(k) is str for k in value):
        yield "{"
        if len(value) > SLICE:
            items = list(value.items())
            for i in range(0, len(items), SLICE):
                yield ("," if i else "") + _ENCODER.encode(dict(items[i:i + SLICE]))[1:-1]
        else:
            for n, (key, item) in enumerate(value.items()):
                yield ("," if n else "") + _ENCODER.encode(key) + ":"
                yield from _sliced(item)
        yield "}"
    else:
        yield _ENCODER.encode(value)


def encode_large_header(doc: dict[str, Any]) -> bytes:
    """:func:`encode_message_header` of a large envelope from its :func:`_entry_doc`, for a thread:
    the same bytes, a slice at a time."""
    return MESSAGE_MAGIC + "".join(_sliced(doc)).encode("ascii") + b"\n"


def encode_state(entry: QueueEntry) -> bytes:
    return STATE_MAGIC + _ENCODER.encode(_entry_doc(entry)).encode("ascii") + b"\n"


def decode_entry(doc: Any) -> QueueEntry:
    if not isinstance(doc, dict):
        raise CorruptFile("envelope is not an object")
    try:
        return QueueEntry.from_dict(doc)
    except (TypeError, ValueError, KeyError) as e:
        raise CorruptFile(f"bad envelope: {e}") from e


class Spool:
    """The filesystem spool. Needs a real reactor (its writes run in a child process)."""

    def __init__(self, directory: str, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.directory = os.path.abspath(directory)
        self.tmp_dir = os.path.join(self.directory, "tmp")
        self.queue_dir = os.path.join(self.directory, "queue")
        self.corrupt_dir = os.path.join(self.directory, "corrupt")
        self.reactor = reactor
        self._link: Any = None
        self._shutdown_trigger: Any = None
        self._seq = 0
        # Several workers on one spool (mta/workers/identity.py): the queue ids this process owns. Only those
        # are scanned and only their unfinished writes are cleaned up; None means every file.
        self.owns: Callable[[str], bool] | None = None
        # ids of copies found at the last scan that superseded one of ours (a hand-over interrupted
        # after the copy was written): their owner may not know of them yet
        self.superseded_by: list[str] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folders and drop unfinished writes; synchronous, for startup only. The writer
        process starts with the first write, so tools that only read never start one."""
        for d in (self.directory, self.tmp_dir, self.queue_dir, self.corrupt_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)
        for name in sorted(os.listdir(self.tmp_dir)):
            if self.owns is not None and not self.owns(name.split(".", 1)[0]):
                continue            # another worker's write in progress
            self._drop_unfinished(name)
        if self._link is None:
            self._link = WriterLink(self.reactor, self.queue_dir, SpoolError)
            self._shutdown_trigger = self.reactor.addSystemEventTrigger("during", "shutdown", self._stop_link)

    def _drop_unfinished(self, name: str) -> None:
        """One line per file left in ``tmp/``: a write cut short (kill -9, a crash), never told done, so
        nothing was promised on it; anything the gateway would not have written there stays put."""
        path = os.path.join(self.tmp_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            log.warn("spool: tmp/{name}: a directory the gateway did not make; left in place", name=name)
            return
        try:
            os.unlink(path)
        except OSError as e:
            log.warn("spool: tmp/{name}: an unfinished write; cannot remove it: {why}", name=name,
                     why=e.strerror or e)
            return
        log.warn("spool: tmp/{name}: an unfinished write (the gateway stopped during it, nothing was "
                 "promised on it); removed", name=name)

    def close(self) -> defer.Deferred:
        """Let the writer finish what it was sent, then stop it; call once nothing new is coming."""
        if self._shutdown_trigger is not None:
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        return self._stop_link()

    def _stop_link(self) -> defer.Deferred:
        link, self._link = self._link, None
        return link.stop() if link is not None else defer.succeed(None)

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._link is None:
            return defer.fail(SpoolError("spool is not open"))
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _write(self, op: bytes, entry_id: str, final: str, chunks: list[bytes]) -> defer.Deferred:
        link = self._link
        if link is None:
            return defer.fail(SpoolError("spool is not open"))
        self._seq += 1
        return link.request(op, os.path.join(self.tmp_dir, f"{entry_id}.{self._seq}"), final, chunks)

    @property
    def dir_syncs(self) -> int:
        """How many directory fsyncs have run (to see the group commit at work)."""
        return self._link.batches if self._link else 0

    @property
    def writer_pid(self) -> int | None:
        return self._link.pid if self._link else None

    def _path(self, entry_id: str) -> str:
        return os.path.join(self.queue_dir, check_id(entry_id))

    # -- the backend interface -------------------------------------------------------------------

    def put(self, entry: QueueEntry, chunks: list[bytes]) -> defer.Deferred:
        """Store a new message; fires (None) only once file and directory entry are on disk.

        The header of an envelope with more than :data:`SLICE` recipients (10,000 recipients with
        ORCPTs make megabytes of JSON) is encoded in a thread, so other sessions go on meanwhile;
        nobody else holds the new entry yet, and its own dicts are copied here first."""
        try:
            final = self._path(entry.id)
            length = sum(len(c) for c in chunks)
            crc = checksum(chunks)
            if len(entry.rcpts) <= SLICE:
                return self._write(OP_NEW, entry.id, final, [encode_message_header(entry, length, crc), *chunks])
            doc = {"len": length, "crc": crc, "entry": _entry_doc(entry)}
            doc["entry"]["rcpts"] = [dict(r) for r in doc["entry"]["rcpts"]]
        except Exception:
            return defer.fail()
        d = self._in_thread(encode_large_header, doc)
        return d.addCallback(lambda header: self._write(OP_NEW, entry.id, final, [header, *chunks]))

    def update(self, entry: QueueEntry) -> defer.Deferred:
        """Durably replace the recipient states (and extra) of a queued message."""
        try:
            final = self._path(entry.id) + STATE_SUFFIX
            data = encode_state(entry)
        except Exception:
            return defer.fail()
        return self._write(OP_REPLACE, entry.id + STATE_SUFFIX, final, [data])

    def read(self, entry_id: str) -> defer.Deferred:
        """The message bytes as queued."""
        try:
            path = self._path(entry_id)
        except Exception:
            return defer.fail()
        return self._in_thread(self._read_body, path)

    def remove(self, entry_id: str) -> defer.Deferred:
        """Forget a finished message. No directory fsync (see the module docstring)."""
        try:
            path = self._path(entry_id)
        except Exception:
            return defer.fail()
        return self._write(OP_UNLINK, entry_id, path, [])

    def load(self) -> defer.Deferred:
        """The start-up scan (in a thread): a :class:`ScanResult`; what cannot be queued is moved to
        ``corrupt/``, and the caller logs and reports it."""
        return self._in_thread(self._scan_collect)

    def load_entries(self, entry_ids: list[str]) -> defer.Deferred:
        """The entries with these ids as they are on disk (header, then state file), read in a
        thread: entries another worker has just handed to this one. Ids with no file are left out."""
        return self._in_thread(self._load_entries, list(entry_ids))

    def _load_entries(self, entry_ids: list[str]) -> list[QueueEntry]:
        entries = []
        for entry_id in entry_ids:
            path = self._path(entry_id)
            try:
                entry = self._load_header(path)
            except FileNotFoundError:
                continue
            if os.path.exists(path + STATE_SUFFIX):
                entry = self._load_state(path + STATE_SUFFIX, entry_id)
            entries.append(entry)
        return entries

    def scan(self) -> defer.Deferred:
        """Every queued entry (no message data), read in a thread; bad files are moved aside and logged."""
        return self.load().addCallback(_logged)

    def quarantine(self, entry: QueueEntry) -> defer.Deferred:
        """Move a message the queue cannot read out of ``queue/`` into ``corrupt/``, and write
        ``entry`` (the envelope as the queue knew it) there as ``<id>.st``; fires with the folder."""
        try:
            check_id(entry.id)
            record = encode_state(entry)
        except Exception:
            return defer.fail()
        return self._in_thread(self._quarantine_files, entry.id, record)

    def corrupt_messages(self) -> defer.Deferred:
        """What ``corrupt/`` holds, one :class:`CorruptMessage` per id (read in a thread)."""
        return self._in_thread(self.corrupt_messages_sync)

    def scan_sync(self, repair: bool = False) -> list[QueueEntry]:
        """:meth:`scan` for tools (no reactor, no thread). Read-only unless ``repair``: a tool
        looking at a live spool must not move the daemon's files around; problems are logged."""
        return _logged(self._scan_collect(repair), moved=repair)

    # -- the work done in threads ----------------------------------------------------------------

    @staticmethod
    def _read_body(path: str) -> bytes:
        try:
            f = open_regular(path)
        except NotAFile as e:
            raise CorruptFile(f"{path}: {e}, not a spool file") from None
        with f:
            raw = f.read()
        nl = raw.find(b"\n")
        if not raw.startswith(MESSAGE_MAGIC) or nl < 0:
            raise CorruptFile(f"{path}: not a spool file")
        try:
            doc = json.loads(raw[len(MESSAGE_MAGIC):nl])
            length, crc = doc["len"], doc.get("crc")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFile(f"{path}: bad header: {e}") from e
        body = raw[nl + 1:]
        if len(body) != length:
            raise CorruptFile(f"{path}: message is {len(body)} bytes, header says {length}")
        if crc is not None and checksum([body]) != crc:
            raise CorruptFile(f"{path}: {CRC_PROBLEM}")
        return body

    def _scan_collect(self, repair: bool = True) -> ScanResult:
        """Read ``queue/``. With ``repair`` (the daemon at start-up), what cannot be queued is moved to
        ``corrupt/``: a message with its envelope when one can be read (so ``smtpgw queue list`` shows
        it and the queue can tell its sender), anything else as it is. Tools pass ``repair=False``."""
        found = ScanResult([], [], [])
        names = set(os.listdir(self.queue_dir))
        owns = self.owns
        siblings = self._siblings(names) if owns is not None else {}
        self.superseded_by = []
        for name in sorted(names):
            base = name
            for suffix in (FINISHED_SUFFIX, STATE_SUFFIX):
                if name.endswith(suffix):
                    base = name[:-len(suffix)]
                    break
            if owns is not None and not owns(base):
                continue            # another worker's entry
            path = os.path.join(self.queue_dir, name)
            if name.endswith(FINISHED_SUFFIX):
                found.notes.append(f"queue/{base}: finished just before the gateway stopped; removed")
                if repair:
                    unlink_quietly(os.path.join(self.queue_dir, base))
                    unlink_quietly(path)
            elif name.endswith(STATE_SUFFIX):
                if base not in names and base + FINISHED_SUFFIX not in names:
                    self._scan_lost(base, found, repair)
            elif name + FINISHED_SUFFIX not in names:      # else removed with its marker
                newer = self._superseded(name, siblings)
                if newer is None:
                    self._scan_message(name, names, found, repair)
                    continue
                found.notes.append(f"queue/{name}: handed over to another worker as {newer}; this copy is dropped")
                self.superseded_by.append(newer)
                if repair:
                    unlink_message(path)
        found.entries.sort(key=lambda e: (e.received_at, e.id))
        return found

    @staticmethod
    def _siblings(names: set[str]) -> dict[str, list[str]]:
        """Message files that share an id but for the worker suffix, by that shared part: only a
        hand-over between workers (mta/workers/identity.py ``retag``) makes such a pair."""
        groups: dict[str, list[str]] = {}
        for name in names:
            if not name.endswith((STATE_SUFFIX, FINISHED_SUFFIX)) and not name.startswith("."):
                groups.setdefault(_WORKER_SUFFIX.sub("", name), []).append(name)
        return {base: group for base, group in groups.items() if len(group) > 1}

    def _superseded(self, name: str, siblings: dict[str, list[str]]) -> str | None:
        """The copy that replaced message ``name`` when another worker took it over, if that copy is
        on disk: the hand-over wrote it durably before removing this one, so the copy counts."""
        for other in siblings.get(_WORKER_SUFFIX.sub("", name), ()):
            if other == name:
                continue
            try:
                copy = self._load_header(os.path.join(self.queue_dir, other))
            except (CorruptFile, OSError, UnicodeError):
                continue
            if copy.extra.get(MOVED_FROM) == name:
                return other
        return None

    def _scan_message(self, name: str, names: set[str], found: ScanResult, repair: bool) -> None:
        path = os.path.join(self.queue_dir, name)
        entry: QueueEntry | None = None
        try:
            check_id(name)
        except SpoolError:
            why: str | None = "not a queue id: a file the gateway did not write"
        else:
            entry, why = self._inspect_message(path, name)
        state = name + STATE_SUFFIX
        if state in names:
            try:
                entry = self._load_state(os.path.join(self.queue_dir, state), name)
            except (CorruptFile, OSError, UnicodeError) as e:
                note = f"queue/{state}: state file {file_fault(e)}; moved to corrupt/"
                if why is None:
                    note += " (the message is delivered from its states as queued: a recipient may get it twice)"
                found.notes.append(note)
                if repair:
                    self._move_aside(os.path.join(self.queue_dir, state), state)
        if why is None:
            assert entry is not None
            found.entries.append(entry)
            return
        found.damaged.append(damaged := Damaged(name, why, entry))
        if repair:
            damaged.where = self._set_aside(name, why, entry)

    def _scan_lost(self, entry_id: str, found: ScanResult, repair: bool) -> None:
        """A state file without its message: the message file was lost (a finished message leaves
        ``.st.done`` instead, see unlink_message); the state file still gives the envelope."""
        name = entry_id + STATE_SUFFIX
        path = os.path.join(self.queue_dir, name)
        why = "message file missing"
        entry: QueueEntry | None = None
        try:
            check_id(entry_id)
            entry = self._load_state(path, entry_id)
        except SpoolError:
            why = "not a queue id: a file the gateway did not write"
        except (CorruptFile, OSError, UnicodeError) as e:
            why += f", and its state file {file_fault(e)}"
        found.damaged.append(damaged := Damaged(name if entry is None else entry_id, why, entry))
        if repair:
            damaged.where = self._set_aside(damaged.name, why, entry)

    def _inspect_message(self, path: str, name: str) -> tuple[QueueEntry | None, str | None]:
        """``(envelope or None, what is wrong or None)`` of a message file: a truncated message still
        gives its envelope. A header with ``crc`` has its message read and checked (one sequential read
        of the queue at start): only that finds a file of the right length torn by a power cut."""
        try:
            entry, size, expected, crc, start = self._read_header(path)
            if entry.id != name:
                return None, f"message file damaged: it holds queue id {entry.id!r}"
            if size != expected:
                return entry, f"message file damaged: {_size_problem(size, expected)}"
            if crc is not None and _body_checksum(path, start) != crc:
                return entry, f"message file damaged: {CRC_PROBLEM}"
        except (CorruptFile, OSError, UnicodeError) as e:
            return None, f"message file {file_fault(e)}"
        return entry, None

    def _set_aside(self, name: str, why: str, entry: QueueEntry | None) -> str:
        """Move a damaged message to ``corrupt/``: with its envelope (and the reason) when known, as
        the queue does at run time (:meth:`quarantine`); as it is otherwise. Returns where it went."""
        try:
            if entry is None:
                self._move_aside(os.path.join(self.queue_dir, name), name, quiet=False)
            else:
                entry.extra[CORRUPT_REASON] = why
                self._quarantine_files(entry.id, encode_state(entry))
        except OSError as e:
            return f"left in queue/: cannot move it to corrupt/ ({e.strerror or e})"
        return "moved to corrupt/"

    @classmethod
    def _load_header(cls, path: str) -> QueueEntry:
        entry, size, expected, _, _ = cls._read_header(path)
        if size != expected:
            raise CorruptFile(_size_problem(size, expected))
        return entry

    @staticmethod
    def _read_header(path: str) -> tuple[QueueEntry, int, int, int | None, int]:
        """``(envelope, file size, size the header promises, the message's CRC-32 or None, where the
        message starts)`` of a queued message. Its header line is
        read whatever its length: no cap below what :meth:`put` writes (64,000 recipients with long ORCPTs make 90 MB), or a message
        told 250 would be moved to ``corrupt/`` at the next start; the magic is checked first, so
        a file that is not ours is never read whole."""
        with _open(path) as f:
            if f.read(len(MESSAGE_MAGIC)) != MESSAGE_MAGIC:
                raise CorruptFile("no spool header")
            line = MESSAGE_MAGIC + f.readline()
            size = os.fstat(f.fileno()).st_size
        if not line.endswith(b"\n"):
            raise CorruptFile("no spool header")
        try:
            doc = json.loads(line[len(MESSAGE_MAGIC):])
            length, crc = doc["len"], doc.get("crc")
            entry = decode_entry(doc["entry"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CorruptFile(f"bad header: {e}") from e
        if not isinstance(length, int):
            raise CorruptFile("bad header: no message length")
        if crc is not None and not isinstance(crc, int):
            raise CorruptFile("bad header: a checksum that is not a number")
        return entry, size, len(line) + length, crc, len(line)

    @staticmethod
    def _load_state(path: str, entry_id: str) -> QueueEntry:
        with _open(path) as f:
            raw = f.read()
        if not raw.startswith(STATE_MAGIC) or not raw.endswith(b"\n"):
            raise CorruptFile("no state header")
        try:
            entry = decode_entry(json.loads(raw[len(STATE_MAGIC):]))
        except ValueError as e:
            raise CorruptFile(f"bad state: {e}") from e
        if entry.id != entry_id:
            raise CorruptFile(f"state is for {entry.id!r}")
        return entry

    def _quarantine_files(self, entry_id: str, record: bytes) -> str:
        path = os.path.join(self.queue_dir, entry_id)
        if os.path.lexists(path):
            self._move_aside(path, entry_id, quiet=False)
        unlink_quietly(path + STATE_SUFFIX)     # superseded by the queue's own copy, written next
        final = os.path.join(self.corrupt_dir, entry_id + STATE_SUFFIX)
        if os.path.lexists(final):
            final += f".{int(time.time())}.{os.getpid()}"
        write_synced(os.path.join(self.tmp_dir, f"{entry_id}.corrupt"), final, [record])
        return self.corrupt_dir

    def corrupt_messages_sync(self) -> list[CorruptMessage]:
        """:meth:`corrupt_messages` for tools and threads; only this worker's ids (see ``owns``)."""
        try:
            names = os.listdir(self.corrupt_dir)
        except FileNotFoundError:
            return []
        groups: dict[str, list[str]] = {}
        for name in names:
            base = _ASIDE_SUFFIX.sub("", name)
            entry_id = base[:-len(STATE_SUFFIX)] if base.endswith(STATE_SUFFIX) else base
            if self.owns is None or self.owns(entry_id):
                groups.setdefault(entry_id, []).append(name)
        for entry_id in [i for i in groups if os.path.lexists(os.path.join(self.queue_dir, i))]:
            del groups[entry_id]    # a damaged state file set aside; the message itself is still queued
        found = []
        for entry_id, files in sorted(groups.items()):
            files.sort(key=lambda n: (not _is_state_name(n), n))    # the envelope from a state file first
            entry, since = None, 0.0
            for name in files:
                path = os.path.join(self.corrupt_dir, name)
                try:
                    since = max(since, os.lstat(path).st_mtime)
                    if entry is None:
                        entry = (self._load_state(path, entry_id) if _is_state_name(name)
                                 else self._load_header(path))
                except (CorruptFile, OSError, UnicodeError):
                    continue
            found.append(CorruptMessage(entry_id, entry, files, since))
        return found

    def _move_aside(self, path: str, name: str, quiet: bool = True) -> None:
        """Rename ``path`` into ``corrupt/``; a failure is logged (``quiet``) or raised."""
        target = os.path.join(self.corrupt_dir, name)
        if os.path.lexists(target):
            target += f".{int(time.time())}.{os.getpid()}"
        try:
            os.rename(path, target)
        except OSError as e:
            if not quiet:
                raise
            log.error("spool: cannot move {path} to corrupt/: {why}", path=path, why=e.strerror or e)


def _open(path: str) -> Any:
    try:
        return open_regular(path)
    except NotAFile as e:
        raise CorruptFile(f"{e}, not a spool file") from None


CRC_PROBLEM = "the message does not match its checksum (a write cut short by a power cut?)"
READ_BLOCK = 1 << 20


def _body_checksum(path: str, start: int) -> int:
    """:func:`checksum` of a message file from ``start`` on, a block at a time (any size of message)."""
    crc = 0
    with _open(path) as f:
        f.seek(start)
        while block := f.read(READ_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _size_problem(size: int, expected: int) -> str:
    return f"file is {size} bytes, expected {expected}" + (" (truncated)" if size < expected else "")


def file_fault(error: BaseException) -> str:
    """What is wrong with a spool file, after "message file " or "state file ": ``missing``,
    ``unreadable: <why>``, ``damaged: <what>`` (the log line and the 5.3.0 report say it)."""
    if isinstance(error, FileNotFoundError):
        return "missing"
    if isinstance(error, OSError):
        return f"unreadable: {error.strerror or error}"
    return f"damaged: {error}"


def _logged(found: ScanResult, moved: bool = True) -> list[QueueEntry]:
    for line in found.lines(moved):
        log.warn("spool: {problem}", problem=line)
    return found.entries


class MemorySpool:
    """The same interface kept in memory; every Deferred fires at once. For unit tests.

    Entries are stored as JSON round-trips, so what comes back is a copy (as from disk) and a
    non-JSON ``extra`` fails here just as it would on disk.
    """

    def __init__(self) -> None:
        self.messages: dict[str, bytes] = {}
        self.states: dict[str, str] = {}
        self.corrupt: dict[str, str] = {}
        self.puts = self.updates = self.removes = 0
        self.opened = False

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.opened = False

    def put(self, entry: QueueEntry, chunks: Iterable[bytes]) -> defer.Deferred:
        try:
            check_id(entry.id)
            if entry.id in self.messages:
                raise SpoolError(f"queue id already in use: {entry.id}")
            self.states[entry.id] = json.dumps(entry.to_dict())
        except Exception:
            return defer.fail()
        self.messages[entry.id] = b"".join(chunks)
        self.puts += 1
        return defer.succeed(None)

    def read(self, entry_id: str) -> defer.Deferred:
        if entry_id not in self.messages:
            return defer.fail(FileNotFoundError(entry_id))
        return defer.succeed(self.messages[entry_id])

    def update(self, entry: QueueEntry) -> defer.Deferred:
        try:
            if entry.id not in self.messages:
                raise SpoolError(f"no such queue entry: {entry.id}")
            self.states[entry.id] = json.dumps(entry.to_dict())
        except Exception:
            return defer.fail()
        self.updates += 1
        return defer.succeed(None)

    def remove(self, entry_id: str) -> defer.Deferred:
        self.messages.pop(entry_id, None)
        self.states.pop(entry_id, None)
        self.removes += 1
        return defer.succeed(None)

    def scan(self) -> defer.Deferred:
        return defer.succeed(self.scan_sync())

    def load(self) -> defer.Deferred:
        return defer.succeed(ScanResult(self.scan_sync(), [], []))

    def load_entries(self, entry_ids: list[str]) -> defer.Deferred:
        return defer.succeed([self.get(i) for i in entry_ids if i in self.messages])

    def quarantine(self, entry: QueueEntry) -> defer.Deferred:
        self.messages.pop(entry.id, None)
        self.states.pop(entry.id, None)
        self.corrupt[entry.id] = json.dumps(entry.to_dict())
        return defer.succeed("corrupt/")

    def corrupt_messages(self) -> defer.Deferred:
        return defer.succeed([CorruptMessage(i, QueueEntry.from_dict(json.loads(s)), [i + STATE_SUFFIX], 0.0)
                              for i, s in sorted(self.corrupt.items())])

    def scan_sync(self, repair: bool = False) -> list[QueueEntry]:
        entries = [QueueEntry.from_dict(json.loads(s)) for s in self.states.values()]
        return sorted(entries, key=lambda e: (e.received_at, e.id))

    def get(self, entry_id: str) -> QueueEntry:
        """The stored copy of one entry (tests)."""
        return QueueEntry.from_dict(json.loads(self.states[entry_id]))

    def get_corrupt(self, entry_id: str) -> QueueEntry:
        """The envelope of a message moved to ``corrupt/`` (tests)."""
        return QueueEntry.from_dict(json.loads(self.corrupt[entry_id]))
