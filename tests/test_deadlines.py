"""mta/io/deadlines.py: many sessions' deadlines on one timer, each told at its tick, never early."""
from __future__ import annotations

from twisted.internet import task

from mta.io.deadlines import Deadlines


class Waiter:
    def __init__(self, clock: task.Clock, wheel: Deadlines, again: float | None = None) -> None:
        self.clock, self.wheel, self.again = clock, wheel, again
        self.told: list[float] = []
        self.key: int | None = None

    def deadline_passed(self) -> None:
        self.told.append(self.clock.seconds())
        if self.again is not None:
            self.key = self.wheel.add(self.clock.seconds() + self.again, self)


def test_each_told_at_its_tick_and_one_timer_for_all():
    clock = task.Clock()
    wheel = Deadlines(clock)
    waiters = [Waiter(clock, wheel) for _ in range(1000)]
    for i, w in enumerate(waiters):
        w.key = wheel.add(300 + i % 3, w)
    assert len(clock.getDelayedCalls()) == 1 and len(wheel) == 1000
    clock.advance(299.9)
    assert not any(w.told for w in waiters)
    clock.advance(0.1)
    assert sum(1 for w in waiters if w.told) == 334            # those due at 300, and only them
    clock.pump([1, 1])
    assert all(w.told for w in waiters) and clock.getDelayedCalls() == []
    assert {w.told[0] for w in waiters} == {300, 301, 302}


def test_late_by_at_most_one_tick_never_early():
    clock = task.Clock()
    wheel = Deadlines(clock)
    w = Waiter(clock, wheel)
    wheel.add(10.2, w)
    clock.advance(10.2)
    assert w.told == []
    clock.advance(0.8)
    assert w.told == [11]


def test_an_earlier_deadline_rearms_the_timer():
    clock = task.Clock()
    wheel = Deadlines(clock)
    late, early = Waiter(clock, wheel), Waiter(clock, wheel)
    wheel.add(300, late)
    wheel.add(5, early)
    clock.advance(5)
    assert early.told == [5] and late.told == []
    assert [c.getTime() for c in clock.getDelayedCalls()] == [300]


def test_removed_is_not_told_and_the_timer_stops_when_nobody_waits():
    clock = task.Clock()
    wheel = Deadlines(clock)
    a, b = Waiter(clock, wheel), Waiter(clock, wheel)
    ka, kb = wheel.add(5, a), wheel.add(7, b)
    wheel.remove(ka, a)
    clock.advance(5)
    assert a.told == []
    wheel.remove(kb, b)
    assert clock.getDelayedCalls() == [] and len(wheel) == 0
    clock.advance(10)
    assert b.told == []


def test_told_may_wait_again():
    clock = task.Clock()
    wheel = Deadlines(clock)
    w = Waiter(clock, wheel, again=300)
    wheel.add(300, w)
    clock.pump([300, 300, 300])
    assert w.told == [300, 600, 900] and len(clock.getDelayedCalls()) == 1
