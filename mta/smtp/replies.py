"""The replies the ESMTP server gives on its own, by name, so code and tests say what they mean."""
from __future__ import annotations

from mta.smtp.lines import Problem
from mta.smtp.reply import Reply

OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye", disconnect=True)
VRFY_REPLY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections", disconnect=True)
INTERNAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")     # message memory full

UNKNOWN_COMMAND = Reply(500, "5.5.1", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_NEWLINE_COMMAND = Reply(500, "5.5.2", "Command contains bare CR or LF")
NUL_COMMAND = Reply(500, "5.5.2", "Command contains NUL character")
BAD_CHARACTERS = Reply(500, "5.5.2", "Command is not valid UTF-8")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
TLS_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
TLS_UNAVAILABLE = Reply(502, "5.5.1", "Error: STARTTLS not available")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
RELAY_DENIED = Reply(550, "5.7.1", "Relaying denied")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops (mail loop?)")
BARE_NEWLINE_DATA = Reply(550, "5.5.2", "Message contains bare CR or LF")
NUL_DATA = Reply(550, "5.6.0", "Message contains NUL character")
UNSUPPORTED_PARAM = Reply(555, "5.5.4", "Unsupported MAIL FROM/RCPT TO parameter")
PARAMS_AFTER_HELO = Reply(555, "5.5.4", "ESMTP parameters need EHLO")
BAD_SIZE = Reply(501, "5.5.4", "Bad SIZE parameter")
BAD_BODY = Reply(501, "5.5.4", "Bad BODY parameter")
BAD_HELO = Reply(501, "5.5.2", "Syntax: EHLO/HELO needs a domain name or an address literal "
                 "(mail.example.com, [192.0.2.1], [IPv6:2001:db8::1])")
# Postfix 3.9's smtpd_forbid_unauth_pipelining: input after DATA before its reply (RFC 2920 3.1)
IMPROPER_PIPELINING = Reply(554, "5.5.0", "Error: improper command pipelining after DATA", disconnect=True)


def help_reply(verbs: list[str]) -> Reply:
    """HELP's answer: the verbs this session is offered now."""
    return Reply(214, "2.0.0", f"Commands: {' '.join(verbs)}\nSee RFC 5321")


def syntax(usage: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {usage}")


COMMAND_PROBLEMS = {
    Problem.TOO_LONG: LINE_TOO_LONG,
    Problem.BARE_NEWLINE: BARE_NEWLINE_COMMAND,
    Problem.NUL: NUL_COMMAND,
}

DATA_PROBLEMS = {
    Problem.TOO_LONG: LINE_TOO_LONG,
    Problem.BARE_NEWLINE: BARE_NEWLINE_DATA,
    Problem.NUL: NUL_DATA,
    Problem.TOO_BIG: MESSAGE_TOO_BIG,
    Problem.NO_MEMORY: INSUFFICIENT_STORAGE,
}
