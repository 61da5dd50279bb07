"""What is checked before anything listens: the configuration file, then the files it names.

The configuration package validates keys and values; looking at the spool and opening a certificate or
a users file belong to the parts that use them (the spool, the server's TLS, AUTH's users), and importing
the plugins and local hook files, and checking their hook names, to the plugin manager; so they are
handed to the loader here, once, for both ``twistd smtpgw`` and ``smtpgw check-config``. What needs
the gateway's own process (binding the listeners, locking the spool) is in :mod:`mta.app.startup`.
"""
from __future__ import annotations

from mta.config import Config, ConfigError
from mta.config.loader import load
from mta.console.web import check_console_files
from mta.plugin.manager import check_plugins
from mta.smtp.server.tls import check_tls_files
from mta.smtp.server.users import check_users_files
from mta.spool.store import spool_problem


def check_spool(config: Config) -> None:
    """The spool is a writable folder, or one that can be created (``twistd smtpgw`` then creates it
    and proves it can write there, as the user it runs as: :mod:`mta.app.startup`)."""
    problem = spool_problem(config.gateway.spool)
    if problem is not None:
        raise ConfigError("gateway.spool", problem)


FILE_CHECKS = (check_tls_files, check_users_files, check_plugins, check_console_files)
GATEWAY_CHECKS = (check_spool, *FILE_CHECKS)       # the spool too: only the gateway's user need write it


def load_checked(path: str, gateway: bool = False) -> Config:
    """Read and validate ``path``, then open every file it names; raises ConfigError naming the key.
    ``gateway``: for running the gateway (``twistd smtpgw``, ``smtpgw check-config``), so the spool
    is checked too; other tools (``smtpgw sendmail``, run by any user) leave it to their own errors."""
    return load(path, GATEWAY_CHECKS if gateway else FILE_CHECKS)
