"""Connector schedules: always, never, every <duration>, or a weekly grid of 15-minute slots.

Placeholder interface; the parser and window arithmetic are filled in with the config loader.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    kind: str = "always"                        # always | never | every | weekly
    every: float | None = None                  # seconds, for kind == "every"
    slots: frozenset[int] = frozenset()         # weekly: slot index = day*96 + minute_of_day//15 (mon=0)

    @classmethod
    def always(cls) -> "Schedule":
        return cls("always")
