"""RSA signatures for dkimpy through OpenSSL (``cryptography``) instead of its pure-Python arithmetic.

dkimpy computes the RSA private-key operation with Python integers: about 9 ms per 2048-bit signature
on the benchmark machine, all of it holding the GIL, so the event loop stalls while a pool thread
signs. OpenSSL does the same in well under a millisecond and releases the GIL. PKCS#1 v1.5 signatures
are deterministic, so the bytes are exactly those dkimpy would have produced (tests/test_dkim_sign.py
checks it). dkimpy resolves its primitive ``dkim.RSASSA_PKCS1_v1_5_sign`` at call time; :func:`install`
replaces it for the process, for both DKIM signatures and ARC seals.

dkimpy also parses the PEM private key for every signature (base64 and its ASN.1 reader, in Python:
about 0.2 ms of the 0.7 ms a 4 KB message took); :func:`install` has it parse each key once, keeping
dkimpy's own result for the next signature with the same key.
"""
from __future__ import annotations

from typing import Any

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_keys: dict[int, rsa.RSAPrivateKey] = {}          # by modulus: built once per key
_parsed: dict[bytes, dict[str, int]] = {}         # dkimpy's parse of each PEM key
MAX_KEYS = 256      # more distinct keys than any configuration names (SIGHUP brings new ones): start over


def _key(numbers: dict[str, int]) -> rsa.RSAPrivateKey:
    key = _keys.get(numbers["modulus"])
    if key is None:
        public = rsa.RSAPublicNumbers(numbers["publicExponent"], numbers["modulus"])
        key = rsa.RSAPrivateNumbers(numbers["prime1"], numbers["prime2"], numbers["privateExponent"],
                                    numbers["exponent1"], numbers["exponent2"], numbers["coefficient"],
                                    public).private_key()
        _keys[numbers["modulus"]] = key
    return key


def sign(digest: Any, private_key: dict[str, int]) -> bytes:
    """dkimpy's ``RSASSA_PKCS1_v1_5_sign(hash, private_key)``: ``hash`` a hashlib object, the key
    as dkimpy parsed it."""
    algorithm = _HASHES[digest.name]()
    return _key(private_key).sign(digest.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm))


def parse_pem_private_key(data: bytes) -> dict[str, int]:
    """dkimpy's ``parse_pem_private_key``, once per key (dkimpy neither keeps nor changes the result)."""
    parsed = _parsed.get(data)
    if parsed is None:
        if len(_parsed) >= MAX_KEYS:
            _parsed.clear()
        parsed = _parsed[data] = dkim.crypto.parse_pem_private_key(data)
    return parsed


def install() -> None:
    dkim.RSASSA_PKCS1_v1_5_sign = sign
    dkim.parse_pem_private_key = parse_pem_private_key
