"""``gateway.workers`` as the configuration sees it: how many processes, and when only one will do.

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


def needs_single_worker(config: Any) -> str | None:
    """Why this configuration must run in one process, or None."""
    if any(getattr(c.delivery, "remote_triggered", False) for c in config.connectors):
        return "a connector is remote_triggered (ETRN/ATRN keep their state in one process)"
    if any(getattr(vs, "odmr", False) for vs in config.virtual_servers):
        return "a virtual server is an ODMR listener (ATRN keeps its state in one process)"
    return None


def resolve_count(config: Any) -> int:
    """``gateway.workers`` as a number: ``auto`` is one per CPU, or 1 where one process is needed."""
    setting = getattr(config.gateway, "workers", 1)
    if setting == "auto":
        return 1 if needs_single_worker(config) else max(1, min(cpu_count(), MAX_WORKERS))
    return int(setting)


def check_workers(config: Any) -> None:
    """Config check: an explicit ``workers: N > 1`` where one process is needed is an error."""
    setting = getattr(config.gateway, "workers", 1)
    why = needs_single_worker(config)
    if setting != "auto" and int(setting) > 1 and why:
        raise ConfigError("gateway.workers", f"must be 1 (or auto) here: {why}")
    path = os.path.abspath(config.gateway.control_socket_path)
    if resolve_count(config) > 1 and len(os.fsencode(path)) + 3 > 107:
        raise ConfigError("gateway.control_socket", f"{path} is too long for the workers' control sockets "
                                                    f"(<path>.<i>, at most 107 bytes)")
