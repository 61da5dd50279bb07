"""diag_logging: categorized diagnostic logging with levels none/minimum/medium/maximum
(the seed's "Diagnostics Logging" tab: MSExchangeTransport categories).

Writes the core's ``smtpgw_event`` diagnostics through Twisted's logger when the event's level is at or
under the level configured for its category in ``plugins.diag_logging.levels``.
"""
from smtpgw_plugins.diag_logging.plugin import DiagLogging

__all__ = ["DiagLogging"]
