"""``smtpgw passwd``: add, change or remove a user of an ``auth.users`` file (format: mta/smtp/server/users.py).

    smtpgw passwd -c var/users alice          # create the file if needed, ask the password twice
    echo 'secret' | smtpgw passwd --stdin var/users alice
    smtpgw passwd -D var/users alice          # remove alice

The file is rewritten in one step (a running gateway sees the old or the new file, never half of one)
and a new file is created readable by its owner only (mode 0600). Other lines, comments included, are
kept as they were. The gateway notices the change by itself; no restart or SIGHUP is needed.
"""
from __future__ import annotations

import argparse
import getpass
import sys

from mta.smtp.server.users import USER_NAME, UsersFileError, hash_password, parse_users, set_user_line, write_atomically
from mta.cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, command


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--create", action="store_true",
                        help="create FILE (mode 0600) if it does not exist")
    parser.add_argument("--stdin", action="store_true",
                        help="read the password from the first line of standard input instead of asking")
    parser.add_argument("-D", "--delete", action="store_true", help="remove USER from FILE")
    parser.add_argument("--scheme", choices=("scrypt", "pbkdf2-sha256"), default="scrypt",
                        help="password hash (default: scrypt)")
    parser.add_argument("file", metavar="FILE", help="the users file (auth.users in the configuration)")
    parser.add_argument("user", metavar="USER", help="the user name clients log in with")


def _read_password(args: argparse.Namespace) -> str | None:
    if args.stdin:
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass(f"New password for {args.user}: ")
    if getpass.getpass("Retype the password: ") != first:
        print("smtpgw passwd: the passwords do not match; nothing changed", file=sys.stderr)
        return None
    return first


@command("passwd", "add, change or remove a user of an AUTH users file", _arguments)
def passwd(args: argparse.Namespace) -> int:
    if not USER_NAME.fullmatch(args.user):
        print(f"smtpgw passwd: bad user name {args.user!r} (letters, digits and . _ % + = @ - only)",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if not args.create or args.delete:
            print(f"smtpgw passwd: {args.file}: no such file (use -c to create it)", file=sys.stderr)
            return EXIT_FAILURE
        text = ""
    except (OSError, UnicodeDecodeError) as e:
        print(f"smtpgw passwd: {args.file}: cannot read: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        users = parse_users(text, args.file)
    except UsersFileError as e:
        print(f"smtpgw passwd: {e}; fix the file first", file=sys.stderr)
        return EXIT_FAILURE
    if args.delete:
        if args.user not in users:
            print(f"smtpgw passwd: {args.file}: no user {args.user!r}", file=sys.stderr)
            return EXIT_FAILURE
        encoded = None
    else:
        password = _read_password(args)
        if password is None:
            return EXIT_FAILURE
        if not password:
            print("smtpgw passwd: the password is empty; nothing changed", file=sys.stderr)
            return EXIT_FAILURE
        encoded = hash_password(password, args.scheme)
    try:
        write_atomically(args.file, set_user_line(text, args.user, encoded))
    except OSError as e:
        print(f"smtpgw passwd: {args.file}: cannot write: {e.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    what = "removed" if args.delete else ("changed" if args.user in users else "added")
    print(f"{args.file}: user {args.user} {what}", file=sys.stderr)
    return EXIT_OK

