"""The "why" trace of a message that stays queued, kept beside it in the spool: ``trace/<id>``.

What ``smtpgw queue show`` and the console print as a message's steps (mta/ops/trace.py) is gathered
in memory as the gateway works; a message that is deferred or held has its steps appended here too,
so that they are still shown after the gateway restarts. One file per message, one JSON object (a
step) per line, appended as steps come; the file goes with the message.

Why this shape and not the message's state file: the state file is rewritten with an fsync only at
the end of an attempt, before that attempt's mail log lines exist, and it is on the path of every
deferral; a trace is diagnostics, so it is written without fsync (it survives a restart or a crash
of the gateway; a power cut may lose its last lines) by one thread of its own, in order, never by
the reactor thread. A message delivered at its first attempt never gets a file.

Bounded: a step's text is cut at :data:`MAX_TEXT` characters, and a file that grows past
:data:`MAX_BYTES` is rewritten with its last :data:`KEEP_LINES` steps.
"""
from __future__ import annotations

import json
import os
import queue
import threading
from typing import Any, Callable, Iterable

from twisted.internet import defer

TRACE_DIR = "trace"
MAX_TEXT = 2000
MAX_BYTES = 64 * 1024
KEEP_LINES = 100


def trace_dir(spool: str) -> str:
    return os.path.join(os.path.abspath(spool), TRACE_DIR)


def _path(folder: str, entry_id: str) -> str:
    if not entry_id or "/" in entry_id or entry_id.startswith("."):
        raise ValueError(f"invalid queue id {entry_id!r}")
    return os.path.join(folder, entry_id)


def _cut(step: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in step.items():
        if isinstance(value, str) and len(value) > MAX_TEXT:
            value = value[:MAX_TEXT] + "..."
        elif isinstance(value, dict):
            value = {str(k): (str(v)[:MAX_TEXT]) for k, v in value.items()}
        out[key] = value
    return out


def encode_steps(steps: Iterable[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(_cut(s), separators=(",", ":"), default=str).encode("utf-8") + b"\n" for s in steps)


def read_steps(folder: str, entry_id: str) -> list[dict[str, Any]] | None:
    """The steps kept for ``entry_id`` (None when there is no file); a line that does not parse (a
    write cut short by a crash) is left out."""
    try:
        with open(_path(folder, entry_id), "rb") as f:
            data = f.read(4 * MAX_BYTES)
    except (FileNotFoundError, NotADirectoryError):
        return None
    steps = []
    for line in data.splitlines():
        try:
            step = json.loads(line)
        except ValueError:
            continue
        if isinstance(step, dict) and isinstance(step.get("at"), (int, float)) and "text" in step:
            steps.append(step)
    return steps[-KEEP_LINES:]


def append_steps(folder: str, entry_id: str, steps: list[dict[str, Any]]) -> None:
    """Append (creating the folder and file as needed); past :data:`MAX_BYTES`, keep the last lines."""
    path = _path(folder, entry_id)
    data = encode_steps(steps)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > MAX_BYTES:
        kept = read_steps(folder, entry_id) or []
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(encode_steps(kept[-KEEP_LINES:]))
        os.replace(tmp, path)


def remove_steps(folder: str, entry_id: str) -> None:
    try:
        os.unlink(_path(folder, entry_id))
    except FileNotFoundError:
        pass


def tidy(folder: str, keep: Callable[[str], bool], owns: Callable[[str], bool] | None) -> set[str]:
    """At start-up: remove the files of messages no longer queued (of those this process owns) and
    any temporary file left; returns the ids whose files remain."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return set()
    kept = set()
    for name in names:
        entry_id = name.split(".", 1)[0] if name.endswith(".tmp") else name
        if owns is not None and not owns(entry_id):
            continue
        if name == entry_id and keep(entry_id):
            kept.add(entry_id)
            continue
        try:
            os.unlink(os.path.join(folder, name))
        except OSError:
            pass
    return kept


class TraceFiles:
    """The trace folder of one spool, written by one thread of its own in the order asked (a thread
    pool would not keep the order: a read must see every append asked before it)."""

    def __init__(self, reactor: Any, spool: str) -> None:
        self.reactor = reactor
        self.folder = trace_dir(spool)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="smtpgw-trace", daemon=True)
            self._thread.start()
            # "after": the traces' last flush is a "during" trigger; its appends are done first
            self.reactor.addSystemEventTrigger("after", "shutdown", self.stop)
        d: defer.Deferred = defer.Deferred()
        self._jobs.put((d, f, args))
        return d

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            d, f, args = job
            try:
                result = f(*args)
            except Exception as e:
                self.reactor.callFromThread(d.errback, e)
            else:
                self.reactor.callFromThread(d.callback, result)

    def append(self, entry_id: str, steps: list[dict[str, Any]]) -> defer.Deferred:
        return self._run(append_steps, self.folder, entry_id, steps)

    def read(self, entry_id: str) -> defer.Deferred:
        """Fires with the steps kept (None: no file), after every append asked before."""
        return self._run(read_steps, self.folder, entry_id)

    def remove(self, entry_id: str) -> defer.Deferred:
        return self._run(remove_steps, self.folder, entry_id)

    def tidy(self, keep: Callable[[str], bool], owns: Callable[[str], bool] | None) -> defer.Deferred:
        return self._run(tidy, self.folder, keep, owns)

    def stop(self) -> None:
        """Finish what was asked, then end the thread (after reactor shutdown: a few small appends)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(10)


__all__ = ["TraceFiles", "read_steps", "append_steps", "remove_steps", "trace_dir", "KEEP_LINES", "MAX_BYTES"]
