"""Certificates made in the test (trustme): a CA, server contexts for SMTPPeer, the CA as a PEM file."""
from __future__ import annotations

import ssl
from pathlib import Path

import trustme


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    """A server-side context whose certificate, issued by ``ca``, names ``names`` (hosts or IPs)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def ca_file(ca: trustme.CA, directory: Path, name: str = "ca.pem") -> str:
    path = Path(directory) / name
    ca.cert_pem.write_to_path(str(path))
    return str(path)
