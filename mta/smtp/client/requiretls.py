"""REQUIRETLS (RFC 8689) on the way out: a message the sender sent with ``MAIL FROM:<..> REQUIRETLS``.

The server keeps the parameter with the message (``mail_params``, as every MAIL parameter). Each hop
it goes to must then be reached over TLS that was *validated* -- by the destination's MTA-STS policy
in enforce mode, by DANE, or by the connector's own ``tls: verify`` -- and must itself offer
REQUIRETLS, so the promise travels with the message to its last hop. A hop where either is missing
is left before MAIL and the next MX host is tried (RFC 8689 4.2.1); when none will do, the message is
not sent in clear or to an unvalidated host: it is bounced with ``5.7.10`` (RFC 8689 5), and the
bounce returns its headers only (:mod:`mta.dsn.reports`). The keyword is sent on only after
STARTTLS, and only with the certificate validated.

The ``TLS-Required: No`` header field (RFC 8689 5) is the opposite request: the sender would rather
have the message delivered than protected, so the destination's policies (MTA-STS) are not applied
to it. It counts only without REQUIRETLS (which always wins).
"""
from __future__ import annotations

import re
from typing import Iterable

from mta.model.queue_entry import QueueEntry
from mta.smtp import replies as R
from mta.smtp.reply import Reply

KEYWORD = "REQUIRETLS"
MAX_HEADER_SCAN = 256 * 1024        # the header section is searched this far, no further
_STEP = 8192                        # octets of a chunk added to the search at a time
_WAIVER = re.compile(rb"(?im)^TLS-Required[ \t]*:[ \t]*No[ \t]*(\r\n|\Z)")


def requested(entry: QueueEntry) -> bool:
    """Whether the message came in with ``MAIL FROM:<..> REQUIRETLS``."""
    params = entry.extra.get("mail_params")
    return bool(params) and KEYWORD in params


def header_section(chunks: Iterable[bytes], limit: int = MAX_HEADER_SCAN) -> bytes:
    """The message's header section (up to its first empty line), at most ``limit`` bytes of it."""
    taken = bytearray(b"\r\n")      # as if a line had just ended: an empty first line ends it at once
    for chunk in chunks:            # a slice at a time: a big first chunk is not copied whole
        for offset in range(0, len(chunk), _STEP):
            start = max(len(taken) - 3, 0)
            taken += chunk[offset:offset + _STEP] if offset or len(chunk) > _STEP else chunk
            end = taken.find(b"\r\n\r\n", start)
            if end >= 0:
                return bytes(taken[2:end + 2])
            if len(taken) > limit:
                return bytes(taken[2:limit + 2])
    return bytes(taken[2:limit + 2])


def waives_policy(chunks: Iterable[bytes]) -> bool:
    """Whether the message carries ``TLS-Required: No``."""
    return _WAIVER.search(header_section(chunks)) is not None


def unmet(reply: Reply) -> bool:
    """Whether ``reply`` is a hop refused because REQUIRETLS could not be met there (5.7.10)."""
    return reply.status == "5.7.10" and reply.text.startswith("REQUIRETLS:")


def no_validated_tls(domain: str, connector: str) -> Reply:
    return R.requiretls_unmet(f"no validated TLS to {domain}: it publishes no MTA-STS policy in enforce "
                              f"mode, no MX host has DNSSEC-validated TLSA records (DANE), and connector "
                              f"'{connector}' does not use tls: verify")


def not_validated(hop_label: str) -> Reply:
    return R.requiretls_unmet(f"the TLS session with {hop_label} was not validated")


def not_offered(hop_label: str) -> Reply:
    return R.requiretls_unmet(f"{hop_label} does not offer REQUIRETLS")


__all__ = ["KEYWORD", "header_section", "no_validated_tls", "not_offered", "not_validated", "requested",
           "unmet", "waives_policy"]
