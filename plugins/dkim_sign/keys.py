"""DKIM private keys: read from the files the configuration names, made by ``smtpgw dkim keygen``.

dkimpy signs with an RSA key in PKCS#1 PEM and an Ed25519 key as the base64 of its 32-byte seed;
administrators bring keys from OpenDKIM (``opendkim-genkey``: PKCS#1), OpenSSL 3 (``genpkey``:
PKCS#8) or dkimpy's ``dknewkey`` (the bare seed). So any of these is read with ``cryptography`` and
turned into dkimpy's form once, when the keys are loaded, along with the public half that belongs in
DNS (``p=``), which ``smtpgw dns-check --dkim`` compares with what is published.
"""
from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mta.config import ConfigError

MIN_RSA_BITS = 1024          # RFC 8301 3.2: verifiers refuse shorter keys
KEY_TYPE = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}


@dataclass(frozen=True)
class SigningKey:
    """One ``plugins.dkim_sign.keys[]`` entry, read and ready for dkimpy."""

    domain: str
    selector: str
    algorithm: str          # rsa-sha256 | ed25519-sha256
    private: bytes          # what dkimpy's sign() takes for this algorithm
    public: str             # the base64 ``p=`` value of the DNS record

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def record(self) -> str:
        """The TXT record's text (RFC 6376 3.6.1)."""
        return f"v=DKIM1; k={KEY_TYPE[self.algorithm]}; p={self.public}"

    def covers(self, domain: str) -> bool:
        """The key may sign for ``domain``: the same domain or a subdomain of it."""
        return domain == self.domain or domain.endswith("." + self.domain)


def _from_private(key: Any, algorithm: str, where: str) -> tuple[bytes, str]:
    """(dkimpy's private form, base64 public key) of a cryptography private key."""
    if isinstance(key, rsa.RSAPrivateKey):
        if algorithm != "rsa-sha256":
            raise ConfigError(where, f"the file holds an RSA key but algorithm is {algorithm}")
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(where, f"an RSA key of {key.key_size} bits is refused by verifiers "
                                     f"(RFC 8301); make one of 2048 bits")
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, base64.b64encode(public).decode("ascii")
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if algorithm != "ed25519-sha256":
            raise ConfigError(where, f"the file holds an Ed25519 key but algorithm is {algorithm}")
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(seed), base64.b64encode(public).decode("ascii")
    raise ConfigError(where, f"not an RSA or Ed25519 key ({type(key).__name__})")


def parse_private_key(data: bytes, algorithm: str, where: str) -> tuple[bytes, str]:
    """Read a PEM key (PKCS#1 or PKCS#8, unencrypted) or dkimpy's base64 Ed25519 seed."""
    if b"-----BEGIN" in data:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except TypeError:
            raise ConfigError(where, "the key is encrypted; store it without a passphrase, mode 0600") from None
        except (ValueError, TypeError) as e:
            raise ConfigError(where, f"not a readable PEM private key ({e})") from None
        return _from_private(key, algorithm, where)
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        seed = b""
    if len(seed) != 32:
        raise ConfigError(where, "not a PEM private key nor a base64 Ed25519 seed")
    return _from_private(ed25519.Ed25519PrivateKey.from_private_bytes(seed), algorithm, where)


def read_key(entry: dict[str, Any], where: str) -> SigningKey:
    """One validated ``keys[]`` entry (domain, selector, key, algorithm) -> a :class:`SigningKey`.
    ``where`` is the entry's key path, so an error names ``plugins.dkim_sign.keys[0].key``."""
    path, key_path = entry["key"], f"{where}.key"
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except OSError as e:
        raise ConfigError(key_path, f"cannot read {path!r}: {e.strerror or e} (relative paths are "
                                    f"resolved against the working directory, {os.getcwd()})") from None
    private, public = parse_private_key(data, entry["algorithm"], key_path)
    return SigningKey(entry["domain"], entry["selector"], entry["algorithm"], private, public)


def read_keys(entries: Any, where: str) -> tuple[SigningKey, ...]:
    return tuple(read_key(entry, f"{where}[{i}]") for i, entry in enumerate(entries))


def generate(algorithm: str, bits: int = 2048) -> tuple[bytes, str]:
    """A new private key as PEM (PKCS#1 for RSA, as OpenDKIM writes it; PKCS#8 for Ed25519) and the
    base64 public key for the record."""
    if algorithm == "rsa-sha256":
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        fmt = serialization.PrivateFormat.PKCS8
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return pem, _from_private(key, algorithm, "key")[1]


def zone_line(name: str, text: str) -> str:
    """A zone-file TXT line: strings of at most 255 octets (RFC 1035 3.3.14), the name absolute."""
    parts = [text[i:i + 255] for i in range(0, len(text), 255)]
    return f"{name}. IN TXT " + " ".join(f'"{p}"' for p in parts)
