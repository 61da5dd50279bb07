"""A real HTTPS server for tests: serves MTA-STS policy files (``/.well-known/mta-sts.txt``) per host,
and records what is POSTed to it (TLS-RPT reports to an ``https:`` rua).

Python's http.server behind ``ssl`` in a background thread, on a loopback address and port 443 as a
policy host would be, with a certificate from the test's trustme CA. The Host header picks the
policy, so one server stands for ``mta-sts.<domain>`` of several domains::

    server = PolicyServer("127.0.0.60", tlsfixture.server_context(ca, "mta-sts.sts.test")).start()
    server.set_policy("sts.test", "version: STSv1\\nmode: enforce\\nmx: mx1.sts.test\\nmax_age: 86400\\n")
    server.set_response("sts.test", 302, "text/plain", "", {"Location": "https://elsewhere/"})
"""
from __future__ import annotations

import http.server
import ssl
import threading

WELL_KNOWN = "/.well-known/mta-sts.txt"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args: object) -> None:       # quiet
        pass

    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        owner = self.server.owner
        with owner.lock:
            owner.requests.append((host, self.path))
            found = owner.responses.get(host) if self.path == WELL_KNOWN else None
        if found is None:
            status, kind, body, headers = 404, "text/plain", "not found\n", {}
        else:
            status, kind, body, headers = found
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


    def do_POST(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        owner = self.server.owner
        with owner.lock:
            owner.posts.append((host, self.path, dict(self.headers.items()), body))
        self.send_response(owner.post_status)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: "PolicyServer"


class PolicyServer:
    def __init__(self, host: str, context: ssl.SSLContext, port: int = 443) -> None:
        self.host, self.port, self.context = host, port, context
        self.lock = threading.Lock()
        self.responses: dict[str, tuple[int, str, str, dict[str, str]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.posts: list[tuple[str, str, dict[str, str], bytes]] = []     # host, path, headers, body
        self.post_status = 200
        self._server: _Server | None = None

    def set_policy(self, domain: str, text: str) -> "PolicyServer":
        return self.set_response(domain, 200, "text/plain", text)

    def set_response(self, domain: str, status: int, kind: str, body: str,
                     headers: dict[str, str] | None = None) -> "PolicyServer":
        with self.lock:
            self.responses[f"mta-sts.{domain}"] = (status, kind, body, dict(headers or {}))
        return self

    def fetches(self, domain: str) -> int:
        with self.lock:
            return sum(1 for host, _ in self.requests if host == f"mta-sts.{domain}")

    def start(self) -> "PolicyServer":
        server = _Server((self.host, self.port), _Handler)
        server.owner = self
        server.socket = self.context.wrap_socket(server.socket, server_side=True)
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def policy(mode: str, *mx: str, max_age: int = 86400) -> str:
    """A policy file's text, CRLF as RFC 8461 writes it."""
    lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {m}" for m in mx], f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"
