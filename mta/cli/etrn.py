"""``smtpgw etrn``: ask a mail server once to send the mail it holds for our domains, and show its reply.

Either name the server and the domains::

    smtpgw etrn --server mail.isp.example:25 example.org example.com

or use a connector's ``etrn`` section (what the gateway does on its schedule), e.g. from the script
that runs when the dial-up link comes up::

    smtpgw etrn -c etc/gateway.yaml --connector "Internet SMTP connector"

A connector whose ``etrn`` section names a trigger program (``run``, for an ISP that dequeues on a
FINGER request or the like) runs that program here as well.

Exit status 0 when every request was accepted (2xx; a program: exit status 0), 1 otherwise. ATRN
needs the running gateway to receive the mail (the connector's ``etrn`` section with ``command:
ATRN``); here it is refused.
"""
from __future__ import annotations

import argparse
import socket
import sys

from mta.cli.main import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, add_config_option, command, load_config
from mta.config import ConfigError


def _arguments(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    parser.add_argument("--server", metavar="HOST[:PORT]", help="the server holding the mail (port 25)")
    parser.add_argument("--connector", metavar="NAME", help="use this connector's etrn section")
    parser.add_argument("--command", dest="verb", default="ETRN", metavar="CMD",
                        help='ETRN (default) or a site command like "DEQUEUE {domain}"')
    parser.add_argument("--helo", default=None, help="the name to greet with (default: this host's name)")
    parser.add_argument("--tls", choices=("none", "opportunistic", "required"), default="opportunistic")
    parser.add_argument("--source", metavar="IP", default=None, help="the local address to connect from")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each reply")
    parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="domains (ETRN @domain, #queue also work)")


def _request(args: argparse.Namespace):
    from mta.smtp.client.etrn import DequeueRequest
    from mta.config.values import parse_smart_host

    if args.connector:
        from smtpgw_plugins.etrn_dequeue.requester import build_request
        config = load_config(args)
        found = [c for c in config.connectors if c.name == args.connector]
        if not found:
            raise ConfigError("connectors", f"no connector named {args.connector!r}")
        if found[0].etrn is None:
            raise ConfigError(f"connectors[{config.connectors.index(found[0])}].etrn",
                              "this connector has no etrn section")
        req = build_request(config, found[0])
        if args.domains:
            req = type(req)(**{**req.__dict__, "domains": tuple(args.domains)})
        return req
    if not args.server or not args.domains:
        return None
    host, port, _, _ = parse_smart_host(args.server, "--server", 25)
    verb = args.verb.upper() if args.verb.upper() in ("ETRN", "ATRN") else args.verb
    return DequeueRequest(host=host, port=port, domains=tuple(args.domains), command=verb,
                          helo=args.helo or socket.getfqdn() or "localhost", tls=args.tls,
                          source_address=args.source, timeout=args.timeout)


@command("etrn", "ask a server to send the mail it holds for our domains (ETRN, RFC 1985)", _arguments)
def etrn(args: argparse.Namespace) -> int:
    req = _request(args)
    if req is None:
        print("smtpgw etrn: give --server HOST[:PORT] and at least one DOMAIN, or --connector NAME",
              file=sys.stderr)
        return EXIT_USAGE
    if req.command == "ATRN":
        print("smtpgw etrn: ATRN needs the running gateway to receive the mail; "
              "set command: ATRN in the connector's etrn section instead", file=sys.stderr)
        return EXIT_USAGE

    from twisted.internet import defer, task

    from mta.smtp.client.etrn import DequeueError, request_dequeue

    outcome: dict = {}

    async def run(reactor) -> None:
        try:
            outcome["results"] = await request_dequeue(reactor, req)
        except DequeueError as e:
            outcome["error"] = e.reply

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            print(f"smtpgw etrn: failed (status {e.code})", file=sys.stderr)
            return EXIT_FAILURE
    if "error" in outcome:
        print(f"{req.host}:{req.port}: {outcome['error']}", file=sys.stderr)
        return EXIT_FAILURE
    ok = True
    for domain, reply in outcome.get("results", []):
        print(f"{req.label} {domain}: {reply}")
        ok = ok and reply.is_positive
    return EXIT_OK if ok else EXIT_FAILURE
