"""diag_logging: categorized diagnostic logging with levels none/minimum/medium/maximum
(the seed's "Diagnostics Logging" tab: MSExchangeTransport categories).

Writes the core's and the plugins' ``smtpgw_event`` diagnostics whose level is at or under the level
configured for their category in ``plugins.diag_logging.levels``, to the daemon's log (default), a
file, syslog or stdout, as text or JSON lines. Levels follow SIGHUP without a restart.
"""
from smtpgw_plugins.diag_logging.plugin import DiagLogging

__all__ = ["DiagLogging"]
