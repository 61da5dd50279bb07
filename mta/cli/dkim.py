"""``smtpgw dkim keygen``: a DKIM key for the dkim_sign plugin, and the DNS record to publish.

    smtpgw dkim keygen --domain example.test --selector s2026 --out etc/dkim
    smtpgw dkim keygen --domain example.test --selector e2026 --algorithm ed25519-sha256 --out etc/dkim

writes ``DIR/DOMAIN.SELECTOR.key`` (mode 0600; never over an existing file) and prints the TXT record
with its full name, ready for a zone file. The key line for ``plugins.dkim_sign.keys`` follows.

``smtpgw dns-check --dkim DOMAIN:SELECTOR`` (mta.cli.dns) compares what DNS publishes with the
configured key, through :func:`check_published`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from mta.cli.main import EXIT_FAILURE, EXIT_OK, command
from mta.config import Config, ConfigError
from mta.config.loader import DKIM_ALGORITHMS, dkim_selector
from mta.config.values import parse_domain
from smtpgw_plugins.dkim_sign.keys import KEY_TYPE, generate, read_key, zone_line


def _arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("keygen", help="make a signing key and print its DNS record")
    p.add_argument("--domain", required=True, help="the signing domain (d=), e.g. example.test")
    p.add_argument("--selector", required=True, help="the selector (s=), e.g. s2026")
    p.add_argument("--algorithm", choices=DKIM_ALGORITHMS, default="rsa-sha256")
    p.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048; 1024 to 4096)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the private key (created 0700)")


def _fail(text: str) -> int:
    print(f"smtpgw dkim keygen: {text}", file=sys.stderr)
    return EXIT_FAILURE


@command("dkim", "DKIM keys for the dkim_sign plugin (keygen)", _arguments)
def dkim(args: argparse.Namespace) -> int:
    try:
        domain = parse_domain(args.domain, "--domain")
        selector = dkim_selector(args.selector, "--selector")
    except ConfigError as e:
        return _fail(str(e))
    if args.algorithm == "rsa-sha256" and not 1024 <= args.bits <= 4096:
        return _fail(f"--bits {args.bits}: use 1024 to 4096 (2048 is the usual size)")
    path = os.path.join(args.out, f"{domain}.{selector}.key")
    if os.path.exists(path):
        return _fail(f"{path} exists; remove it first or choose another selector")
    pem, public = generate(args.algorithm, args.bits)
    try:
        os.makedirs(args.out, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
    except OSError as e:
        return _fail(f"cannot write {path}: {e.strerror or e}")
    record = f"v=DKIM1; k={KEY_TYPE[args.algorithm]}; p={public}"
    print(f"; private key written to {path} (mode 0600); publish this record in DNS:")
    print(zone_line(f"{selector}._domainkey.{domain}", record))
    print("; then add to plugins.dkim_sign.keys:")
    print(f"; - {{domain: {domain}, selector: {selector}, key: {path}, algorithm: {args.algorithm}}}")
    return EXIT_OK


def _tags(record: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = "".join(value.split())
    return tags


def check_published(config: Config, pairs: Sequence[str],
                    query: Callable[[str], tuple[str, Any]]) -> tuple[list[str], bool]:
    """One line per ``DOMAIN:SELECTOR``: does DNS publish the public half of the configured key?
    ``query(name)`` is dns-check's TXT lookup (``("ok", answer)``, ``("nxdomain", None)``...)."""
    entries = (config.plugins.settings.get("dkim_sign") or {}).get("keys") or ()
    lines, ok = [], True
    for pair in pairs:
        domain, _, selector = pair.lower().rstrip(".").partition(":")
        index = next((i for i, e in enumerate(entries) if (e["domain"], e["selector"]) == (domain, selector)), None)
        name = f"{selector}._domainkey.{domain}"
        if not selector or index is None:
            lines.append(f"WARN: {pair}: no such key in plugins.dkim_sign.keys (write DOMAIN:SELECTOR)")
            ok = False
            continue
        try:
            key = read_key(entries[index], f"plugins.dkim_sign.keys[{index}]")
        except ConfigError as e:
            lines.append(f"WARN: {e}")
            ok = False
            continue
        kind, answer = query(name)
        records = [b"".join(r.strings).decode("ascii", "replace") for r in answer] if kind == "ok" else []
        published = [_tags(r) for r in records if "p" in _tags(r)]
        if kind == "error":
            lines.append(f"WARN: {name}: {answer}")
        elif not published:
            lines.append(f"WARN: {name}: no DKIM record; publish: {zone_line(name, key.record)}")
        elif len(published) > 1:
            lines.append(f"WARN: {name}: {len(published)} DKIM records; receivers take any one: keep one")
        elif published[0].get("p") != key.public or published[0].get("k", "rsa") != KEY_TYPE[key.algorithm]:
            lines.append(f"WARN: {name}: the published key is not {entries[index]['key']}; publish: "
                         f"{zone_line(name, key.record)}")
        else:
            lines.append(f"OK: {name} publishes the key in {entries[index]['key']} ({key.algorithm})")
            continue
        ok = False
    return lines, ok
