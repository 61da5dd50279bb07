"""Slowing down password guessing at the console's login form.

After :data:`LIMIT` wrong passwords from one client within :data:`WINDOW` seconds, that client's
logins are refused (``429 Too Many Requests`` with ``Retry-After``) until the oldest of those failures
is :data:`WINDOW` seconds old; a right password clears its count. The count is per client address,
never per user name: a guesser elsewhere cannot lock the administrator out. An IPv6 client counts by
its /64, the block one host is usually given (so it cannot step through its own addresses). The
refusal is decided before the password is checked, so a guesser costs no scrypt work either.
"""
from __future__ import annotations

import ipaddress
from collections import deque
from typing import Callable

LIMIT = 5
WINDOW = 300.0
MAX_CLIENTS = 10000         # addresses remembered at once; the stalest are forgotten beyond it


def client_key(address: str) -> str:
    """The address a failure counts against: the address itself, an IPv6 one's /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class LoginThrottle:
    """Wrong passwords per client over the last :data:`WINDOW` seconds; ``clock`` gives the time."""

    def __init__(self, clock: Callable[[], float], limit: int = LIMIT, window: float = WINDOW) -> None:
        self.clock, self.limit, self.window = clock, limit, window
        self._failures: dict[str, deque[float]] = {}
        self._checking: dict[str, int] = {}             # password checks running, per client

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, or None when it may now. Checks still running
        count as failures until they end, so tries sent at once cannot outrun the count."""
        now = self.clock()
        key = client_key(address)
        times = self._recent(key, now)
        failures = len(times) if times is not None else 0
        if failures + self._checking.get(key, 0) < self.limit:
            return None
        if failures < self.limit:
            return 1.0                  # the checks in flight decide: ask again in a moment
        return max(1.0, times[-self.limit] + self.window - now)

    def start(self, address: str) -> float | None:
        """Before a password check: ``retry_after``, and when the client may try, its check counted
        as running until :meth:`finish`."""
        wait = self.retry_after(address)
        if wait is None:
            key = client_key(address)
            self._checking[key] = self._checking.get(key, 0) + 1
        return wait

    def finish(self, address: str, ok: bool | None) -> bool:
        """After the check :meth:`start` let through: ``ok`` True (right password: the count is
        cleared), False (wrong: counted), None (no answer, e.g. the users file unreadable: not the
        client's doing). True when this wrong password used up the client's tries."""
        key = client_key(address)
        left = self._checking.get(key, 0) - 1
        if left > 0:
            self._checking[key] = left
        else:
            self._checking.pop(key, None)
        if ok is None:
            return False
        if ok:
            self.succeeded(address)
            return False
        return self.failed(address)

    def failed(self, address: str) -> bool:
        """Count a wrong password; True when this one used up the client's tries."""
        now = self.clock()
        key = client_key(address)
        times = self._recent(key, now)
        if times is None:
            if len(self._failures) >= MAX_CLIENTS:
                self._forget_stalest()
            times = self._failures[key] = deque(maxlen=self.limit)
        times.append(now)
        return len(times) >= self.limit

    def succeeded(self, address: str) -> None:
        self._failures.pop(client_key(address), None)

    def _forget_stalest(self) -> None:
        stalest = sorted(self._failures, key=lambda k: self._failures[k][-1])
        for key in stalest[:max(1, len(stalest) // 10)]:
            del self._failures[key]
