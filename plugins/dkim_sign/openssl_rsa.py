"""RSA signatures for dkimpy through OpenSSL (``cryptography``) instead of its pure-Python arithmetic.

dkimpy computes the RSA private-key operation with Python integers: about 9 ms per 2048-bit signature
on the benchmark machine, all of it holding the GIL, so the event loop stalls while a pool thread
signs. OpenSSL does the same in well under a millisecond and releases the GIL. PKCS#1 v1.5 signatures
are deterministic, so the bytes are exactly those dkimpy would have produced (tests/test_dkim_sign.py
checks it). dkimpy resolves its primitive ``dkim.RSASSA_PKCS1_v1_5_sign`` at call time; :func:`install`
replaces it for the process, for both DKIM signatures and ARC seals.
"""
from __future__ import annotations

from typing import Any

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_HASHES = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}
_keys: dict[int, rsa.RSAPrivateKey] = {}          # by modulus: built once per key


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


def install() -> None:
    dkim.RSASSA_PKCS1_v1_5_sign = sign
