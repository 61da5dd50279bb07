"""The gateway's budget for message bytes held in memory while they are received (``gateway.message_memory``).

The server keeps a message in memory from its first byte until the queue has taken it (or it is
refused), so without a bound the memory would grow with ``max_connections`` x ``max_message_size``,
summed over the virtual servers, and a flood of slow clients each sending a large message could make
it grow that far. Postfix has no such exposure because cleanup writes to disk as the message arrives
(bounded by ``queue_minfree``); we keep messages in memory for speed, so this budget is the bound.

One :class:`MessageMemory` per gateway process, shared by every session of every virtual server. A
session reserves what each read adds to its message (per read, not per line: an integer addition on
the hot path) and gives everything back once the message is queued, refused, reset, or the connection
drops. When a reservation does not fit, that session's message is dropped at once (others can go on),
the rest of it is read and discarded, and the client gets ``452 4.3.1`` to retry later. Reading never
pauses: a pause until memory frees up deadlocks when every session is in the middle of a message.

The envelope counts too: each accepted recipient reserves :func:`recipient_cost` (its RCPT argument,
NOTIFY/ORCPT included, plus what Python spends around it) until the transaction ends, so a session
piling up 64,000 recipients with long ORCPTs meets the same budget as one sending a large message; a
recipient that does not fit is answered ``452 4.3.1`` and the client sends the rest later.

With ``gateway.workers: N`` the key is the gateway's total, and each worker gets ceil(total / N), as
the outbound connection limits are split. The queue's copy of a message for its first delivery attempt
(``mta/queue/manager.py`` ``first_attempt_memory``) has its own limit and is not counted here.
"""
from __future__ import annotations

from mta.workers.identity import WorkerInfo


RECIPIENT_OVERHEAD = 192       # bytes one accepted recipient costs beyond its text (list slot, dict entries, objects)
PARAMETER_OVERHEAD = 192       # and each of its parameters (NOTIFY, ORCPT): a dict entry and two strings


def recipient_cost(argument: str, parameters: int) -> int:
    """What one accepted RCPT holds until its transaction ends: ``argument`` is the command's
    argument (``TO:<address> NOTIFY=.. ORCPT=..``), ``parameters`` how many it carries. Measured
    with tracemalloc (160 bytes + text without parameters, 450 + text with NOTIFY and ORCPT), the
    real cost stays under this estimate."""
    return RECIPIENT_OVERHEAD + PARAMETER_OVERHEAD * parameters + len(argument)


class MessageMemory:
    """Bytes reserved by the sessions receiving messages, against ``limit``.

    ``held`` and ``limit`` are plain attributes so the server's per-read path is a comparison and
    two additions; ``refusals`` counts the reservations that did not fit (for diagnostics).
    """

    __slots__ = ("limit", "held", "refusals")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.refusals = 0

    @property
    def free(self) -> int:
        return max(0, self.limit - self.held)

    def reserve(self, n: int) -> bool:
        """Take ``n`` bytes if they fit; False (and nothing taken) when they do not."""
        held = self.held + n
        if held > self.limit:
            self.refusals += 1
            return False
        self.held = held
        return True

    @classmethod
    def for_worker(cls, total: int, worker: WorkerInfo) -> "MessageMemory":
        """This process's budget: its worker's share of the gateway's ``total``."""
        return cls(worker.share(total) or 0)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes reserved earlier."""
        self.held -= n
        if self.held < 0:           # a release without its reservation: a bug, but never a negative budget
            self.held = 0

