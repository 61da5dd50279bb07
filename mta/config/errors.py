"""The one error every configuration problem becomes: ``<key path>: <what is wrong>``.

A leaf module: the loader, the value parsers, the schedules and every later check (TLS files, users
files, workers) raise it without importing anything else of the configuration.
"""
from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem; ``str()`` is ``<key path>: <what is wrong>``."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}" if path else problem)
        self.path = path
        self.problem = problem


class ConfigFileError(ConfigError):
    """The file itself could not be read or parsed; ``str()`` already names the file (and line)."""


def format_config_error(path: str, error: ConfigError) -> str:
    """``FILE: <key path>: <problem>``; file-level errors already start with the file name."""
    return str(error) if isinstance(error, ConfigFileError) else f"{path}: {error}"
