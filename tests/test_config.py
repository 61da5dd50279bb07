"""Loading etc/gateway.yaml: every problem names its key; good files become the expected objects."""
from __future__ import annotations

import copy
import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings, strategies as st

from mta.cli import main as cli
from mta.config import (
    AddressSpace, Config, ConfigError, ListenAddress, LocalDomain, LocalHook, load_config, parse_config,
)
from mta.config.loader import ConfigFileError, build, installed_plugins, load
from mta.config.schedules import Schedule

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FILE = ROOT / "etc" / "gateway.yaml"
INSTALLED = ", ".join(installed_plugins())        # what this checkout registers (setup.cfg entry points)
DELETE = object()


def minimal() -> dict:
    return {
        "gateway": {"hostname": "mail.example.test"},
        "virtual_servers": [{"name": "Default SMTP Virtual Server", "listen": ["127.0.0.1:2525"]}],
        "connectors": [{"name": "Internet SMTP connector"}],
    }


def with_key(data: dict, path: str, value: object) -> dict:
    """A copy of ``data`` with the dotted/indexed ``path`` set to ``value`` (or removed with DELETE)."""
    data = copy.deepcopy(data)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node = data
    for part in parts[:-1]:
        if part.startswith("["):
            node = node[int(part[1:-1])]
        else:
            node = node.setdefault(part, {})
    last = parts[-1]
    if last.startswith("["):
        node[int(last[1:-1])] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as e:
        build(data)
    return str(e.value)


# -- the default file and a full example ---------------------------------------------------------

def test_default_file_loads():
    config = load(str(DEFAULT_FILE))
    g = config.gateway
    assert (g.hostname, g.spool, g.postmaster) == ("mail.example.test", "var/spool", "postmaster@example.test")
    assert g.local_domains == {"example.test": LocalDomain("example.test", "var/mail")}
    assert g.dns.nameservers == ()
    assert g.queue.retry == (600.0, 600.0, 600.0, 900.0)
    assert (g.queue.delay_notification, g.queue.expire, g.queue.max_hops) == (43200.0, 172800.0, 30)
    [vs] = config.virtual_servers
    assert vs.name == "Default SMTP Virtual Server"
    assert vs.listen == (ListenAddress("127.0.0.1", 2525),)
    assert vs.relay.allow == () and vs.relay.allow_authenticated
    assert vs.limits.max_message_size == 10 * 1024 * 1024 and vs.limits.max_recipients == 64000
    [c] = config.connectors
    assert c.name == "Internet SMTP connector"
    assert c.address_spaces == (AddressSpace("*", 1),)
    assert c.smart_hosts == () and c.bridgeheads == ("Default SMTP Virtual Server",)
    assert c.delivery.schedule == Schedule.always()
    assert config.plugins.enabled == ("relay_acl", "smart_host", "etrn_dequeue", "diag_logging")
    assert set(config.plugins.settings["diag_logging"]["levels"].values()) == {"minimum"}
    assert config.path == str(DEFAULT_FILE)


def test_default_file_equals_the_built_in_defaults():
    """Leaving every optional key out gives the same objects as the commented default file, but for
    ``gateway.workers``: the file ships ``auto`` (one process per CPU), a file without the key runs one."""
    written = load(str(DEFAULT_FILE))
    assert written.gateway.workers == "auto"
    bare = build({"gateway": {"hostname": "mail.example.test", "workers": "auto",
                              "local_domains": {"example.test": None}},
                  "virtual_servers": [{"name": "Default SMTP Virtual Server", "listen": ["127.0.0.1:2525"]}],
                  "connectors": [{"name": "Internet SMTP connector"}]}, str(DEFAULT_FILE))
    assert bare == written


FULL = """
gateway:
  hostname: MX1.Example.TEST
  spool: /srv/spool
  postmaster: hostmaster@Example.test
  local_domains:
    Example.test: {maildir: /srv/mail/example}
    other.test: {}
  dns: {nameservers: ["192.0.2.53", "[2001:db8::53]:5353"], timeout: 3s}
  queue: {retry: [1m, 5m], delay_notification: 4h, expire: 5d, max_hops: 20}
virtual_servers:
  - name: Inbound
    listen: ["0.0.0.0:25", {address: "[::]:465", tls: true}]
    limits: {max_message_size: 20MB, max_recipients: 500, max_connections: 50, timeout: 2m}
    relay: {allow: ["10.0.0.0/8", "192.0.2.10", "2001:db8::/32"], allow_authenticated: false}
    tls: {certificate: etc/cert.pem, key: etc/key.pem, required: true}
    auth: {users: etc/users}
    protocol_log: {enabled: true, directory: /var/log/smtpgw, period: Hourly}
    smart_host: "[192.0.2.25]"
  - name: Clients
    listen: ["127.0.0.1:587"]
connectors:
  - name: Partner
    address_spaces: [{domain: partner.example, cost: 5}, "*.Partner.example"]
    smart_hosts: ["relay.partner.example:2525", "[192.0.2.99]"]
    bridgeheads: [Inbound]
    content_restrictions: {max_message_size: 5MB, allowed_types: [non-system], allowed_priorities: [high, normal]}
    delivery:
      schedule: {mon: ["08:00-18:00"], sun: ["22:00-02:00"]}
      remote_triggered: true
      oversize: {threshold: 2MB, schedule: every 2h}
    delivery_restrictions: {default: reject, except: ["Boss@Partner.example", "@friends.example"]}
  - name: Dial-up
    address_spaces: [{domain: "*", cost: 50}]
    delivery: {schedule: never}
plugins:
  enabled: [relay_acl, diag_logging]
  local: [LOCALHOOK]
  diag_logging: {levels: {smtp_protocol: Maximum, ndr: none}}
  smart_host: {note: kept as written}
"""


def test_full_example_loads_into_the_expected_objects(tmp_path):
    hook = tmp_path / "site_hooks.py"
    hook.write_text("")
    config = parse_config(yaml.safe_load(FULL.replace("LOCALHOOK", str(hook))), "full.yaml")
    g = config.gateway
    assert (g.hostname, g.spool, g.postmaster) == ("mx1.example.test", "/srv/spool", "hostmaster@example.test")
    assert g.local_domains == {"example.test": LocalDomain("example.test", "/srv/mail/example"),
                               "other.test": LocalDomain("other.test", "var/mail")}
    assert g.dns.nameservers == (("192.0.2.53", 53), ("2001:db8::53", 5353)) and g.dns.timeout == 3.0
    assert g.queue.retry == (60.0, 300.0) and g.queue.retry_interval(5) == 300.0
    assert (g.queue.delay_notification, g.queue.expire, g.queue.max_hops) == (14400.0, 432000.0, 20)

    inbound, clients = config.virtual_servers
    assert inbound.listen == (ListenAddress("0.0.0.0", 25), ListenAddress("::", 465, tls=True))
    assert (inbound.limits.max_message_size, inbound.limits.max_recipients, inbound.limits.max_connections,
            inbound.limits.timeout) == (20 * 1024 ** 2, 500, 50, 120.0)
    assert inbound.relay.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.10/32"),
                                   ipaddress.ip_network("2001:db8::/32"))
    assert not inbound.relay.allow_authenticated
    assert (inbound.tls.certificate, inbound.tls.key, inbound.tls.required) == ("etc/cert.pem", "etc/key.pem", True)
    assert inbound.auth.users == "etc/users"
    assert (inbound.protocol_log.enabled, inbound.protocol_log.directory, inbound.protocol_log.period) == (
        True, "/var/log/smtpgw", "hourly")
    assert inbound.smart_host == "[192.0.2.25]"
    assert clients.limits.max_recipients == 64000 and clients.tls.certificate is None

    partner, dialup = config.connectors
    assert partner.address_spaces == (AddressSpace("partner.example", 5), AddressSpace("*.partner.example", 1))
    assert partner.smart_hosts == ("relay.partner.example:2525", "[192.0.2.99]")
    assert partner.bridgeheads == ("Inbound",)
    cr = partner.content_restrictions
    assert (cr.max_message_size, cr.allowed_types, cr.allowed_priorities) == (
        5 * 1024 ** 2, ("non-system",), ("high", "normal"))
    assert partner.delivery.schedule.kind == "weekly" and len(partner.delivery.schedule.slots) == 40 + 16
    assert partner.delivery.remote_triggered
    assert partner.delivery.oversize.threshold == 2 * 1024 ** 2
    assert partner.delivery.oversize.schedule == Schedule.periodic(7200)
    assert partner.delivery_restrictions.default == "reject"
    assert partner.delivery_restrictions.exceptions == ("Boss@partner.example", "@friends.example")
    assert partner.extra == {}
    assert dialup.address_spaces == (AddressSpace("*", 50),)
    assert dialup.delivery.schedule == Schedule.never()
    assert dialup.bridgeheads == ("Inbound", "Clients")            # default: every virtual server

    p = config.plugins
    assert p.enabled == ("relay_acl", "diag_logging") and p.local == (LocalHook(str(hook)),)
    levels = p.settings["diag_logging"]["levels"]
    assert levels["smtp_protocol"] == "maximum" and levels["ndr"] == "none" and levels["routing_engine"] == "minimum"
    assert p.settings["smart_host"] == {"note": "kept as written"}
    assert config.path == "full.yaml"


def test_minimal_file_gets_the_contract_defaults():
    config = build(minimal())
    assert config.gateway.spool == "var/spool"
    assert config.gateway.postmaster == "postmaster@mail.example.test"
    assert config.gateway.dns.timeout == 5.0
    vs = config.virtual_servers[0]
    assert (vs.limits.timeout, vs.limits.max_connections) == (300.0, 1000)
    assert (vs.protocol_log.enabled, vs.protocol_log.directory, vs.protocol_log.period) == (
        False, "var/log/smtp", "daily")
    c = config.connectors[0]
    assert c.content_restrictions.allowed_types == ("system", "non-system")
    assert c.delivery_restrictions.default == "accept" and c.delivery_restrictions.exceptions == ()
    assert c.delivery.oversize.threshold is None and c.delivery.oversize.schedule is None
    assert config.plugins.enabled == ("relay_acl", "smart_host", "etrn_dequeue", "diag_logging")


def test_message_memory_is_a_size_with_a_256mb_default():
    small = with_key(minimal(), "virtual_servers[0].limits.max_message_size", "50KB")
    assert build(minimal()).gateway.message_memory == 256 * 1024 ** 2
    assert build(with_key(small, "gateway.message_memory", "64KB")).gateway.message_memory == 64 * 1024
    assert build(with_key(small, "gateway.message_memory", 100000)).gateway.message_memory == 100000


def test_message_memory_must_hold_the_largest_message_per_worker():
    data = with_key(with_key(minimal(), "gateway.message_memory", "30MB"), "gateway.workers", 4)
    with pytest.raises(ConfigError) as e:
        build(data)
    assert str(e.value) == ("gateway.message_memory: 7680KB per worker (4 workers) is smaller than "
                            "virtual_servers[0].limits.max_message_size (10MB): such messages could "
                            "never be received")


def test_postmaster_defaults_to_the_first_local_domain():
    config = build(with_key(minimal(), "gateway.local_domains", {"Corp.test": None}))
    assert config.gateway.postmaster == "postmaster@corp.test"


def test_connectors_may_be_left_out():
    assert build(with_key(minimal(), "connectors", DELETE)).connectors == ()


def test_listen_port_zero_is_allowed_for_an_os_chosen_port():
    config = build(with_key(minimal(), "virtual_servers[0].listen", ["127.0.0.1:0", "127.0.0.2:0"]))
    assert [a.port for a in config.virtual_servers[0].listen] == [0, 0]


def test_load_config_and_parse_config_go_through_the_loader():
    assert isinstance(load_config(str(DEFAULT_FILE)), Config)
    assert parse_config(minimal()).gateway.hostname == "mail.example.test"


# -- one error per problem, naming the key -------------------------------------------------------

ERRORS = [
    # unknown keys and wrong types
    ("virtual_servers[0].limits.max_recipent", 5,
     "virtual_servers[0].limits.max_recipent: unknown key (known: max_connection_rate, max_connections, "
     "max_connections_per_client, max_errors, max_message_size, max_recipients, min_data_rate, timeout)"),
    ("virtual_servers[0].limits.max_recipients", "lots",
     "virtual_servers[0].limits.max_recipients: expected an integer, got 'lots'"),
    ("virtual_servers[0].limits.max_recipients", 0,
     "virtual_servers[0].limits.max_recipients: expected an integer at least 1, got 0"),
    ("virtual_servers[0].limits.max_connections", True,
     "virtual_servers[0].limits.max_connections: expected an integer, got true"),
    ("gateway.colour", "blue",
     "gateway.colour: unknown key (known: cluster, console, control_socket, dns, hostname, local_domains, "),
    ("extras", 1, "extras: unknown key (known: connectors, gateway, plugins, virtual_servers)"),
    ("connectors[0].delivery_restrictions.exceptions", [],
     "connectors[0].delivery_restrictions.exceptions: unknown key (known: default, except)"),
    ("gateway", "mail.example.test", "gateway: expected a mapping, got 'mail.example.test'"),
    ("virtual_servers[0].relay.allow_authenticated", "yes please",
     "virtual_servers[0].relay.allow_authenticated: expected true or false, got 'yes please'"),
    ("virtual_servers[0].relay.allow", "10.0.0.0/8", "virtual_servers[0].relay.allow: expected a list, got '10.0.0.0/8'"),
    # sizes and durations
    ("virtual_servers[0].limits.max_message_size", "10 parsecs",
     "virtual_servers[0].limits.max_message_size: expected a size like 10MB, 512KB or a number of bytes, "
     "got '10 parsecs'"),
    ("virtual_servers[0].limits.max_message_size", 0,
     "virtual_servers[0].limits.max_message_size: a size must be more than zero, got 0"),
    ("virtual_servers[0].limits.timeout", "soon",
     "virtual_servers[0].limits.timeout: expected a duration like 30s, 10m, 2h, 2d or a number of seconds, "
     "got 'soon'"),
    ("gateway.queue.retry", ["10m", "10m", "10 minutes please"], "gateway.queue.retry[2]: expected a duration"),
    ("gateway.queue.retry", [], "gateway.queue.retry: expected at least 1 entry"),
    ("gateway.queue.expire", "0s", "gateway.queue.expire: a duration must be more than zero"),
    ("gateway.dns.timeout", -3, "gateway.dns.timeout: a duration cannot be negative"),
    ("gateway.message_memory", "plenty",
     "gateway.message_memory: expected a size like 10MB, 512KB or a number of bytes, got 'plenty'"),
    ("gateway.message_memory", "0KB", "gateway.message_memory: a size must be more than zero"),
    # required keys and names
    ("gateway.hostname", DELETE, "gateway.hostname: required key is missing"),
    ("gateway.hostname", "mail example", "gateway.hostname: not a valid domain name: 'mail example'"),
    ("gateway", DELETE, "gateway: required key is missing"),
    ("virtual_servers", [], "virtual_servers: expected at least 1 entry"),
    ("virtual_servers", DELETE, "virtual_servers: required key is missing"),
    ("virtual_servers[0].name", DELETE, "virtual_servers[0].name: required key is missing"),
    ("virtual_servers[0].listen", DELETE, "virtual_servers[0].listen: required key is missing"),
    ("virtual_servers[0].listen", [], "virtual_servers[0].listen: expected at least 1 entry"),
    ("connectors[0].name", DELETE, "connectors[0].name: required key is missing"),
    ("gateway.postmaster", "postmaster", "gateway.postmaster: expected an address like postmaster@example.test"),
    ("gateway.local_domains", {"bad domain": None}, "gateway.local_domains.bad domain: not a valid domain name"),
    ("gateway.local_domains", {"a.test": {"mailbox": "x"}}, "gateway.local_domains.a.test.mailbox: unknown key"),
    ("gateway.local_domains", {"A.test": None, "a.test": None}, "gateway.local_domains.a.test: the domain 'a.test' is listed twice"),
    # listen entries and name servers
    ("virtual_servers[0].listen[0]", "localhost:25",
     "virtual_servers[0].listen[0]: expected an IP address, got 'localhost:25'"),
    ("virtual_servers[0].listen[0]", "127.0.0.1",
     "virtual_servers[0].listen[0]: a port is required (\"IP:port\"), got '127.0.0.1'"),
    ("virtual_servers[0].listen[0]", "127.0.0.1:70000",
     "virtual_servers[0].listen[0]: port must be a number from 0 to 65535, got '70000'"),
    ("virtual_servers[0].listen[0]", {"address": "127.0.0.1:465", "tls": "on"},
     "virtual_servers[0].listen[0].tls: expected true or false, got 'on'"),
    ("virtual_servers[0].listen[0]", {"tls": True}, "virtual_servers[0].listen[0].address: required key is missing"),
    ("virtual_servers[0].listen[0]", {"address": "127.0.0.1:465", "port": 1},
     "virtual_servers[0].listen[0].port: unknown key (known: address, tls)"),
    ("virtual_servers[0].listen", ["127.0.0.1:25", "127.0.0.1:25"],
     "virtual_servers[0].listen[1]: '127.0.0.1:25' is listed twice"),
    ("gateway.dns.nameservers", ["192.0.2.53", "dns.example"],
     "gateway.dns.nameservers[1]: expected an IP address, got 'dns.example'"),
    ("gateway.dns.nameservers", ["192.0.2.53:0"], "gateway.dns.nameservers[0]: port must be a number from 1 to 65535"),
    # relay, TLS, protocol log, smart hosts
    ("virtual_servers[0].relay.allow", ["10.0.0.0/8", "10.0.0.0/33"],
     "virtual_servers[0].relay.allow[1]: expected an IP address or CIDR network (192.0.2.0/24), got '10.0.0.0/33'"),
    ("virtual_servers[0].relay.allow", ["everyone"], "virtual_servers[0].relay.allow[0]: expected an IP address or CIDR"),
    ("virtual_servers[0].tls", {"certificate": "cert.pem"}, "virtual_servers[0].tls.key: required when certificate is set"),
    ("virtual_servers[0].tls", {"required": True},
     "virtual_servers[0].tls.required: TLS cannot be required without a certificate and key"),
    ("virtual_servers[0].protocol_log.period", "fortnightly",
     "virtual_servers[0].protocol_log.period: expected one of hourly, daily, weekly, monthly, unlimited, "
     "or a size such as 10MB, got 'fortnightly'"),
    ("virtual_servers[0].smart_host", "smart host.example",
     "virtual_servers[0].smart_host: expected \"host\", \"host:port\", \"[IP]\" or \"[IP]:port\", got 'smart host.example'"),
    ("connectors[0].smart_hosts", ["relay.isp.example", "[192.0.2.300]"],
     "connectors[0].smart_hosts[1]: expected an IP address, got '[192.0.2.300]'"),
    ("connectors[0].smart_hosts", ["relay.isp.example:99999"],
     "connectors[0].smart_hosts[0]: port must be a number from 1 to 65535, got '99999'"),
    ("connectors[0].smart_hosts", ["2001:db8::1"], "connectors[0].smart_hosts[0]: put an IPv6 address in brackets"),
    # address spaces and costs
    ("connectors[0].address_spaces", [{"domain": "*", "cost": 0}],
     "connectors[0].address_spaces[0].cost: expected an integer from 1 to 100, got 0"),
    ("connectors[0].address_spaces", [{"domain": "*", "cost": 101}],
     "connectors[0].address_spaces[0].cost: expected an integer from 1 to 100, got 101"),
    ("connectors[0].address_spaces", [{"domain": "*", "cost": "cheap"}],
     "connectors[0].address_spaces[0].cost: expected an integer, got 'cheap'"),
    ("connectors[0].address_spaces", [{"domain": "a*.example"}],
     "connectors[0].address_spaces[0].domain: not a valid domain name (\"*\", \"*.domain\" or \"domain\"): 'a*.example'"),
    ("connectors[0].address_spaces", [{"cost": 1}], "connectors[0].address_spaces[0].domain: required key is missing"),
    ("connectors[0].address_spaces", [], "connectors[0].address_spaces: expected at least 1 entry"),
    ("connectors[0].address_spaces", ["example.org", "EXAMPLE.org"],
     "connectors[0].address_spaces[1]: the address space 'example.org' is listed twice"),
    # content and delivery restrictions, schedules
    ("connectors[0].content_restrictions.allowed_types", ["system", "spam"],
     "connectors[0].content_restrictions.allowed_types[1]: expected one of system, non-system, got 'spam'"),
    ("connectors[0].content_restrictions.allowed_priorities", ["urgent"],
     "connectors[0].content_restrictions.allowed_priorities[0]: expected one of high, normal, low, got 'urgent'"),
    ("connectors[0].content_restrictions.allowed_priorities", ["high", "high"],
     "connectors[0].content_restrictions.allowed_priorities[1]: 'high' is listed twice"),
    ("connectors[0].delivery_restrictions.default", "maybe",
     "connectors[0].delivery_restrictions.default: expected one of accept, reject, got 'maybe'"),
    ("connectors[0].delivery_restrictions.except", ["nobody"],
     "connectors[0].delivery_restrictions.except[0]: expected \"user@domain\" or \"@domain\", got 'nobody'"),
    ("connectors[0].delivery.schedule", "sometimes", "connectors[0].delivery.schedule: expected always, never"),
    ("connectors[0].delivery.schedule", {"mon": ["08:10-09:00"]},
     "connectors[0].delivery.schedule.mon[0]: 08:10 in '08:10-09:00' is not on a 15-minute boundary"),
    ("connectors[0].delivery.remote_triggered", "no", "connectors[0].delivery.remote_triggered: expected true or false"),
    ("connectors[0].delivery.oversize", {"threshold": "2MB"},
     "connectors[0].delivery.oversize.schedule: required when threshold is set"),
    ("connectors[0].delivery.oversize.schedule", "every fortnight",
     "connectors[0].delivery.oversize.schedule: expected \"every <duration>\""),
    # bridgeheads and names
    ("connectors[0].bridgeheads", ["X"], "connectors[0].bridgeheads[0]: no virtual server named 'X'"),
    ("connectors[0].bridgeheads", [], "connectors[0].bridgeheads: expected at least 1 entry"),
    # the web console
    ("gateway.console", {"enabled": True},
     "gateway.console.users: the console needs a users file to log in against (make one with `smtpgw passwd"),
    ("gateway.console.listen", "localhost:8025", "gateway.console.listen: "),
    ("gateway.console.tls", {"certificate": "c.pem"}, "gateway.console.tls.key: required when certificate is set"),
    ("gateway.console.tls", {"required": True}, "gateway.console.tls.required: unknown key"),
    # plugins
    ("plugins.enabled", ["relay_acl", "foo"], f"plugins.enabled[1]: unknown plugin 'foo' (installed: {INSTALLED})"),
    ("plugins.enabled", ["relay_acl", "relay_acl"], "plugins.enabled[1]: 'relay_acl' is listed twice"),
    ("plugins.local", ["/nonexistent/site_hooks.py"], "plugins.local[0]: no such file '/nonexistent/site_hooks.py'"),
    ("plugins.dkim_sign", {"sign": "sometimes"}, "plugins.dkim_sign.sign: expected one of relayed, all"),
    ("plugins.dkim_sign", {"headers": ["subject"]}, "plugins.dkim_sign.headers: must include from"),
    ("plugins.dkim_sign", {"headers": ["from", "received"]}, "plugins.dkim_sign.headers[1]: received must not be signed"),
    ("plugins.dkim_sign", {"keys": [{"domain": "example.test", "selector": "s1", "key": "k", "algorithm": "rsa"}]},
     "plugins.dkim_sign.keys[0].algorithm: expected one of rsa-sha256, ed25519-sha256"),
    ("plugins.dkim_sign", {"keys": [{"domain": "example.test", "key": "k"}]},
     "plugins.dkim_sign.keys[0].selector: required key is missing"),
    ("plugins.sender_auth", {"reject": {"dmarc": True}}, "plugins.sender_auth.reject.dmarc: unknown key"),
    ("plugins.sender_auth", {"trusted_networks": ["exchange"]}, "plugins.sender_auth.trusted_networks[0]: expected an IP address or CIDR"),
    ("plugins.sender_auth", {"spf": "yes"}, "plugins.sender_auth.spf: expected true or false"),
    ("plugins.foo", {}, "plugins.foo: unknown key (known: " + ", ".join(sorted([*installed_plugins(), "enabled", "local"])) + ")"),
    ("plugins.diag_logging", {"levels": {"smtp_protocol": "loud"}},
     "plugins.diag_logging.levels.smtp_protocol: expected one of none, minimum, medium, maximum, got 'loud'"),
    ("plugins.diag_logging", {"levels": ["maximum"]}, "plugins.diag_logging.levels: expected a mapping, got a list"),
    ("plugins.relay_acl", "on", "plugins.relay_acl: expected a mapping, got 'on'"),
    ("virtual_servers[0].dsn", {"untrusted": "sometimes"},
     "virtual_servers[0].dsn.untrusted: expected one of headers, off, full, got 'sometimes'"),
    ("gateway.local_domains", {"example.test": {"max_new_mailboxes_per_message": -1}},
     "gateway.local_domains.example.test.max_new_mailboxes_per_message: expected an integer at least 0, got -1"),
]


@pytest.mark.parametrize("path, value, message", ERRORS, ids=[f"{p}={v!r}" for p, v, _ in ERRORS])
def test_errors_name_the_key(path, value, message):
    assert error_of(with_key(minimal(), path, value)).startswith(message)


def test_duplicate_virtual_server_names():
    data = minimal()
    data["virtual_servers"].append({"name": "Default SMTP Virtual Server", "listen": ["127.0.0.1:2526"]})
    assert error_of(data) == ("virtual_servers[1].name: duplicate virtual server name "
                              "'Default SMTP Virtual Server' (also virtual_servers[0])")


def test_duplicate_connector_names():
    data = minimal()
    data["connectors"].append({"name": "Internet SMTP connector"})
    assert error_of(data) == ("connectors[1].name: duplicate connector name 'Internet SMTP connector' "
                              "(also connectors[0])")


def test_two_virtual_servers_cannot_share_an_address():
    data = minimal()
    data["virtual_servers"].append({"name": "Second", "listen": ["127.0.0.1:2525"]})
    assert error_of(data) == ("virtual_servers[1].listen[0]: 127.0.0.1:2525 is already used by "
                              "virtual_servers[0].listen[0]")


def test_oversize_threshold_may_not_exceed_the_connector_size_limit():
    data = with_key(minimal(), "connectors[0].content_restrictions", {"max_message_size": "2MB"})
    data = with_key(data, "connectors[0].delivery", {"oversize": {"threshold": "3MB", "schedule": "every 2h"}})
    assert error_of(data) == ("connectors[0].delivery.oversize.threshold: 3MB is larger than "
                              "content_restrictions.max_message_size (2MB)")
    ok = with_key(data, "connectors[0].delivery.oversize.threshold", "2MB")
    assert build(ok).connectors[0].delivery.oversize.threshold == 2 * 1024 ** 2


@pytest.mark.parametrize("data, message", [
    (None, "the configuration is empty"),
    ([1, 2], "expected a mapping with the sections gateway, virtual_servers, connectors, plugins; got a list"),
])
def test_top_level_must_be_a_mapping(data, message):
    assert message in error_of(data)


def test_a_connector_key_for_a_later_plugin_lands_in_extra(monkeypatch):
    """How a later task adds a connector key without a dataclass field: one line in the table."""
    from mta.config import loader as L
    monkeypatch.setitem(L.CONNECTOR.keys, "dequeue_command", L.Key(L.string, extra=True))
    config = build(with_key(minimal(), "connectors[0].dequeue_command", "ETRN example.test"))
    assert config.connectors[0].extra == {"dequeue_command": "ETRN example.test"}
    assert "dequeue_command" in error_of(with_key(minimal(), "connectors[0].dequeue_comand", "x"))


def test_every_dataclass_field_has_a_yaml_key():
    """Guard for later tasks: a field added to a config dataclass needs its line in the loader's table."""
    from dataclasses import fields
    from mta.config import loader as L
    for section in (L.GATEWAY, L.DNS, L.QUEUE, L.LIMITS, L.RELAY, L.TLS, L.AUTH, L.PROTOCOL_LOG,
                    L.VIRTUAL_SERVER, L.CONTENT_RESTRICTIONS, L.OVERSIZE, L.DELIVERY, L.DELIVERY_RESTRICTIONS,
                    L.CONNECTOR):
        mapped = {k.field or name for name, k in section.keys.items() if not k.extra}
        if section.extra_field:
            mapped.add(section.extra_field)
        assert mapped == {f.name for f in fields(section.cls)}, section.cls.__name__


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([p for p, _, _ in ERRORS] + ["gateway.local_domains", "plugins", "connectors[0]",
                                                    "virtual_servers[0]", "connectors[0].delivery.schedule"]),
       st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12),
                              st.sampled_from(["*", "10MB", "127.0.0.1:25", "every 2h", "08:00-09:00"])),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                    max_leaves=8))
def test_any_value_anywhere_gives_a_config_or_a_config_error(path, value):
    try:
        result = build(with_key(minimal(), path, value))
    except ConfigError:
        return
    assert isinstance(result, Config)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_any_file_text_gives_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "g.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load(str(path))
    except ConfigError:
        pass


# -- reading files -------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigFileError) as e:
        load(path)
    assert str(e.value) == f"{path}: no such file"


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("gateway:\n  hostname: mail.example.test\n  spool: [var/spool\nvirtual_servers: []\n")
    with pytest.raises(ConfigFileError) as e:
        load(str(path))
    assert re.match(rf"{re.escape(str(path))}: line \d+, column \d+: invalid YAML: ", str(e.value))


def test_duplicate_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("gateway:\n  hostname: a.test\n  hostname: b.test\n")
    with pytest.raises(ConfigFileError) as e:
        load(str(path))
    assert str(e.value) == (f"{path}: line 3, column 3: invalid YAML: "
                            "duplicate key 'hostname' (first at line 2)")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigFileError) as e:
        load(str(tmp_path))                      # a directory
    assert str(e.value).startswith(f"{tmp_path}: cannot read the file")


def test_key_errors_from_a_file_name_the_key(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(with_key(minimal(), "virtual_servers[0].limits.max_recipients", "lots")))
    with pytest.raises(ConfigError) as e:
        load(str(path))
    assert str(e.value) == "virtual_servers[0].limits.max_recipients: expected an integer, got 'lots'"


# -- smtpgw check-config -------------------------------------------------------------------------

def test_check_config_ok(capsys):
    assert cli.main(["check-config", "-c", str(DEFAULT_FILE)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{DEFAULT_FILE}: OK"
    assert "  Default SMTP Virtual Server: 127.0.0.1:2525; relay: authenticated clients; no TLS; " \
           "max 10MB, 64000 recipients, timeout 5m" in out
    assert "  * cost 1: Internet SMTP connector via DNS MX; schedule always; " \
           "bridgeheads Default SMTP Virtual Server" in out
    assert "plugins: relay_acl, smart_host, etrn_dequeue, diag_logging" in out


def test_check_config_lists_connectors_in_routing_order(tmp_path, capsys):
    data = minimal()
    data["connectors"] = [
        {"name": "Dial-up", "address_spaces": [{"domain": "*", "cost": 50}], "smart_hosts": ["[192.0.2.9]"]},
        {"name": "Internet", "address_spaces": [{"domain": "*", "cost": 1}]},
        {"name": "Partner", "address_spaces": ["*.partner.example", "partner.example"],
         "delivery": {"schedule": "every 2h"}},
    ]
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(data))
    assert cli.main(["check-config", "-c", str(path)]) == 0
    routes = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines() if " cost " in line]
    assert routes == ["partner.example cost 1", "*.partner.example cost 1", "* cost 1", "* cost 50"]


def test_check_config_error_goes_to_stderr_with_status_2(tmp_path, capsys):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(with_key(minimal(), "connectors[0].bridgeheads", ["X"])))
    assert cli.main(["check-config", "-c", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"{path}: connectors[0].bridgeheads[0]: no virtual server named 'X'\n"


def test_check_config_missing_file(tmp_path, capsys):
    path = tmp_path / "absent.yaml"
    assert cli.main(["check-config", "-c", str(path)]) == 2
    assert capsys.readouterr().err == f"{path}: no such file\n"


def test_no_subcommand_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "check-config" in capsys.readouterr().err


def test_unknown_subcommand_is_a_usage_error(capsys):
    assert cli.main(["frobnicate"]) == 2


def test_help_exits_0(capsys):
    assert cli.main(["--help"]) == 0
    assert "check-config" in capsys.readouterr().out


def test_console_script(tmp_path):
    """The installed `smtpgw` command, as an administrator runs it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(with_key(minimal(), "virtual_servers[0].limits.max_recipients", "lots")))
    exe = Path(sys.executable).with_name("smtpgw")
    argv0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "mta.cli.main"]
    good = subprocess.run([*argv0, "check-config", "-c", str(DEFAULT_FILE)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith(f"{DEFAULT_FILE}: OK\n")
    failed = subprocess.run([*argv0, "check-config", "-c", str(bad)], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env={**os.environ})
    assert failed.returncode == 2
    assert failed.stderr == f"{bad}: virtual_servers[0].limits.max_recipients: expected an integer, got 'lots'\n"
