"""The reply catalogue: every reply smtpgw gives or records on its own, defined once, by name.

Fixed replies are constants (``RELAY_DENIED``); replies that name an address, a hop or a connector are
functions whose code and enhanced status are fixed here and whose argument is only the detail
(``no_route(domain)``, ``link_failed(text)``). The server answers with them, delivery and the queue record
them as recipients' outcomes, and plugins answer with them too (``R.RELAY_DENIED`` in relay_acl), so a
code, a status or a text never drifts between two places. A plugin's own refusal with its own text is
built with ``mta.smtp.reply.reject``/``tempfail``.
"""
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
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors", disconnect=True)     # limits.max_errors
INTERNAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
TOO_MANY_NEW_MAILBOXES = Reply(452, "4.5.3", "Too many new mailboxes for one message, send the rest later")
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


# -- the session's composed replies ----------------------------------------------------------------

IN_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")


def banner(hostname: str, date: str) -> Reply:
    return Reply(220, "", f"{hostname} ESMTP smtpgw ready at {date}")


SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down", disconnect=True)     # to open sessions on stop


def draining(hostname: str) -> Reply:
    """A new connection to a node being drained for maintenance (``smtpgw cluster drain``): the
    client tries another MX now, or this one later."""
    return Reply(421, "4.3.2", f"{hostname} Service not available: draining for maintenance, try another server",
                 disconnect=True)


def too_slow(hostname: str, why: str) -> Reply:
    """A command line not complete within the timeout, or a message below limits.min_data_rate."""
    return Reply(421, "4.4.2", f"{hostname} Error: {why}", disconnect=True)


def too_many_connections_from(host: str) -> Reply:
    """limits.max_connections_per_client (mta/smtp/server/client_limits.py)."""
    return Reply(421, "4.7.0", f"Error: too many connections from {host}", disconnect=True)


def connection_rate_exceeded(host: str) -> Reply:
    """limits.max_connection_rate."""
    return Reply(421, "4.7.0", f"Error: too many connections from {host} this minute", disconnect=True)


def hello(text: str) -> Reply:
    """HELO/EHLO's 250: no enhanced status code on it (RFC 2034)."""
    return Reply(250, "", text)


def queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def user_unknown(recipient: str) -> Reply:
    """RCPT for a local domain's address that no recipient list, alias or catch-all knows."""
    return Reply(550, "5.1.1", f"<{recipient}>: Recipient address rejected: User unknown")


def sender_not_owned(user: str) -> Reply:
    """MAIL FROM an address ``auth.senders`` does not give the authenticated user."""
    return Reply(553, "5.7.1", f"Sender address rejected: not owned by user {user}")


# -- addresses and ESMTP parameters (mta.smtp.address, mta.dsn.params) ------------------------------

BAD_ADDRESS = Reply(501, "5.1.3", "Bad address syntax")
PATH_TOO_LONG = Reply(501, "5.1.3", "Path too long")
NULL_NOT_ALLOWED = Reply(501, "5.1.3", "Null address not allowed here")
LOCAL_PART_TOO_LONG = Reply(553, "5.1.3", "Local part too long")
DOMAIN_TOO_LONG = Reply(553, "5.1.3", "Domain too long")
BAD_LITERAL = Reply(553, "5.1.3", "Unsupported address literal")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address needs SMTPUTF8")
BAD_PARAMS = Reply(555, "5.5.4", "Bad MAIL FROM/RCPT TO parameter syntax")
DUPLICATE_PARAM = Reply(555, "5.5.4", "Duplicate MAIL FROM/RCPT TO parameter")
MAILBOX_NAME_REFUSED = Reply(553, "5.1.3", "Mailbox name not allowed")
ROUTING_REFUSED = Reply(550, "5.7.1", "Relaying denied: sender-specified routing (%, ! or @ in the "
                        "local part) is not accepted")

MAX_ENVID = 100          # characters of the xtext as sent (RFC 3461 4.4)
MAX_ORCPT = 500          # characters of the whole value, "type;xtext" (RFC 3461 4.2)
BAD_RET = Reply(501, "5.5.4", "Bad RET parameter (FULL or HDRS)")
BAD_ENVID = Reply(501, "5.5.4", "Bad ENVID parameter (xtext of printable US-ASCII)")
ENVID_TOO_LONG = Reply(501, "5.5.4", f"ENVID parameter longer than {MAX_ENVID} characters")
BAD_NOTIFY = Reply(501, "5.5.4", "Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)")
BAD_ORCPT = Reply(501, "5.5.4", "Bad ORCPT parameter (addr-type;xtext)")
ORCPT_TOO_LONG = Reply(501, "5.5.4", f"ORCPT parameter longer than {MAX_ORCPT} characters")


def duplicate_dsn_param(keyword: str) -> Reply:
    return Reply(501, "5.5.4", f"Duplicate {keyword} parameter")


# -- AUTH (mta.smtp.server.auth) ---------------------------------------------------------------------

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed authentication attempts, closing connection",
                               disconnect=True)
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_RESPONSE = Reply(501, "5.5.2", "Cannot decode the response")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_TEMPORARY_FAILURE = Reply(454, "4.7.0", "Temporary authentication failure")
AUTH_LOCKED = Reply(454, "4.7.0", "Too many failed authentication attempts from your address, try again later")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


# -- BDAT (mta.smtp.server.bdat) ---------------------------------------------------------------------

BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA not allowed after BDAT in the same transaction")
BDAT_IN_PROGRESS = Reply(503, "5.5.1", "Error: BDAT transfer in progress")


def chunk_received(size: int) -> Reply:
    return Reply(250, "2.0.0", f"{size} octets received")


# -- ETRN, ATRN and TURN (RFC 1985, RFC 2645; the etrn_dequeue plugin) ------------------------------

ETRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ETRN domain | ETRN @domain | ETRN #queue")
ATRN_SYNTAX = Reply(501, "5.5.4", "Syntax: ATRN [domain[,domain...]]")
TURN_SYNTAX = Reply(501, "5.5.4", "Syntax: TURN")
TURN_REFUSED = Reply(502, "5.5.1", "TURN is not supported: use ETRN or ATRN (RFC 2645)")
NOT_ODMR = Reply(502, "5.5.1", "ATRN is only offered on the On-Demand Mail Relay listener")
ODMR_ONLY = Reply(502, "5.5.1", "This is an On-Demand Mail Relay listener: EHLO, STARTTLS, AUTH, ATRN, QUIT")
NO_MAIL_HELD = Reply(453, "4.3.0", "You have no mail")


def dequeue_syntax(verb: str) -> Reply:
    return Reply(501, "5.5.4", f"Syntax: {verb} domain")


def node_rate_limited(node: str, why: str) -> Reply:
    return Reply(458, "4.7.0", f"Unable to queue messages for node {node}: {why}")


def node_not_allowed(node: str, why: str) -> Reply:
    return Reply(459, "5.7.1", f"Node {node} not allowed: {why}")


def node_empty(node: str) -> Reply:
    return Reply(251, "2.0.0", f"OK, no messages waiting for node {node}")


def node_started(node: str) -> Reply:
    return Reply(250, "2.0.0", f"Queuing for node {node} started")


def turn_refused(text: str) -> Reply:
    return Reply(450, "4.7.1", text)


# -- connector restrictions (relay_acl) ---------------------------------------------------------------

def sender_not_allowed(sender: str, connector: str) -> Reply:
    return Reply(550, "5.7.1", f"Sender <{sender}> may not send through connector {connector}")


def type_not_carried(connector: str, kind: str) -> Reply:
    return Reply(550, "5.7.1", f"Connector {connector} does not carry {kind} messages")


def too_big_for_connector(connector: str, limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message too big for connector {connector} (limit {limit} bytes)")


def priority_not_carried(connector: str, priority: str) -> Reply:
    return Reply(550, "5.7.1", f"Connector {connector} does not carry {priority}-priority messages")


# -- delivery outcomes (mta.delivery, mta.queue) -------------------------------------------------------

DELIVERED_LOCALLY = Reply(250, "2.0.0", "delivered to maildir")
DELIVERY_ERROR = Reply(451, "4.3.0", "local error in delivery, try again later")
QUEUE_ERROR = Reply(451, "4.3.0", "Local error in delivery, will retry")
NO_RESULT = Reply(451, "4.3.0", "Delivery agent gave no result for this recipient")
NO_DOMAIN = Reply(550, "5.1.3", "recipient address has no domain")
DELETED = Reply(550, "5.3.0", "message deleted from the queue by the administrator")
EXPIRED_STATUS = "4.4.7"


def local_user_unknown(recipient: str) -> Reply:
    """At delivery: the local part is in no recipient list, alias or catch-all any more."""
    return Reply(550, "5.1.1", f"<{recipient}>: user unknown")


def forwarding_loop(recipient: str) -> Reply:
    return Reply(554, "5.4.6", f"<{recipient}>: mail forwarding loop (Delivered-To: already names it)")


def held(reason: str) -> Reply:
    """A recipient held by a delivery window (not an attempt); ``reason`` is the hold's."""
    return Reply(451, "4.4.5", reason)


def mailbox_unavailable(why: object) -> Reply:
    return Reply(550, "5.1.1", f"mailbox unavailable: {why}")


def local_delivery_failed(why: object) -> Reply:
    return Reply(451, "4.3.0", f"local delivery failed: {why}")


def no_route(domain: str) -> Reply:
    return Reply(550, "5.4.4", f"no route to domain {domain}")


def no_connector_delivered(domain: str) -> Reply:
    return Reply(451, "4.4.1", f"no connector could deliver to {domain}")


def no_next_hop(domain: str, connector: str) -> Reply:
    return Reply(451, "4.4.4", f"no next hop for {domain} via {connector}")


def no_hop_answered(connector: str) -> Reply:
    return Reply(451, "4.4.1", f"no hop of {connector} answered")


def hop_error(hop: str, error: BaseException) -> Reply:
    return Reply(451, "4.4.0", f"error talking to {hop}: {error!r}")


def no_recipient_answer(hop: str) -> Reply:
    return Reply(451, "4.4.0", f"no answer for recipient from {hop}")


def message_lost(reason: str) -> Reply:
    """The spool cannot give a queued message back (moved to ``corrupt/``)."""
    return Reply(554, "5.3.0", f"message lost in the queue: {reason}")


def expired(code: int, last_error: str) -> Reply:
    """The queue's lifetime ran out (``gateway.queue.expire``): the last temporary code, status 4.4.7."""
    return Reply(code if 400 <= code < 500 else 451, EXPIRED_STATUS,
                 f"delivery time expired (last error: {last_error})")


def no_attempt(text: str = "no attempt made", status: str = EXPIRED_STATUS) -> Reply:
    """What a recipient never tried stands on in a report (expiry, delay notice)."""
    return Reply(451, status, text)


# -- DNS (mta.delivery.nexthops) ----------------------------------------------------------------------

def dns_failed(what: str) -> Reply:
    return Reply(451, "4.4.3", f"DNS lookup failed: {what}")


def bad_destination(text: str) -> Reply:
    """The domain cannot receive mail: not found, no records, a bad name or literal."""
    return Reply(550, "5.1.2", text)


def null_mx(name: str) -> Reply:
    return Reply(556, "5.1.10", f"domain does not accept mail (null MX): {name}")


def loops_back(name: str) -> Reply:
    return Reply(550, "5.4.6", f"mail for {name} loops back to myself")


# -- the next hop (mta.smtp.client): why a hop could not take the message ---------------------------
# The text names the hop or connector; the code and status say what kind of failure it is.

CLIENT_SHUTTING_DOWN = Reply(421, "4.3.2", "shutting down")
SENDER_UNUSABLE = Reply(553, "5.1.7", "sender address not usable in SMTP")
RECIPIENT_UNUSABLE = Reply(553, "5.1.3", "recipient address not usable in SMTP")


def link_failed(text: str) -> Reply:
    """The connection to the next hop broke, timed out or closed (451 4.4.2)."""
    return Reply(451, "4.4.2", text)


def connect_failed(text: str) -> Reply:
    return Reply(451, "4.4.1", text)


def protocol_error(text: str) -> Reply:
    """The next hop said something SMTP does not allow there (451 4.5.0)."""
    return Reply(451, "4.5.0", text)


def local_failure(text: str) -> Reply:
    """Our side failed (451 4.3.0): a connection discarded, a trigger command that could not run."""
    return Reply(451, "4.3.0", text)


def tls_unavailable(text: str) -> Reply:
    """TLS is required and the hop does not offer it or refused STARTTLS (451 4.7.10)."""
    return Reply(451, "4.7.10", text)


def tls_check_failed(text: str) -> Reply:
    """The TLS handshake or certificate check failed, or the trust store cannot be read (451 4.7.5)."""
    return Reply(451, "4.7.5", text)


def credentials_withheld(text: str) -> Reply:
    """Credentials are not sent without TLS (451 4.7.11)."""
    return Reply(451, "4.7.11", text)


def auth_mechanism_unavailable(text: str) -> Reply:
    return Reply(451, "4.7.0", text)


def auth_refused(text: str) -> Reply:
    """The hop refused our login or offers no mechanism we use (451 4.7.8): deferred, never bounced."""
    return Reply(451, "4.7.8", text)


def next_hop_unresolved(text: str) -> Reply:
    """A smart host's name could not be resolved now (451 4.4.3)."""
    return Reply(451, "4.4.3", text)


def too_big_for_hop(size: int, limit: int, hop: str) -> Reply:
    return Reply(552, "5.3.4", f"message size {size} exceeds the limit {limit} of {hop}")


def smtputf8_not_offered(hop: str) -> Reply:
    """The permanent failure for a message that needs SMTPUTF8 at a hop that does not offer it."""
    return Reply(550, "5.6.7", f"SMTPUTF8 is required, but was not offered by host {hop}")


def requiretls_unmet(text: str) -> Reply:
    """REQUIRETLS (RFC 8689 5): no validated TLS to the hop, or the hop does not offer REQUIRETLS (550 5.7.10)."""
    return Reply(550, "5.7.10", f"REQUIRETLS: {text}")


def maybe_delivered(broken: Reply) -> Reply:
    """The connection broke after the message was handed over: 4xx, the outcome unknown."""
    return Reply(451, broken.status or "4.4.2", f"{broken.text}; the message may or may not have been delivered")


def trigger_done(text: str) -> Reply:
    """A dequeue trigger (ETRN request or command) that did what was asked."""
    return Reply(250, "2.0.0", text)
