"""What is checked before anything listens: the configuration file, then the files it names.

The configuration package validates keys and values; opening a certificate or a users file belongs
to the parts that use them (the server's TLS, AUTH's users), and importing the plugins and local hook
files, and checking their hook names, to the plugin manager; so they are handed to the loader here,
once, for both ``twistd smtpgw`` and ``smtpgw check-config``.
"""
from __future__ import annotations

from mta.config import Config
from mta.config.loader import load
from mta.plugin.manager import check_plugins
from mta.smtp.server.tls import check_tls_files
from mta.smtp.server.users import check_users_files

FILE_CHECKS = (check_tls_files, check_users_files, check_plugins)


def load_checked(path: str) -> Config:
    """Read and validate ``path``, then open every file it names; raises ConfigError naming the key."""
    return load(path, FILE_CHECKS)
