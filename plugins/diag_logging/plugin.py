"""Filters diagnostic events by category level and writes what passes to the configured target."""
from __future__ import annotations

from typing import Any

from mta.plugin.hookspecs import hookimpl
from smtpgw_plugins.diag_logging.sinks import Sink, TwistdLogSink, make_sink

LEVELS = {"none": 0, "minimum": 1, "medium": 2, "maximum": 3}
DEFAULT_LEVEL = LEVELS["minimum"]        # a category the file does not name (a third-party one)


def levels_of(config: Any) -> dict[str, int]:
    section = config.plugins.settings.get("diag_logging", {}) or {}
    return {str(k): LEVELS.get(str(v).lower(), DEFAULT_LEVEL) for k, v in (section.get("levels") or {}).items()}


def level_names(levels: dict[str, int]) -> dict[str, str]:
    names = {v: k for k, v in LEVELS.items()}
    return {k: names[v] for k, v in levels.items()}


class DiagLogging:
    """``plugins.diag_logging``: ``levels`` per category, ``target``, ``path``, ``format``.

    An event passes when its level is at or under its category's level (``none`` passes nothing).
    Levels follow SIGHUP (``smtpgw_reload``); target, path and format are read at start only (the core
    reports a change to them as needing a restart: only ``live_settings`` are applied live).
    """

    live_settings = ("levels", "levels.*")

    def __init__(self) -> None:
        self.levels: dict[str, int] = {}
        self.sink: Sink = TwistdLogSink("text")
        self.settings: dict[str, Any] = {}
        self.reactor: Any = None

    @hookimpl
    def smtpgw_configure(self, config: Any, services: Any) -> None:
        self.settings = dict(config.plugins.settings.get("diag_logging", {}) or {})
        self.levels = levels_of(config)
        self.reactor = services.reactor
        self.sink = make_sink(self.settings, self.reactor)
        services.mail_log.set_format(self.settings.get("format") or "text")     # the core's mail log too
        trigger = getattr(self.reactor, "addSystemEventTrigger", None)
        if trigger is not None and not isinstance(self.sink, TwistdLogSink):
            trigger("before", "shutdown", self.sink.close)     # the last lines are written, not lost

    @hookimpl
    def smtpgw_reload(self, config: Any) -> None:
        levels = levels_of(config)
        if levels == self.levels:
            return
        changed = {k: v for k, v in level_names(levels).items() if self.levels.get(k) != LEVELS[v]}
        self.levels = levels
        # always written, whatever the levels: the log says from where on it is more (or less) verbose
        self.sink.emit(self._now(), "diag_logging", "minimum", "levels changed", changed)

    def wants_event(self, category: str, level: str) -> bool:
        """Asked by the server once per connection, so per-command events cost nothing when unwritten."""
        return LEVELS.get(level, 3) <= self.levels.get(category, DEFAULT_LEVEL)

    takes_event = wants_event       # ``smtpgw_event`` writes exactly those (the hook runner asks after a reload)

    @hookimpl
    def smtpgw_event(self, category: str, level: str, message: str, fields: dict) -> None:
        if LEVELS.get(level, 3) <= self.levels.get(category, DEFAULT_LEVEL):
            self.sink.emit(self._now(), category, level, message, fields)

    def _now(self) -> float:
        if self.reactor is not None:
            return self.reactor.seconds()
        import time
        return time.time()
