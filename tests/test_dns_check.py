"""``smtpgw dns-check DOMAIN`` against a real DNS server (dnsmasq) serving good and broken zones."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from dnsfixture import DNSServer
from gwprocess import base_config
from test_cli_queue import smtpgw_command

from mta.cli.main import main

DNS_HOST = "127.0.0.119"


class ZonesWithText(DNSServer):
    """The fixture plus TXT records: a name that exists but has no MX and no address."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.txt: list[str] = []

    def _args(self) -> list[str]:
        return super()._args() + self.txt


@pytest.fixture(scope="module")
def zones():
    s = ZonesWithText(listen=DNS_HOST)
    # good.test: two MX hosts with addresses whose PTRs name them
    s.add_mx("good.test", "mx2.good.test", 20).add_mx("good.test", "mx1.good.test", 10)
    s.add_a("mx1.good.test", "127.0.0.111").add_a("mx2.good.test", "127.0.0.112")
    # mismatch.test: the MX host's address has a PTR naming another host
    s.add_a("other.test", "127.0.0.115")
    s.add_mx("mismatch.test", "mx.mismatch.test", 10).add_a("mx.mismatch.test", "127.0.0.115")
    # noptr.test: PTR names a host that does not exist
    s.add_ptr("127.0.0.116", "nowhere.test")
    s.add_mx("noptr.test", "mx.noptr.test", 10).add_a("mx.noptr.test", "127.0.0.116")
    # broken ones
    s.add_mx("ipmx.test", "127.0.0.117", 10)                         # MX written as an IP
    s.add_cname("alias.good.test", "mx1.good.test")
    s.add_mx("cname.test", "alias.good.test", 5)                     # MX pointing at a CNAME
    s.add_null_mx("null.test")
    s.add_a("implicit.test", "127.0.0.113")                          # no MX, an A record
    s.txt.append("--txt-record=empty.test,nothing here")             # exists: no MX, no A
    s.add_mx("half.test", "mx1.good.test", 10).add_mx("half.test", "gone.half.test", 5)
    s.start()
    yield s
    s.stop()


def check(zones: DNSServer, capsys, domain: str, *extra: str) -> tuple[int, str]:
    host, port = zones.address
    status = main(["dns-check", "--server", f"{host}:{port}", "--timeout", "3", domain, *extra])
    return status, capsys.readouterr().out


def warnings(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("WARN:")]


def test_good_domain_lists_mx_by_preference_with_addresses_and_ptrs(zones, capsys):
    status, out = check(zones, capsys, "good.test")
    assert status == 0, out
    assert warnings(out) == []
    lines = out.splitlines()
    mx1 = next(i for i, line in enumerate(lines) if line.strip() == "10  mx1.good.test")
    mx2 = next(i for i, line in enumerate(lines) if line.strip() == "20  mx2.good.test")
    assert mx1 < mx2
    assert "127.0.0.111" in lines[mx1 + 1] and "PTR mx1.good.test (matches)" in lines[mx1 + 1]
    assert "RESULT: mail to good.test can be delivered" in out


def test_json_output(zones, capsys):
    status, out = check(zones, capsys, "good.test", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["deliverable"] is True and doc["warnings"] == []
    assert [(m["preference"], m["host"]) for m in doc["mx"]] == [(10, "mx1.good.test"), (20, "mx2.good.test")]
    assert doc["mx"][0]["addresses"] == [{"type": "A", "address": "127.0.0.111", "ptr": ["mx1.good.test"],
                                          "ptr_confirmed": True, "ptr_error": None}]


@pytest.mark.parametrize("domain, status, expected", [
    ("null.test", 1, "null MX"),
    ("missing.test", 1, "does not exist (NXDOMAIN)"),
    ("empty.test", 1, "no MX and no A/AAAA record"),
    ("ipmx.test", 1, "is an IP address, not a host name"),
    ("cname.test", 0, "is an alias (CNAME for mx1.good.test)"),
    ("implicit.test", 0, "has no MX record"),
    ("mismatch.test", 0, "PTR mismatch: its PTR names other.test, not mx.mismatch.test"),
    ("noptr.test", 0, "PTR mismatch: its PTR names nowhere.test, which does not resolve back"),
    ("half.test", 0, "MX 5 gone.half.test cannot be reached"),
])
def test_broken_zones_warn(zones, capsys, domain, status, expected):
    got, out = check(zones, capsys, domain)
    assert got == status, out
    assert any(expected in w for w in warnings(out)), out
    assert ("can NOT be delivered" in out) == (status == 1)


def test_strict_fails_on_any_warning(zones, capsys):
    assert check(zones, capsys, "cname.test", "--strict")[0] == 1
    assert check(zones, capsys, "good.test", "--strict")[0] == 0


def test_usage_errors(capsys):
    assert main(["dns-check", "--server", "127.0.0.119:53", "not a domain!"]) == 2
    assert main(["dns-check", "--server", "nameserver.test", "good.test"]) == 2
    assert main(["dns-check", "-c", "/nonexistent/gateway.yaml", "good.test"]) == 2


def test_uses_the_configured_nameservers(zones, tmp_path):
    """As administrators run it: the console script, the servers from gateway.dns.nameservers."""
    host, port = zones.address
    cfg = base_config(tmp_path)
    cfg["gateway"]["dns"]["nameservers"] = [f"{host}:{port}"]
    path = Path(tmp_path) / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([*smtpgw_command(), "dns-check", "-c", str(path), "good.test"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"DNS servers: {host}:{port}" in r.stdout and "10  mx1.good.test" in r.stdout
