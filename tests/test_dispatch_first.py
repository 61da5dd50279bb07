"""``lean_poll`` hands the descriptors named by ``dispatch_first`` (the spool writer's replies) over
before the others that epoll reported in the same turn, and keeps everyone's order otherwise."""
from __future__ import annotations

import pytest

epollreactor = pytest.importorskip("twisted.internet.epollreactor")

from mta.io.fastpath import dispatch_first, lean_poll  # noqa: E402


class _Poller:
    def __init__(self, events: list[tuple[int, int]]) -> None:
        self.events = events

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        return list(self.events)


def _turn(first: list[int], events: list[tuple[int, int]], forget: list[int] = ()) -> list[int]:
    reactor = epollreactor.EPollReactor()
    own = reactor._poller
    try:
        assert lean_poll(reactor)
        handled: list[int] = []
        reactor._poller = _Poller(events)
        reactor._selectables = {fd: object() for fd, _ in events}
        reactor._doReadOrWrite = lambda selectable, fd, event: handled.append(fd)
        for fd in first:
            dispatch_first(reactor, fd)
        for fd in forget:
            dispatch_first(reactor, fd, False)
        reactor.doIteration(0)
        return handled
    finally:
        own.close()


def test_named_descriptor_goes_first() -> None:
    assert _turn([9], [(5, 1), (7, 1), (9, 1), (11, 1)]) == [9, 5, 7, 11]


def test_order_kept_without_a_named_descriptor_ready() -> None:
    assert _turn([9], [(5, 1), (7, 1), (11, 1)]) == [5, 7, 11]


def test_forgotten_descriptor_takes_its_place_again() -> None:
    assert _turn([9], [(5, 1), (9, 1)], forget=[9]) == [5, 9]


def test_without_lean_poll_nothing_is_recorded() -> None:
    class Plain:
        pass
    plain = Plain()
    dispatch_first(plain, 3)        # a reactor that keeps epoll's order: a no-op, no error
    assert not hasattr(plain, "_smtpgw_first_fds")
