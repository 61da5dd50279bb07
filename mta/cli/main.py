"""The ``smtpgw`` console command: one subcommand per administrative job.

Subcommands register themselves with :func:`command`; a module holding more of them (queue, passwd,
etrn, dns-check) is listed in :data:`COMMAND_MODULES` and imported when the command runs, so this file
stays small and ``smtpgw --help`` lists everything. A subcommand returns its exit status. Loading the
configuration goes through :func:`load_config`; a :class:`~mta.config.ConfigError` raised anywhere
in a subcommand is printed as ``FILE: <key path>: <problem>`` on stderr with exit status 2, the same
for every subcommand.

Example of a subcommand module::

    from mta.cli.main import add_config_option, command, load_config

    def _arguments(parser):
        add_config_option(parser)

    @command("queue", "list the messages waiting in the queue", _arguments)
    def queue(args) -> int:
        config = load_config(args)
        ...
        return 0
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
from dataclasses import dataclass
from typing import Any, Callable

from mta.app.preflight import load_checked
from mta.config import Config, ConfigError, default_path, format_config_error
from mta.cli.output import EscapingWriter

def version() -> str:
    """The installed distribution's version (what ``pip show smtpgw`` says)."""
    try:
        return importlib.metadata.version("smtpgw")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


DEFAULT_CONFIG = default_path()      # $SMTPGW_CONFIG, /etc/smtpgw/gateway.yaml, etc/gateway.yaml
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# Modules that register further subcommands when imported; add one line per module.
COMMAND_MODULES: tuple[str, ...] = (
    "mta.cli.passwd",           # smtpgw passwd
    "mta.cli.queue",            # smtpgw queue
    "mta.cli.dns",              # smtpgw dns-check
    "mta.cli.etrn",             # smtpgw etrn
    "mta.cli.sendmail",         # smtpgw sendmail
    "mta.cli.dkim",             # smtpgw dkim keygen
    "mta.cli.cluster",          # smtpgw cluster
    "mta.cli.tls_rpt",          # smtpgw tls-rpt
)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str,
            arguments: Callable[[argparse.ArgumentParser], None] | None = None
            ) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register the decorated function as ``smtpgw <name>``; ``arguments`` adds its options."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, run, arguments)
        return run
    return register


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE", default=DEFAULT_CONFIG,
                        help=f"the gateway configuration (default: {DEFAULT_CONFIG})")


def load_config(args: argparse.Namespace) -> Config:
    return load_checked(args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpgw", description="smtpgw, an SMTP gateway: administration")
    parser.add_argument("--version", action="version", version=f"smtpgw {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        if cmd.arguments:
            cmd.arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``smtpgw`` with ``argv`` (default: the process arguments) and return the exit status."""
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:                      # --help, or a usage error argparse already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = EscapingWriter(stdout), EscapingWriter(stderr)   # untrusted text: escaped
    try:
        return COMMANDS[args.command].run(args)
    except ConfigError as e:
        print(format_config_error(getattr(args, "config", DEFAULT_CONFIG), e), file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:                      # `smtpgw ... | head`: the reader left, nothing is wrong
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    finally:
        sys.stdout, sys.stderr = stdout, stderr


# -- check-config --------------------------------------------------------------------------------

def _listen_text(address: Any) -> str:
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{host}:{address.port}" + (" (implicit TLS)" if address.tls else "")


def summarize(config: Config) -> list[str]:
    """What an administrator wants to see confirmed: listeners, routing, plugins."""
    from mta.config.values import format_duration, format_size
    g = config.gateway
    lines = [f"gateway: {g.hostname} (spool {g.spool}, postmaster {g.postmaster})"]
    domains = ", ".join(f"{d.name} -> {d.maildir}" for d in g.local_domains.values())
    lines.append(f"local domains: {domains or 'none'}")
    dns = ", ".join(f"{ip}:{port}" for ip, port in g.dns.nameservers) or "system resolver"
    lines.append(f"dns: {dns}")
    lines.append("listeners:")
    for vs in config.virtual_servers:
        addresses = ", ".join(_listen_text(a) for a in vs.listen)
        relay = [str(n) for n in vs.relay.allow] + (["authenticated clients"] if vs.relay.allow_authenticated else [])
        tls = ("STARTTLS required" if vs.tls.required else "STARTTLS") if vs.tls.certificate else "no TLS"
        if vs.auth.users:
            tls += f"; AUTH {'required' if vs.auth.required else 'offered'} (users {vs.auth.users})"
        lines.append(f"  {vs.name}: {addresses}; relay: {', '.join(relay) or 'nobody'}; {tls}; "
                     f"max {format_size(vs.limits.max_message_size)}, {vs.limits.max_recipients} recipients, "
                     f"timeout {format_duration(vs.limits.timeout)}")
    lines.append("connectors (routing order: most specific address space, then lowest cost):")
    routes = sorted(((space, i, c) for i, c in enumerate(config.connectors) for space in c.address_spaces),
                    key=lambda r: (-r[0].specificity, r[0].cost, r[1]))
    if not routes:
        lines.append("  none: only local domains are delivered")
    for space, _, c in routes:
        via = "smart hosts " + ", ".join(c.smart_hosts) if c.smart_hosts else "DNS MX"
        when = "remote-triggered (ETRN)" if c.delivery.remote_triggered else c.delivery.schedule.describe()
        lines.append(f"  {space.domain} cost {space.cost}: {c.name} via {via}; schedule {when}; "
                     f"bridgeheads {', '.join(c.bridgeheads)}")
    lines.append(f"plugins: {', '.join(config.plugins.enabled) or 'none'}")
    if config.plugins.local:
        lines.append(f"local hook modules: {', '.join(h.path for h in config.plugins.local)}")
    return lines


def hook_lines(config: Config) -> list[str]:
    """The plugin manager as the gateway builds it (core policy, enabled plugins, local hook files,
    the metrics recorder), not started: each plugin's hooks, and each hook's call order."""
    from mta.policy import core as defaults
    from mta.plugin.manager import HOOK_NAMES, Hooks

    hooks = Hooks()
    hooks.register(defaults.CorePolicy(None), name="core")
    hooks.load(config.plugins.enabled, config.plugins.local)
    if config.gateway.metrics.enabled:
        from mta.ops.metrics import _MetricsHooks
        hooks.register(_MetricsHooks(None), name="metrics")
    names = HOOK_NAMES
    order = {n: [impl.plugin_name for impl in hooks.implementations(n)] for n in names}
    lines = ["plugins and the hooks they implement:"]
    for plugin in hooks.plugin_names():
        implemented = [n for n in names if plugin in order[n]]
        lines.append(f"  {plugin}: {', '.join(implemented) or 'no hooks'}")
    lines.append("hooks in call order (verdict hooks: the first answer wins):")
    for n in names:
        if order[n]:
            lines.append(f"  {n}: {' -> '.join(order[n])}")
    ops = config.gateway
    lines.append(f"control socket: {ops.control_socket_path} (smtpgw queue)")
    host, port = ops.metrics.listen
    lines.append(f"metrics: {'http://' + (f'[{host}]' if ':' in host else host) + f':{port}/metrics' if ops.metrics.enabled else 'off'}")
    return lines


@command("check-config", "validate the configuration file and summarize it", add_config_option)
def check_config(args: argparse.Namespace) -> int:
    config = load_checked(args.config, gateway=True)
    try:
        extra = hook_lines(config)
    except Exception as e:                       # a plugin or local hook file that does not import
        print(f"{args.config}: plugins: cannot load: {e}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{args.config}: OK")
    for line in summarize(config) + extra:
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    # Run through the imported module, so subcommand modules register into the same COMMANDS.
    from mta.cli.main import main as _main
    sys.exit(_main())
