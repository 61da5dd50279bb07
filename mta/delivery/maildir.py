"""Local delivery into one Maildir per recipient, in the form mail programs expect.

The spool keeps the message as it came over the wire (CRLF line ends); a Maildir file has LF line
ends, the ``Return-Path:`` of the envelope sender as its first line (RFC 5321 4.4: added at final
delivery) and a ``Delivered-To:`` naming the recipient, as Postfix's local(8) writes them.

Maildir needs no locks: a message is written under a unique name in ``tmp/``, made durable, then
linked into ``new/`` in one step, so a reader never sees half a message and a crash leaves at most a
stray file in ``tmp/``. The function blocks (open/write/fsync): callers run it in a thread.
"""
from __future__ import annotations

import itertools
import os
import socket
import time

_counter = itertools.count(1)       # next() on itertools.count is atomic under the GIL
_SUBDIRS = ("tmp", "new", "cur")


def safe_mailbox_name(local_part: str) -> str:
    """The folder name for a local part: lower-cased, refusing anything that could leave ``root`` or
    that is no plain name (a leading dot covers ``.`` and ``..``; quotes and spaces come from quoted
    local parts; control characters and backslashes have no place in a folder name)."""
    name = local_part.lower()
    if (not name or name.startswith(".") or len(name.encode("utf-8", "surrogatepass")) > 255
            or any(c in name for c in '/\\"') or (os.altsep and os.altsep in name)
            or any(ord(c) < 0x20 or ord(c) == 0x7f or c.isspace() for c in name)):
        raise ValueError(f"unsafe mailbox name {local_part!r}")
    return name


def delivery_headers(sender: str, recipient: str) -> bytes:
    """``Return-Path:`` (``<>`` for the null sender) and ``Delivered-To:``, LF-terminated."""
    return f"Return-Path: <{sender}>\nDelivered-To: {recipient}\n".encode("utf-8", "surrogateescape")


def already_delivered_to(chunks: list[bytes], recipient: str) -> bool:
    """Whether the header block already holds ``Delivered-To: recipient`` (a forwarding loop)."""
    head = b""
    for chunk in chunks:                # the first 64 KB: headers, without copying a big body
        head += bytes(chunk[:65536 - len(head)])
        if len(head) >= 65536:
            break
    head = head.split(b"\r\n\r\n", 1)[0].lower()
    wanted = b"delivered-to: " + recipient.lower().encode("utf-8", "surrogateescape")
    return any(line.strip() == wanted for line in head.split(b"\r\n"))


def to_lf(chunks: list[bytes]) -> bytes:
    """The wire form (CRLF) as a Unix mail file (LF); a CR not before LF is kept."""
    return b"".join(chunks).replace(b"\r\n", b"\n")


def _host_part(hostname: str) -> str:
    """The host in a Maildir file name; '/' and ':' are escaped as the Maildir convention asks."""
    host = hostname or socket.gethostname()
    return host.replace("/", "\\057").replace(":", "\\072")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: str) -> bool:
    """Create ``path`` if missing; True when it was created (its parent then needs an fsync)."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return False
    return True


def ensure_maildir(root: str, mailbox: str) -> str:
    """Create ``root/mailbox/{tmp,new,cur}`` as needed, syncing each directory that got a new entry."""
    root = os.path.abspath(root)
    created_root = False
    if not os.path.isdir(root):
        os.makedirs(root, 0o750, exist_ok=True)
        created_root = True
    box = os.path.join(root, safe_mailbox_name(mailbox))
    if _ensure_dir(box):
        _fsync_dir(root)
    if created_root:
        _fsync_dir(os.path.dirname(root))
    created_sub = False
    for sub in _SUBDIRS:
        created_sub = _ensure_dir(os.path.join(box, sub)) or created_sub
    if created_sub:
        _fsync_dir(box)
    return box


def unique_name(hostname: str) -> str:
    """``<seconds>.M<usec>P<pid>Q<counter>.<host>`` (the Maildir spec's recommended form)."""
    now = time.time()
    seconds = int(now)
    usec = int((now - seconds) * 1_000_000)
    return f"{seconds}.M{usec}P{os.getpid()}Q{next(_counter)}.{_host_part(hostname)}"


def deliver_to_maildir(root: str, mailbox: str, data: bytes | list[bytes], hostname: str,
                       headers: bytes = b"") -> str:
    """Write the message durably into ``root/<mailbox>/new/`` and return its final path.

    ``mailbox`` is the recipient's local part; it is lower-cased and must not be able to escape
    ``root`` (ValueError otherwise). The 2xx for a local recipient may only be recorded after this
    returns, since both the file and the ``new/`` entry have been fsynced by then.
    """
    box = ensure_maildir(root, mailbox)
    chunks = [bytes(data)] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    content = headers + to_lf(chunks)
    while True:
        name = unique_name(hostname)
        tmp_path = os.path.join(box, "tmp", name)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:          # another process reused our pid; just take the next number
            continue
        break
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        new_path = os.path.join(box, "new", name)
        try:
            os.link(tmp_path, new_path)
            os.unlink(tmp_path)
        except OSError:
            os.rename(tmp_path, new_path)        # filesystems without hard links
        _fsync_dir(os.path.join(box, "new"))
    except BaseException:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass
        raise
    return new_path
