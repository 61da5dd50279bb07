"""``gateway.workers`` as the configuration sees it: how many processes, and what they need.

Kept with the configuration (not with the supervisor) because the loader checks it before anything
starts, and the supervisor, the shared counts and the limits all read the resolved number.
"""
from __future__ import annotations

import os
from typing import Any

from mta.config.errors import ConfigError

MAX_WORKERS = 64


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_count(config: Any) -> int:
    """``gateway.workers`` as a number: ``auto`` is one per CPU.

    Every configuration can run several: ETRN/ATRN (``remote_triggered`` connectors, ODMR listeners)
    reach every worker through their control sockets (mta/cluster/triggers.py)."""
    setting = getattr(config.gateway, "workers", 1)
    if setting == "auto":
        return max(1, min(cpu_count(), MAX_WORKERS))
    return int(setting)


def check_workers(config: Any) -> None:
    """Config check: the workers reach each other on ``<control socket>.<i>``, which must fit a UNIX
    socket's path."""
    path = os.path.abspath(config.gateway.control_socket_path)
    if resolve_count(config) > 1 and len(os.fsencode(path)) + 3 > 107:
        raise ConfigError("gateway.control_socket", f"{path} is too long for the workers' control sockets "
                                                    f"(<path>.<i>, at most 107 bytes)")
