"""The spool writer: a small child process that does the spool's writes, fsyncs and unlinks.

Why a process and not threads: every message costs half a dozen blocking system calls (open,
writev, fdatasync, close, rename, unlink), and a thread in the gateway process has to win the
interpreter lock back from the busy reactor thread after each of them. Measured under the bench
load that was ~35 context switches per message and a spool write of ~10 ms around a 2.4 ms fsync.
In a process of its own the writer threads compete only with each other (and they mostly sleep in
the kernel), while the reactor pays one pipe write per request and one read per batch of replies,
the way Postfix hands queue files to its cleanup daemon.

Wire format, both directions over the child's stdin/stdout:

    request  = op(1) tag(4) tmp_len(2) final_len(2) data_len(8) tmp final data
    reply    = kind(1) tag(4) text_len(2) text

``op`` is N (new message: refuse an existing id), R (replace a state file) or U (unlink a message
and its state file). A reply of kind OK or BATCH means done and durable (ERROR carries the reason);
BATCH also marks the first reply after a directory fsync, which is how the parent counts the group
commits.

A new message is one commit where the spool's filesystem allows it (:func:`spool_files.one_commit_fs`,
decided once at start): the thread that wrote it answers as soon as its fsync returns. Elsewhere, and
for every state file, the directory fsync is group-committed as before (:mod:`mta.spool.files` says
why each is safe).
"""
from __future__ import annotations

import io
import os
import queue
import struct
import sys
import threading
from mta.spool import files as spool_files

REQUEST = struct.Struct("!cIHHQ")
REPLY = struct.Struct("!BIH")
OP_NEW, OP_REPLACE, OP_UNLINK = b"N", b"R", b"U"
OK, ERROR, BATCH = 0, 1, 3
THREADS = 3
READ_SIZE = 1 << 20             # the gateway's end makes the pipe this big (mta/spool/link.py)


def encode_request(op: bytes, tag: int, tmp: str, final: str, chunks: list[bytes]) -> list[bytes]:
    """The request as a list of buffers, so that message chunks are not joined in the parent."""
    t, f = os.fsencode(tmp), os.fsencode(final)
    return [REQUEST.pack(op, tag, len(t), len(f), sum(map(len, chunks))) + t + f, *chunks]


def encode_reply(kind: int, tag: int, text: str = "") -> bytes:
    raw = text.encode("utf-8", "replace")[:65535]
    return REPLY.pack(kind, tag, len(raw)) + raw


class ReplyReader:
    """Parent side: cuts the child's output into (kind, tag, text) replies."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int, str]]:
        buf = self._buf + data if self._buf else data
        out, pos, size = [], 0, REPLY.size
        while len(buf) - pos >= size:
            kind, tag, n = REPLY.unpack_from(buf, pos)
            if len(buf) - pos - size < n:
                break
            text = buf[pos + size:pos + size + n].decode("utf-8", "replace") if n else ""
            out.append((kind, tag, text))
            pos += size + n
        self._buf = buf[pos:]
        return out


# -- the child ---------------------------------------------------------------------------------------

class _Writer:
    """The child's work: read requests, run them on threads, answer (in batches where it can)."""

    def __init__(self, queue_dir: str, out_fd: int, one_commit: bool | None = None) -> None:
        self._out = out_fd
        self._one_commit = spool_files.one_commit_fs(queue_dir) if one_commit is None else one_commit
        self._out_lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._dir_fd = _open_queue(queue_dir)
        self._syncer = spool_files.DirSyncer(self._dir_fd, self._synced)
        self._threads = [threading.Thread(target=self._work, daemon=True) for _ in range(THREADS)]

    def _send(self, data: bytes) -> None:
        with self._out_lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._out, view):]

    def _synced(self, tags: list[int], error: BaseException | None) -> None:
        if error is not None:
            text = f"directory fsync failed: {error}"
            self._send(b"".join(encode_reply(ERROR, t, text) for t in tags))
        else:
            self._send(encode_reply(BATCH, tags[0]) + b"".join(encode_reply(OK, t) for t in tags[1:]))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            op, tag, tmp, final, data = job
            try:
                if op == OP_NEW and self._one_commit:
                    spool_files.write_committed(tmp, final, [data])
                    self._send(encode_reply(OK, tag))
                elif op == OP_NEW:
                    self._syncer.submit(tag, spool_files.write_new(tmp, final, [data]))
                elif op == OP_REPLACE:
                    spool_files.write_synced(tmp, final, [data])
                    self._syncer.submit(tag)
                else:
                    self._send(encode_reply(ERROR, tag, f"unknown request {op!r}"))
            except spool_files.IdInUse as e:
                self._send(encode_reply(ERROR, tag, str(e)))
            except Exception as e:
                self._send(encode_reply(ERROR, tag, f"{type(e).__name__}: {e}"))

    def _unlink(self, tag: int, final: str) -> None:
        try:
            spool_files.unlink_message(final)
        except Exception as e:
            self._send(encode_reply(ERROR, tag, f"{type(e).__name__}: {e}"))
        else:
            self._send(encode_reply(OK, tag))

    def run(self, in_fd: int) -> None:
        for t in self._threads:
            t.start()
        buf = bytearray()
        size = REQUEST.size
        # Read into one buffer kept for the process's life: os.read(fd, 1 MB) made a new 1 MB object
        # per read, an mmap, an mremap and an munmap a message (strace -c).
        pipe = io.FileIO(in_fd, "rb", closefd=False)
        space = memoryview(bytearray(READ_SIZE))
        while True:
            n = pipe.readinto(space)
            if not n:
                break
            buf += space[:n]
            pos = 0
            while len(buf) - pos >= size:
                op, tag, tl, fl, dl = REQUEST.unpack_from(buf, pos)
                end = pos + size + tl + fl + dl
                if len(buf) < end:
                    break
                p = pos + size
                tmp = os.fsdecode(bytes(buf[p:p + tl]))
                final = os.fsdecode(bytes(buf[p + tl:p + tl + fl]))
                if op == OP_UNLINK:     # no fsync: done here, without waking a thread for it
                    self._unlink(tag, final)
                else:
                    self._jobs.put((op, tag, tmp, final, bytes(buf[p + tl + fl:end])))
                pos = end
            del buf[:pos]
        for _ in self._threads:         # the parent closed our stdin: finish what was asked, then go
            self._jobs.put(None)
        for t in self._threads:
            t.join()


def _die_with_parent() -> None:
    """A writer outliving a kill -9'd gateway could still rename files into a queue that the
    restarted gateway has already scanned; Linux can tie our life to the parent's."""
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)         # PR_SET_PDEATHSIG
    except Exception:
        pass


def _open_queue(queue_dir: str) -> int:
    return os.open(queue_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def main(argv: list[str] | None = None) -> int:
    """``QUEUE_DIR PARENT_PID``: serve the gateway; ``--check QUEUE_DIR``: start as the gateway's
    writer would and stop (start-up's proof that the writer can run as the gateway's user). A problem
    is one line on stderr, which the gateway logs."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: python -m mta.spool.writer QUEUE_DIR PARENT_PID | --check QUEUE_DIR\n")
        return 2
    try:
        if argv[0] == "--check":
            fd = _open_queue(argv[1])
            os.close(fd)
            return 0
        _die_with_parent()
        if os.getppid() != int(argv[1]):      # the parent died before prctl took effect
            return 1
        writer = _Writer(argv[0], 1)
    except OSError as e:
        sys.stderr.write(f"cannot open {e.filename or argv[-1]}: {e.strerror or e}\n")
        return 1
    writer.run(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
