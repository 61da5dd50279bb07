"""Filters diagnostic events by category level and writes what passes to the log."""
from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from mta.hookspecs import hookimpl

LEVELS = {"none": 0, "minimum": 1, "medium": 2, "maximum": 3}
log = Logger(namespace="smtpgw.diag")


class DiagLogging:
    def __init__(self) -> None:
        self.levels: dict[str, int] = {}

    @hookimpl
    def smtpgw_configure(self, config: Any, services: Any) -> None:
        section = config.plugins.settings.get("diag_logging", {}) or {}
        self.levels = {k: LEVELS.get(str(v), 1) for k, v in (section.get("levels") or {}).items()}

    @hookimpl
    def smtpgw_event(self, category: str, level: str, message: str, fields: dict) -> None:
        if LEVELS.get(level, 3) <= self.levels.get(category, 1):
            detail = " ".join(f"{k}={v}" for k, v in fields.items())
            log.info("[{category}/{lvl}] {message} {detail}", category=category, lvl=level,
                     message=message, detail=detail)
