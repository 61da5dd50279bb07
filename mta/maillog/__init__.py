"""The gateway's mail log: one line per recipient outcome, per accepted message and per refusal, in
the field names and order Postfix uses, so the log tools and habits built on Postfix's log read ours.

:mod:`mta.maillog.lines` builds the lines (text and JSON); :mod:`mta.maillog.writer` writes them
through ``twisted.logger`` (namespace ``smtpgw.mail``) to the daemon's log, whatever plugins are enabled.
"""
from mta.maillog.lines import MailLine
from mta.maillog.writer import MailLog, of

__all__ = ["MailLine", "MailLog", "of"]
