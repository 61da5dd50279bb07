"""The durable MTA-STS policy cache: one JSON file per domain under ``gateway.mta_sts.cache``.

RFC 8461 5.1 makes the cache part of the security: a policy once seen stays in force for its
``max_age`` even when an attacker later blocks the TXT lookup or the HTTPS fetch. So it must survive
restarts: each file is written to a temporary name, fsync'd, renamed over the old one and the
directory fsync'd, in a thread (never the reactor's). Workers share the folder; a rename is atomic,
so a reader sees the old policy or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.spool.files import NotAFile, open_regular, sync_directory, write_synced
from mta.delivery.sts_policy import Policy, PolicyError, parse_policy

log = Logger(namespace="smtpgw.mta-sts")

_DOMAIN = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?\Z")


@dataclass(frozen=True)
class CachedPolicy:
    policy: Policy
    fetched: float                  # Unix time
    expires: float                  # fetched + max_age


def _path(directory: str, domain: str) -> str | None:
    """The file for ``domain``; None for a name that is no plain (A-label) domain name."""
    name = domain.lower().rstrip(".")
    if not _DOMAIN.match(name) or ".." in name:
        return None
    return os.path.join(directory, name + ".json")


def read_policy(directory: str, domain: str) -> tuple[CachedPolicy | None, str | None]:
    """Blocking: ``(the cached policy of domain or None, what is wrong with its file or None)``. A
    damaged file (empty, junk, a directory, a FIFO that would block this thread) counts as no policy."""
    path = _path(directory, domain)
    if path is None:
        return None, None
    try:
        with open_regular(path) as f:
            data = json.loads(f.read().decode("utf-8"))
        policy = parse_policy(data["policy"], str(data["id"]))
        return CachedPolicy(policy, float(data["fetched"]), float(data["expires"])), None
    except FileNotFoundError:
        return None, None
    except OSError as e:
        return None, f"{path}: unreadable: {e.strerror or e}"
    except NotAFile as e:
        return None, f"{path}: {e}, not a policy file"
    except (ValueError, KeyError, TypeError, PolicyError) as e:
        return None, f"{path}: damaged: {type(e).__name__}: {e}"


def write_policy(directory: str, domain: str, cached: CachedPolicy) -> None:
    """Blocking: write-sync-rename, then sync the directory (a crash leaves old or new, never torn)."""
    path = _path(directory, domain)
    if path is None:
        return
    os.makedirs(directory, mode=0o750, exist_ok=True)
    data = {"domain": domain, "id": cached.policy.id, "fetched": cached.fetched,
            "expires": cached.expires, "policy": cached.policy.text}
    write_synced(f"{path}.{os.getpid()}.tmp", path, [json.dumps(data).encode("utf-8")])
    sync_directory(directory)


class PolicyCache:
    """The cache as Deferreds: reads and writes run in the reactor's thread pool."""

    def __init__(self, directory: str, reactor: Any) -> None:
        self.directory = directory
        self.reactor = reactor

    def load(self, domain: str) -> defer.Deferred:
        """The cached policy or None; a damaged file is logged (once per load) and counts as none."""
        d = deferToThreadPool(self.reactor, self.reactor.getThreadPool(), read_policy, self.directory, domain)
        return d.addCallback(self._loaded, domain)

    @staticmethod
    def _loaded(found: tuple[CachedPolicy | None, str | None], domain: str) -> CachedPolicy | None:
        cached, problem = found
        if problem is not None:
            log.warn("MTA-STS: cached policy of {domain} ignored: {problem}; it is looked up afresh",
                     domain=domain, problem=problem)
        return cached

    def store(self, domain: str, cached: CachedPolicy) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), write_policy,
                                 self.directory, domain, cached)


__all__ = ["CachedPolicy", "PolicyCache", "read_policy", "write_policy"]
