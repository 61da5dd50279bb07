"""A real DNS server for tests: dnsmasq on a loopback address, serving only the records a test adds.

The gateway resolves MX and A/AAAA through dnspython against ``gateway.dns.nameservers``; pointing
that at this server exercises the real resolver path (UDP, TCP fallback, NXDOMAIN, NODATA, null MX)
without touching any outside network.  dnsmasq runs with no upstream, no /etc/hosts and no
resolv.conf, and is authoritative-ish (``--local``) for the test zones, so a name nobody added gets
NXDOMAIN rather than REFUSED.  Names outside the zones get REFUSED (dnspython: NoNameservers).

Usage::

    dns = DNSServer("127.0.0.53")
    dns.add_mx("example.test", "mx1.example.test", 10)
    dns.add_a("mx1.example.test", "127.0.0.41")
    dns.start()
    ...  DnsConfig(nameservers=(dns.address,))
    dns.stop()

Changing records after ``start()`` takes effect at ``restart()`` (same address and port).
"""
from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref

import dns.exception
import dns.message
import dns.query

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
START_TIMEOUT = 5.0

_running: "weakref.WeakSet[DNSServer]" = weakref.WeakSet()


def _stop_all() -> None:
    for server in list(_running):
        server.stop()


atexit.register(_stop_all)


def free_port(host: str) -> int:
    """A port free for both TCP and UDP on ``host`` (DNS needs both); racy but fine for tests."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind((host, 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no free TCP+UDP port on {host}")


class DNSServer:
    """dnsmasq serving test records on ``listen``; see the module docstring."""

    def __init__(self, listen: str = "127.0.0.53", port: int | None = None,
                 zones: tuple[str, ...] = ("test",), ttl: int = 60, log_queries: bool = False) -> None:
        self.listen = listen
        self.port = port
        self._fixed_port = port is not None
        self.zones = zones
        self.ttl = ttl
        self.log_queries = log_queries
        self._mx: list[str] = []
        self._hosts: dict[str, list[str]] = {}
        self._cnames: list[str] = []
        self._ptrs: list[str] = []
        self._txts: list[str] = []
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- records ----------------------------------------------------------------------------

    @staticmethod
    def _name(name: str) -> str:
        return name.lower().rstrip(".")

    def add_mx(self, domain: str, host: str, preference: int = 10) -> "DNSServer":
        self._mx.append(f"--mx-host={self._name(domain)},{self._name(host)},{int(preference)}")
        return self

    def add_null_mx(self, domain: str) -> "DNSServer":
        """RFC 7505 ``MX 0 .``: the domain accepts no mail."""
        self._mx.append(f"--mx-host={self._name(domain)},.,0")
        return self

    def add_a(self, name: str, ip: str) -> "DNSServer":
        """An A record (also gives the matching PTR, as dnsmasq's host-record does)."""
        self._hosts.setdefault(self._name(name), []).append(ip)
        return self

    def add_aaaa(self, name: str, ip: str) -> "DNSServer":
        self._hosts.setdefault(self._name(name), []).append(ip)
        return self

    def add_txt(self, name: str, *strings: str) -> "DNSServer":
        """A TXT record of one or more character-strings (each at most 255 octets; dnsmasq's command
        line separates strings with commas and takes no quoting, so none may hold a comma)."""
        if any("," in t for t in strings):
            raise ValueError("dnsmasq cannot serve a TXT string with a comma from its command line")
        self._txts.append(f"--txt-record={self._name(name)},{','.join(strings)}")
        return self

    def remove_txt(self, name: str) -> "DNSServer":
        prefix = f"txt-record={self._name(name)},"
        self._txts[:] = [t for t in self._txts if not t.lstrip("-").startswith(prefix)]
        return self

    def add_cname(self, name: str, target: str) -> "DNSServer":
        self._cnames.append(f"--cname={self._name(name)},{self._name(target)}")
        return self

    def add_ptr(self, ip: str, name: str) -> "DNSServer":
        import ipaddress
        rev = ipaddress.ip_address(ip).reverse_pointer
        self._ptrs.append(f"--ptr-record={rev},{self._name(name)}")
        return self

    def add_txt(self, name: str, text: str) -> "DNSServer":
        """A TXT record (SPF, DKIM key, DMARC policy); text longer than 255 octets is split into
        several strings of one record, as a zone file would (RFC 1035 3.3.14, RFC 6376 3.6.2.2)."""
        parts = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
        for part in parts:
            if any(c in part for c in '"\\'):
                raise ValueError(f"dnsfixture cannot serve a TXT string with quotes or backslashes: {part!r}")
        if any("," in p for p in parts):
            # the command line splits strings at commas; dnsmasq's configuration file takes them
            # quoted (a TLSRPT record's rua list)
            self._txts.append(f"txt-record={self._name(name)}," + ",".join(f'"{p}"' for p in parts))
        else:
            self._txts.append(f"--txt-record={self._name(name)}," + ",".join(parts))
        return self

    def clear(self) -> "DNSServer":
        self._mx.clear()
        self._txts.clear()
        self._hosts.clear()
        self._cnames.clear()
        self._ptrs.clear()
        self._txts.clear()
        return self

    # -- process ----------------------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """``(ip, port)``, as ``gateway.dns.nameservers`` takes it."""
        if self.port is None:
            raise RuntimeError("DNSServer not started")
        return (self.listen, self.port)

    @property
    def nameservers(self) -> tuple[tuple[str, int], ...]:
        return (self.address,)

    def _args(self) -> list[str]:
        in_file = [t for t in self._txts if not t.startswith("--")]
        conf = "/dev/null"
        if in_file:
            handle, conf = tempfile.mkstemp(prefix="dnsfixture-", suffix=".conf")
            with os.fdopen(handle, "w") as f:
                f.write("\n".join(in_file) + "\n")
            atexit.register(lambda: os.path.exists(conf) and os.unlink(conf))
        args = [DNSMASQ, "--keep-in-foreground", f"--conf-file={conf}", "--no-resolv", "--no-hosts",
                "--no-poll", "--pid-file=", f"--listen-address={self.listen}", "--bind-interfaces",
                f"--port={self.port}", f"--local-ttl={self.ttl}", "--log-facility=-"]
        if self.log_queries:
            args.append("--log-queries")
        for zone in self.zones + ("in-addr.arpa", "ip6.arpa"):
            args.append(f"--local=/{zone}/")
        args += self._mx
        args += [f"--host-record={name},{ip}" for name, ips in self._hosts.items() for ip in ips]
        args += self._cnames + self._ptrs + [t for t in self._txts if t.startswith("--")]
        return args

    def start(self) -> "DNSServer":
        if self._proc is not None:
            return self
        last_error = ""
        for _ in range(1 if self._fixed_port else 5):
            if not self._fixed_port:
                self.port = free_port(self.listen)
            self._log = tempfile.TemporaryFile()
            self._proc = subprocess.Popen(self._args(), stdin=subprocess.DEVNULL, stdout=self._log,
                                          stderr=subprocess.STDOUT)
            if self._wait_ready():
                _running.add(self)
                return self
            last_error = self._read_log()
            self._kill()
        raise RuntimeError(f"dnsmasq did not start on {self.listen}:{self.port}: {last_error}")

    def _wait_ready(self) -> bool:
        """Poll with a real query until dnsmasq answers (any rcode), it exits, or time runs out."""
        assert self._proc is not None
        probe = dns.message.make_query(f"dnsfixture-probe.{self.zones[0]}", "A")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                dns.query.udp(probe, self.listen, port=self.port, timeout=0.1)
                return True
            except (dns.exception.Timeout, OSError):
                time.sleep(0.01)
        return False

    def _read_log(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    @property
    def log(self) -> str:
        """What dnsmasq printed (queries too with ``log_queries=True``)."""
        return self._read_log()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        _running.discard(self)
        self._kill()

    def restart(self) -> "DNSServer":
        """Apply changed records: stop, then start again on the same address and port."""
        port, fixed = self.port, self._fixed_port
        self.stop()
        if port is None:               # never started: a plain start
            return self.start()
        self.port, self._fixed_port = port, True
        try:
            return self.start()
        finally:
            self._fixed_port = fixed

    def __enter__(self) -> "DNSServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":    # a quick manual check: python tests/dnsfixture.py
    with DNSServer(log_queries=True) as s:
        s.add_null_mx("null.test")
        s.restart()
        r = dns.query.udp(dns.message.make_query("null.test", "MX"), s.listen, port=s.port, timeout=1)
        print(s.address, r.answer)
