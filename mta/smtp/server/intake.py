"""How many mail transactions a worker has open at once, and the sessions waiting to open one.

Why: a transaction holds its envelope, its addresses, its message and the Deferreds that carry it
to the spool until the spool has it on disk (about 5 KB for a small message), and the spool takes a
few hundred messages a second. When 10,000 idle clients all send at once, every one of them had
opened its transaction within a second or two, so a worker held its whole share of the burst
(5,000 messages, about 25 MB) while the spool worked through it: that was the peak of the memory
while sending. Like Postfix's ``in_flow_delay`` (arrivals faster than deliveries wait before a new
message is accepted), a session whose next command is MAIL waits while :data:`LIMIT` transactions
are open in this process: it stops reading, the command stays unanswered in its buffer (the rest in
the kernel's), and it goes on, oldest first, as soon as a transaction closes. Nothing is refused and
no reply changes; what waits is the 250 to MAIL.

A transaction is open from its accepted MAIL until it ends: reset (RSET, HELO, a refusal, the
connection lost) or, after its message, once that is queued or refused. A session does not wait
longer than :data:`MAX_WAIT`: transactions that slow clients keep open delay the others by that
much at most, and never stop them. Below the limit the whole cost is a comparison per command.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

LIMIT = 1000        # open transactions per worker before a new MAIL waits (the spool's batch is 512)
MAX_WAIT = 30.0     # seconds at most that a MAIL waits, however many transactions stay open
TICK = 1.0          # how often the waiters past MAX_WAIT are looked for (one timer for all)


class Intake:
    """The count of open transactions and the queue of sessions waiting to open one (see the module)."""

    def __init__(self, reactor: Any, limit: int = LIMIT, max_wait: float = MAX_WAIT) -> None:
        self.reactor = reactor
        self.limit = limit
        self.max_wait = max_wait
        self.open = 0
        self.full = False               # a plain attribute: read before every MAIL
        self._waiting: collections.deque[tuple[float, Callable[[], None]]] = collections.deque()
        self._wake_call: Any = None
        self._tick_call: Any = None

    def begin(self) -> None:
        """A transaction opened (its MAIL accepted)."""
        self.open += 1
        if self.open >= self.limit:
            self.full = True

    def end(self) -> None:
        """A transaction ended; waiting sessions go on from the next reactor turn (never from inside
        the session that ended it, which may be in the middle of its own input)."""
        self.open -= 1
        if self.open < self.limit:
            self.full = False
            if self._waiting and self._wake_call is None:
                self._wake_call = self.reactor.callLater(0, self._wake)

    def wait(self, go_on: Callable[[], None]) -> None:
        """Call ``go_on()`` once there is room, or after :data:`MAX_WAIT` seconds at most; it must
        cope with a connection that closed meanwhile."""
        self._waiting.append((self.reactor.seconds(), go_on))
        if self._tick_call is None:
            self._tick_call = self.reactor.callLater(TICK, self._tick)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _wake(self) -> None:
        """Let the oldest waiters go on while there is room (each opens its transaction at once, or
        finds that it has none to open: a closed connection, a command not yet complete)."""
        self._wake_call = None
        waiting = self._waiting
        while waiting and not self.full:
            waiting.popleft()[1]()

    def _tick(self) -> None:
        self._tick_call = None
        waiting = self._waiting
        oldest = self.reactor.seconds() - self.max_wait
        while waiting and waiting[0][0] <= oldest:
            waiting.popleft()[1]()
        if waiting:
            self._tick_call = self.reactor.callLater(TICK, self._tick)


def of(gateway: Any) -> Intake:
    """The gateway's intake (one per process, shared by its virtual servers), made on first use."""
    intake = getattr(gateway, "intake", None)
    if intake is None:
        intake = gateway.intake = Intake(gateway.reactor)
    return intake
