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
import struct
import sys
import threading
from mta.spool import files as spool_files

REQUEST = struct.Struct("!cIHHQ")
REPLY = struct.Struct("!BIH")
OP_NEW, OP_REPLACE, OP_UNLINK = b"N", b"R", b"U"
OK, ERROR, BATCH = 0, 1, 3
THREADS = 3
# How long a thread that wants the interpreter lock waits before it asks the holder to drop it.
# CPython's 5 ms default is paid in full whenever a worker's fsync returns (or a request arrives)
# while another thread of this process is running Python: the 250 waited on such hand-offs for most
# of its tail (bench/README.md, "where the 250 waits"). Nothing here computes for long, so a shorter
# slice costs no throughput; it is this process's own setting, the gateway's stays as it is.
SWITCH_INTERVAL = 0.0005
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
    """The child's work: read requests, run them on threads, answer (in batches where it can).

    Each of the threads takes its own next request off the pipe (one at a time, under a lock) and
    does it: a request goes from the pipe to the thread that writes it, without the queue that
    stood between a reading thread and the workers. That queue's wake-ups and interpreter-lock
    hand-offs were much of the writer's tail (bench/README.md, "where the 250 waits"); without it
    the writer switches context about a quarter less a message."""

    def __init__(self, queue_dir: str, out_fd: int, one_commit: bool | None = None) -> None:
        self._out = out_fd
        self._one_commit = spool_files.one_commit_fs(queue_dir) if one_commit is None else one_commit
        self._out_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._dir_fd = _open_queue(queue_dir)
        self._syncer = spool_files.DirSyncer(self._dir_fd, self._synced)

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

    def _next(self, pipe: io.BufferedReader) -> tuple[bytes, int, str, str, bytes] | None:
        """The next whole request, or None at the end of the input (the parent closed it)."""
        with self._read_lock:
            head = pipe.read(REQUEST.size)
            if len(head) < REQUEST.size:
                return None
            op, tag, tl, fl, dl = REQUEST.unpack(head)
            body = pipe.read(tl + fl + dl)
        if len(body) < tl + fl + dl:
            return None
        return op, tag, os.fsdecode(body[:tl]), os.fsdecode(body[tl:tl + fl]), body[tl + fl:]

    def _work(self, pipe: io.BufferedReader) -> None:
        while True:
            job = self._next(pipe)
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
                elif op == OP_UNLINK:
                    spool_files.unlink_message(final)
                    self._send(encode_reply(OK, tag))
                else:
                    self._send(encode_reply(ERROR, tag, f"unknown request {op!r}"))
            except spool_files.IdInUse as e:
                self._send(encode_reply(ERROR, tag, str(e)))
            except Exception as e:
                self._send(encode_reply(ERROR, tag, f"{type(e).__name__}: {e}"))

    def run(self, in_fd: int) -> None:
        # One buffer of the pipe's size: a read takes all that is waiting, as one read per batch did
        # before; the rest of a batch's requests are then cut from it without a system call.
        pipe = io.BufferedReader(io.FileIO(in_fd, "rb", closefd=False), READ_SIZE)
        threads = [threading.Thread(target=self._work, args=(pipe,), daemon=True) for _ in range(THREADS)]
        for t in threads:               # the parent closes our stdin: each finishes what it took, then goes
            t.start()
        for t in threads:
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
        sys.setswitchinterval(SWITCH_INTERVAL)
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
