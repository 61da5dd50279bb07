"""What DKIM signing costs per message: dkim_sign's own signing function, timed in one thread.

    python bench/dkim_cost.py            # 4 KB and 100 KB messages, RSA-2048 and Ed25519, 2,000 each

dkim_sign runs this function for every message it signs (on the reactor thread up to 16 KB times
its keys, in a pool thread above), so the figure is CPU time taken from the gateway per signed message. The first row is dkimpy's own pure-Python RSA
(which also holds the GIL) and its parse of the PEM key for every message, both of which dkim_sign
replaces (openssl_rsa.py: OpenSSL's RSA, each key parsed once; relaxed.py: the canonicalization
without its no-op passes). Keys come from
the same generator as ``smtpgw dkim keygen``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dkim  # noqa: E402

from smtpgw_plugins.dkim_sign import openssl_rsa, relaxed  # noqa: E402
from smtpgw_plugins.dkim_sign.keys import SigningKey, generate, parse_private_key  # noqa: E402
from smtpgw_plugins.dkim_sign.plugin import sign_message  # noqa: E402
from mta.config.loader import DKIM_DEFAULT_HEADERS  # noqa: E402


def make_key(algorithm: str) -> SigningKey:
    pem, _ = generate(algorithm)
    private, public = parse_private_key(pem, algorithm, "key")
    return SigningKey("example.test", "bench", algorithm, private, public)


def message(size: int) -> list[bytes]:
    head = (b"From: Alice <alice@example.test>\r\nTo: bob@example.org\r\nSubject: benchmark\r\n"
            b"Date: Wed, 02 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return [head + line * max(1, (size - len(head)) // len(line))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="messages per case (default 2000)")
    args = parser.parse_args()
    print(f"{'key':<30} {'size':>7} {'ms/message':>11} {'messages/s (one core)':>22}")
    python_rsa, python_parse = dkim.RSASSA_PKCS1_v1_5_sign, dkim.parse_pem_private_key
    cases = [("rsa-sha256", "rsa-sha256, dkimpy's own RSA", False), ("rsa-sha256", "rsa-sha256 (as dkim_sign signs)", True),
             ("ed25519-sha256", "ed25519-sha256", True)]
    for algorithm, label, openssl in cases:
        if openssl:
            openssl_rsa.install()           # OpenSSL's RSA, each PEM key parsed once
            relaxed.install()               # canonicalization without the passes that change nothing
        else:
            dkim.RSASSA_PKCS1_v1_5_sign, dkim.parse_pem_private_key = python_rsa, python_parse
        key = make_key(algorithm)
        for size in (4096, 102400):
            chunks = message(size)
            sign_message(chunks, [key], DKIM_DEFAULT_HEADERS)          # warm up
            started = time.process_time()
            for _ in range(args.n):
                sign_message(chunks, [key], DKIM_DEFAULT_HEADERS)
            per = (time.process_time() - started) / args.n
            print(f"{label:<30} {size // 1024:>5}KB {per * 1000:>11.3f} {1 / per:>22,.0f}")


if __name__ == "__main__":
    main()
