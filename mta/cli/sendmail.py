"""``smtpgw sendmail``: mail from local programs, the way every Unix program expects to send it.

    smtpgw sendmail [-c FILE] [-f SENDER] [-t] [-i] [-F NAME] [RECIPIENT...] < message
    sendmail [-f SENDER] [-t] [-i] [-F NAME] [RECIPIENT...] < message   # the same, config from $SMTPGW_CONFIG

Cron, web applications and scripts call ``sendmail``; they cannot be made to speak SMTP. The message
is written durably into the spool's maildrop (:mod:`mta.spool.maildrop`) and the running gateway is
asked to pick it up now; when the gateway is down, it is picked up at the next start. Exit status 0
therefore means "durably queued", whether the gateway runs or not, as with Postfix's postdrop.
Exit statuses follow sysexits.h: 64 usage, 65 bad message, 75 temporary failure (nothing was
queued: try again), 78 configuration error.

As Postfix's sendmail does: a line holding a single ``.`` ends the message unless ``-i`` (or
``-oi``) is given; ``-t`` takes the recipients from To:, Cc: and Bcc: (added to those named on the
command line) and removes Bcc:; missing From:, Date: and Message-ID: headers are added; a bare
``user`` is ``user@<gateway.hostname>``; the sender defaults to the login name at that host.
"""
from __future__ import annotations

import argparse
import os
import pwd
import re
import secrets
import sys
import time
from email.utils import formatdate, getaddresses
from typing import BinaryIO

from mta.cli.main import add_config_option, command, main
from mta.config import Config, ConfigError, format_config_error

EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL, EX_CONFIG = 0, 64, 65, 75, 78
POKE_TIMEOUT = 5.0
_ADDRESS = re.compile(r"^[^\s<>()@,;:\\\"\[\]]+(@[A-Za-z0-9.\-\[\]:]+)?$")


class SendmailError(Exception):
    """What to tell the calling program, and with which sysexits status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def read_message(stream: BinaryIO, dot_ends: bool) -> bytes:
    """The message in wire form (CRLF line ends), as the queue stores it; LF or CRLF accepted."""
    lines = []
    for raw in stream:
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if dot_ends and line == b".":
            break
        lines.append(line)
    return b"".join(line + b"\r\n" for line in lines)


def split_message(data: bytes) -> tuple[list[bytes], bytes]:
    """Header lines (continuations joined to their field, CRLF kept) and the body after the blank line."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep and not re.match(rb"^[!-9;-~]+:", data):     # no header block at all: all body
        return [], data
    fields: list[bytes] = []
    for line in (head + b"\r\n").split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line + b"\r\n"
        else:
            fields.append(line + b"\r\n")
    return fields, body if sep else b""


def _name(field: bytes) -> str:
    return field.split(b":", 1)[0].strip().lower().decode("ascii", "replace")


def _value(field: bytes) -> str:
    return field.split(b":", 1)[1].decode("utf-8", "replace") if b":" in field else ""


def qualify(address: str, hostname: str) -> str:
    """``user`` -> ``user@hostname``; anything that is not a plain address is a usage error."""
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    if not _ADDRESS.match(address):
        raise SendmailError(EX_USAGE, f"{address!r} is not a mail address")
    return address if "@" in address else f"{address}@{hostname}"


def prepare(data: bytes, sender: str, recipients: list[str], config: Config, *, from_headers: bool,
            full_name: str | None, uid: int) -> tuple[bytes, list[str]]:
    """The message as queued and its recipients: headers extracted (-t), Bcc removed, missing added."""
    host = config.gateway.hostname
    fields, body = split_message(data)
    rcpts = [qualify(r, host) for r in recipients]
    if from_headers:
        found = [addr for f in fields if _name(f) in ("to", "cc", "bcc")
                 for _, addr in getaddresses([_value(f)]) if addr]
        rcpts += [qualify(a, host) for a in found]
        fields = [f for f in fields if _name(f) != "bcc"]
    if not rcpts:
        raise SendmailError(EX_USAGE, "no recipients: name them on the command line, or use -t")
    names = {_name(f) for f in fields}
    added = [f"Received: by {host} (smtpgw sendmail, from userid {uid}); {formatdate(localtime=True)}"]
    if "from" not in names:
        who = f'"{full_name}" <{sender}>' if full_name else (f"<{sender}>" if sender else "<>")
        added.append(f"From: {who}")
    if "date" not in names:
        added.append(f"Date: {formatdate(localtime=True)}")
    if "message-id" not in names:
        added.append(f"Message-ID: <{time.strftime('%Y%m%d%H%M%S')}.{secrets.token_hex(8)}@{host}>")
    head = b"".join(a.encode("utf-8") + b"\r\n" for a in added) + b"".join(fields)
    return head + b"\r\n" + body, list(dict.fromkeys(rcpts))


def login_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def poke(config: Config) -> bool:
    """Ask a running gateway to pick the maildrop up now; False when none answers (it will at start)."""
    from mta.cli.queue import ControlError, ask
    try:
        return ask(config.gateway.control_socket_path, {"op": "pickup"}, timeout=POKE_TIMEOUT) is not None
    except (ControlError, OSError):
        return False


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    parser.add_argument("-f", dest="sender", metavar="SENDER", help="envelope sender (default: you@hostname; "
                                                                      "-f '<>' for the null sender)")
    parser.add_argument("-t", dest="from_headers", action="store_true",
                        help="also take recipients from To:, Cc: and Bcc: (Bcc: is removed)")
    parser.add_argument("-i", dest="dot_ends", action="store_false", default=True,
                        help="a line with a single '.' does not end the message")
    parser.add_argument("-F", dest="full_name", metavar="NAME", help="the sender's full name, for an added From:")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTION",
                        help="sendmail -o options: -oi is -i; others are accepted and ignored")
    parser.add_argument("-b", dest="mode", default="m", metavar="MODE",
                        help="sendmail -b modes: only -bm (deliver mail, the default) is supported")
    parser.add_argument("recipients", nargs="*", metavar="RECIPIENT")


@command("sendmail", "queue a message from standard input, as sendmail does (for local programs)", _arguments)
def sendmail(args: argparse.Namespace) -> int:
    """Exit 0 only once the message is durably in the maildrop."""
    from mta.app.preflight import load_checked
    from mta.spool import maildrop
    try:
        config = load_checked(args.config)
    except ConfigError as e:
        print(f"sendmail: {format_config_error(args.config, e)}", file=sys.stderr)
        return EX_CONFIG
    if args.mode != "m":
        print(f"sendmail: -b{args.mode} is not supported (only -bm, deliver mail)", file=sys.stderr)
        return EX_USAGE
    dot_ends = args.dot_ends and "i" not in args.options
    uid = os.getuid()
    try:
        sender = args.sender if args.sender is not None else login_name(uid)
        sender = "" if sender in ("<>", "") else qualify(sender, config.gateway.hostname)
        data = read_message(sys.stdin.buffer, dot_ends)
        message, recipients = prepare(data, sender, args.recipients, config, from_headers=args.from_headers,
                                      full_name=args.full_name, uid=uid)
    except SendmailError as e:
        print(f"sendmail: {e}", file=sys.stderr)
        return e.status
    try:
        maildrop.drop(config.gateway.spool, sender, recipients, message)
    except OSError as e:
        print(f"sendmail: cannot queue the message in {maildrop.maildrop_dir(config.gateway.spool)}: "
              f"{e.strerror or e}; nothing was sent, try again", file=sys.stderr)
        return EX_TEMPFAIL
    poke(config)
    return EX_OK


def sendmail_entry() -> int:
    """The ``sendmail`` program: ``smtpgw sendmail`` with the configuration from ``$SMTPGW_CONFIG``
    (or the usual default chain), for programs that run ``sendmail`` by name."""
    status = main(["sendmail", *sys.argv[1:]])
    return EX_USAGE if status == 2 else status        # argparse's usage errors, as sysexits has them


if __name__ == "__main__":
    sys.exit(sendmail_entry())
