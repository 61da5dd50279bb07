"""The maildrop: where ``smtpgw sendmail`` leaves a message for the gateway (Postfix's postdrop).

A local program (cron, a web application) must hear "done" only once its message cannot be lost,
whether the gateway runs or not. So ``smtpgw sendmail`` writes one file into ``<spool>/maildrop/``
with the queue's own durability order (data synced, renamed into place, directory synced: see
:mod:`mta.spool.files`), and the gateway's pickup (:mod:`mta.queue.pickup`) moves each file into the
queue at start, when ``smtpgw sendmail`` pokes it over the control socket, and every minute.

A file is one JSON line (sender, recipients, submitting user, time) followed by the message in wire
form (CRLF line ends, not dot-stuffed), as the queue stores it. The folder is writable by every
local user but not listable (mode 1733, like Postfix's maildrop with its setgid postdrop), and the
user a message came from is taken from the file's owner, not from what the file says.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass

from mta.spool.files import NotAFile, open_regular, sync_directory, unlink_quietly, write_synced

MAILDROP = "maildrop"
CORRUPT = "corrupt"
DIR_MODE = 0o1733
MAX_HEADER = 16 * 1024 * 1024        # the JSON line: a million recipients still fit


class MaildropError(Exception):
    """A maildrop file that cannot be read as one: it is set aside, never retried for ever."""


@dataclass(frozen=True)
class Dropped:
    """One message waiting in the maildrop."""

    name: str
    sender: str
    recipients: list[str]
    uid: int                # the file's owner: who submitted it
    submitted_at: float
    data: bytes


def maildrop_dir(spool: str) -> str:
    return os.path.join(spool, MAILDROP)


def ensure_dir(spool: str) -> str:
    """Create ``<spool>/maildrop`` (and the spool) if needed, with the drop-box mode whatever the umask."""
    path = maildrop_dir(spool)
    os.makedirs(spool, mode=0o750, exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        pass
    else:
        os.chmod(path, DIR_MODE)
        sync_directory(spool)
    return path


def drop(spool: str, sender: str, recipients: list[str], data: bytes) -> str:
    """Write one message durably into the maildrop; returns its file name. Raises OSError."""
    path = ensure_dir(spool)
    name = f"{time.time_ns():x}.{os.getpid()}.{secrets.token_hex(6)}"
    header = json.dumps({"sender": sender, "recipients": recipients, "time": time.time()},
                        separators=(",", ":")).encode("utf-8") + b"\n"
    tmp = os.path.join(path, "." + name)
    old = os.umask(0o022)         # readable by the gateway whoever submits; the folder is not listable
    try:
        write_synced(tmp, os.path.join(path, name), [header, data])
    finally:
        os.umask(old)
    sync_directory(path)
    return name


def pending(spool: str) -> list[str]:
    """File names waiting, oldest first (names start with the time); none when there is no folder."""
    try:
        names = os.listdir(maildrop_dir(spool))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if not n.startswith(".") and n != CORRUPT)


def read(spool: str, name: str) -> Dropped:
    """Read one maildrop file; MaildropError when it is not one (FileNotFoundError if it went away)."""
    path = os.path.join(maildrop_dir(spool), name)
    try:
        f = open_regular(path)      # the folder is writable by every local user: a FIFO there must not hang us
    except NotAFile as e:
        raise MaildropError(f"{name}: not a maildrop file ({e})") from None
    with f:
        uid = os.fstat(f.fileno()).st_uid
        line = f.readline(MAX_HEADER + 1)
        data = f.read()
    try:
        if not line.endswith(b"\n"):
            raise ValueError("no header line")
        head = json.loads(line)
        sender, recipients = head["sender"], head["recipients"]
        if not isinstance(sender, str) or not isinstance(recipients, list) or not recipients \
                or not all(isinstance(r, str) and r for r in recipients):
            raise ValueError("bad sender or recipients")
        return Dropped(name, sender, recipients, uid, float(head.get("time") or 0.0), data)
    except (ValueError, KeyError, TypeError) as e:
        raise MaildropError(f"{name}: not a maildrop file ({e})") from None


def remove(spool: str, name: str) -> None:
    """Forget a file once its message is queued (a crash before this queues it once more)."""
    unlink_quietly(os.path.join(maildrop_dir(spool), name))


def set_aside(spool: str, name: str) -> str:
    """Move an unreadable file to ``maildrop/corrupt/`` for the postmaster; returns where it went."""
    base = maildrop_dir(spool)
    os.makedirs(os.path.join(base, CORRUPT), mode=0o700, exist_ok=True)
    target = os.path.join(base, CORRUPT, name)
    os.replace(os.path.join(base, name), target)
    return target
