"""The configuration (etc/gateway.yaml): typed objects, the loader that validates a file into them,
and the one error every problem becomes.

``from mta.config import Config, ConfigError, load_config`` is the public way in; the submodules are
``errors`` (a leaf), ``values`` (sizes, durations, domains), ``schedules`` (connector schedules),
``workers`` (``gateway.workers``), ``model`` (the dataclasses) and ``loader`` (YAML to model).
"""
from __future__ import annotations

from mta.config.errors import ConfigError, ConfigFileError, format_config_error
from mta.config.model import *  # noqa: F401,F403  (the dataclasses are the configuration's public face)
from mta.config.model import Config
from mta.config.loader import build as parse_config, default_path, load


def load_config(path: str) -> Config:
    """Read and validate a YAML file (no file checks). Raises :class:`ConfigError` naming the key."""
    return load(path)


__all__ = ["ConfigError", "ConfigFileError", "format_config_error", "Config", "default_path", "load_config",
           "parse_config"]
