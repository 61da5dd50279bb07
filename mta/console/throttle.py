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
        """Seconds until ``address`` may try again, or None when it may now."""
        now = self.clock()
        times = self._recent(client_key(address), now)
        if times is None or len(times) < self.limit:
            return None
        return max(1.0, times[-self.limit] + self.window - now)

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
