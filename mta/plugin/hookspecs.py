"""Every hook smtpgw fires, grouped by stage of a message's life (the contract plugins are written to).

Kinds of hook (each fired by one helper of :class:`mta.plugin.manager.Hooks`):

* **verdict** hooks (``firstresult``): implementations are asked in pluggy's order (tryfirst, then the
  most recently registered, ..., trylast) and the first answer other than ``None`` decides; the later
  ones are not asked. An answer may come later: a verdict hook may return a Deferred or be
  ``async`` where it needs I/O, and the core waits for it without blocking other sessions. An
  exception raised by a verdict hook is logged and answered ``451 4.3.0`` -- it never kills a session
  -- unless it carries a ``reply`` attribute holding a Reply, which is then the answer. An answer of the
  wrong type is logged and treated as that same ``451 4.3.0``.
* **notification** hooks: every implementation is called; results are ignored, exceptions logged.
* **collect** hooks: every implementation is asked and all their answers are used.
* **edit** hooks: every implementation is called, in call order, and each Deferred or coroutine is
  waited for before the next is called; results are ignored and an exception is logged and skipped.

The core's own behaviour (local recipients accepted, others refused; MX next hops; connector schedules)
is registered as the ``core`` plugin with ``trylast`` (:mod:`mta.policy.core`), so a site hook adds to
it and can still override it by answering first.

Implementations may take any subset of a hook's arguments, so hooks can grow new arguments later.
A function named ``smtpgw_...`` that is not a hook below (``smtpgw_rcpt`` for ``smtpgw_rcpt_to``) stops
the gateway at startup, and ``smtpgw check-config``, with one line naming it and its file.

Addresses, as every hook sees them
----------------------------------

One rule, made by :func:`mta.smtp.address.parse_path` when the client's command is read and kept
unchanged through the queue:

* ``sender`` and ``recipient`` are ``str`` mailboxes ``local@domain``: the client's path without the
  angle brackets and without a source route. The **local part keeps its case** (it is the final
  host's to interpret), with needless quotes removed (``"joe"@x`` is ``joe@x``). The **domain keeps the
  case the client sent** but never a trailing dot (``Example.ORG.`` arrives as ``Example.ORG``);
  address literals are canonical (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``).
* The null sender ``<>`` is ``""``. A bare ``RCPT TO:<Postmaster>`` arrives as ``gateway.postmaster``.
* Delivery-side hooks get the same strings as the SMTP-side ones: the recipient that
  ``smtpgw_rcpt_to`` accepted is the one ``smtpgw_delivered`` reports. (A local alias's forwarded copy
  is a message of its own, addressed to what the alias names in the configuration.)
* Every ``domain`` argument (``smtpgw_next_hops``, ``smtpgw_delivery_window``) is normalised:
  lower-case, no trailing dot -- what :func:`mta.smtp.address.domain_of` gives for an address. Compare
  a hook's address against a domain with ``domain_of(address)``, never with the address's raw suffix.
* ``name`` in ``smtpgw_helo`` is the HELO/EHLO argument as sent (case kept, surrounding spaces
  removed): a domain name, perhaps with a trailing dot, or an address literal.
* ESMTP ``params`` have upper-case keys (``SIZE``, ``NOTIFY``) and values as sent (``None`` for a
  keyword without ``=``).

Settings and logging for a plugin
---------------------------------

``smtpgw_configure`` and ``smtpgw_reload`` get ``settings``: the plugin's own section of the
configuration -- ``plugins.<name>`` for an installed plugin, the ``settings`` mapping of its
``plugins.local`` entry for a local hook file::

    plugins:
      local:
        - path: /etc/smtpgw/local_policy.py
          settings: {blocked_domains: [spam.example]}

A local hook logs through diag_logging's categories (smtp_protocol, connection_manager,
queuing_engine, routing_engine, categorizer, ndr, authentication, transport_security) with
``services.hooks.event(category, level, message, **fields)``, ``services`` being what
``smtpgw_configure`` received; ``level`` is minimum, medium or maximum. The line is written when
diag_logging's setting for that category is at least that verbose.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Mapping, Sequence, Union

import pluggy

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

    from mta.config import Config, Connector
    from mta.model.envelope import Envelope, Session
    from mta.model.message import MessageData
    from mta.model.nexthop import Hop
    from mta.model.queue_entry import QueueEntry
    from mta.model.window import Go, Hold
    from mta.plugin.manager import Services
    from mta.smtp.reply import Reply

hookspec = pluggy.HookspecMarker("smtpgw")
hookimpl = pluggy.HookimplMarker("smtpgw")

#: What a verdict hook that may answer later returns: the answer, a Deferred of it, or a coroutine.
Later = Union["Deferred[Any]", Awaitable[Any]]


# -- configuration -------------------------------------------------------------------------------

@hookspec
def smtpgw_configure(config: Config, services: Services, settings: Mapping[str, Any]) -> None:
    """The configuration is loaded and the gateway built; nothing listens yet. Notification.

    :param config: the validated configuration (:class:`mta.config.Config`).
    :param services: the running gateway (:class:`mta.app.gateway.Gateway`): ``hooks`` (to log through
        ``hooks.event``), ``reactor``, ``spool``, ``queue``, ``resolver``, ``client``.
    :param settings: this plugin's own section (``plugins.<name>``, or a local hook's ``settings``);
        empty when the file has none.

    Use in plugins: read your settings, keep ``services``, register helper plugins.
    The core answers: nothing; an exception here stops the gateway from starting.
    """


@hookspec
def smtpgw_reload(config: Config, settings: Mapping[str, Any]) -> None:
    """SIGHUP: the configuration file was read again and found valid. Notification.

    :param config: the configuration the gateway now runs on: the file's values for every key applied
        live, the values it started with for the keys that need a restart (the core has logged
        ``SIGHUP: applied: <key>`` or ``SIGHUP: needs a restart: <key>`` for each changed key).
    :param settings: this plugin's section of ``config`` (as in ``smtpgw_configure``); for a local hook
        file, the ``settings`` of its ``plugins.local`` entry as the file now has them.

    Your own section's keys are applied live only where your plugin object says so with
    ``live_settings``, a tuple of key patterns under ``plugins.<name>`` (``("levels", "levels.*")``;
    ``*`` matches anything); the core reports every other change to your section as needing a restart
    and keeps its old value in ``config``.

    Use in plugins: take from it what you apply live (relay_acl: the relay settings and the connectors'
    restrictions, for new connections; diag_logging: its levels).
    The core answers: nothing (it applies its own live keys and re-reads certificates first).
    """


# -- the SMTP session ----------------------------------------------------------------------------

@hookspec(firstresult=True)
def smtpgw_connect(session: Session) -> Reply | Later | None:
    """A client connected; the banner has not been sent. Verdict.

    :param session: the connection (:class:`mta.model.envelope.Session`): client and local address,
        virtual server, TLS state (implicit TLS listeners).
    :returns: a Reply to answer instead of the banner (a 4xx or 5xx closes the connection), or None.

    Use in plugins: connection control by client address (relay_acl's connection restrictions). The
    plugin that decides relaying sets ``session.relay_allowed`` here when the client's address may
    relay (relay_acl does): the core then trusts its DSN requests (``virtual_servers[].dsn.untrusted``).
    The core answers: ``220 <hostname> ESMTP smtpgw ready at <date>``.
    """


@hookspec(firstresult=True)
def smtpgw_helo(session: Session, name: str) -> Reply | Later | None:
    """HELO or EHLO ``name``. Verdict.

    :param session: the connection; ``session.esmtp`` and ``session.helo`` still hold the previous
        greeting, if any.
    :param name: the argument as sent: a domain name or address literal (anything else, or nothing,
        is refused with 501 before the hook is asked).
    :returns: a negative Reply to refuse the greeting, or None.

    Use in plugins: HELO name checks.
    The core answers: 250 with its EHLO keywords (``smtpgw_ehlo_keywords`` adds to them).
    """


@hookspec(firstresult=True)
def smtpgw_auth(session: Session, mechanism: str, username: str) -> Reply | Later | None:
    """AUTH: the credentials of ``username`` were checked good with ``mechanism``. Verdict.

    :param session: the connection; ``session.authenticated_user`` is set only after this hook agrees.
    :param mechanism: the SASL mechanism, upper-case (``PLAIN``, ``LOGIN``).
    :param username: the user name as the users file spells it.
    :returns: a negative Reply to refuse the login anyway (counted as a failed attempt), or None.

    Use in plugins: per-user login restrictions (by client address, by time).
    The core answers: ``235 2.7.0 Authentication successful``.
    """


@hookspec(firstresult=True)
def smtpgw_mail_from(session: Session, envelope: Envelope, sender: str,
                     params: Mapping[str, str | None]) -> Reply | Later | None:
    """MAIL FROM:<sender>, its syntax and parameters already checked. Verdict.

    :param session: the connection.
    :param envelope: the new transaction (its ``id`` is the queue id it will have); ``sender`` is not
        set on it until the command is accepted.
    :param sender: the sender's address ('' for the null sender), in the form described above.
    :param params: the ESMTP parameters (``SIZE``, ``BODY``, ``RET``, ``ENVID``...).
    :returns: a Reply to decide, or None.

    Use in plugins: sender accept/reject lists, SIZE limits per client.
    The core answers: ``553 5.7.1`` when an authenticated user sends as an address ``auth.senders``
    does not give them, else ``250 2.1.0 Sender OK``.
    """


@hookspec(firstresult=True)
def smtpgw_rcpt_to(session: Session, envelope: Envelope, recipient: str,
                   params: Mapping[str, str | None]) -> Reply | Later | None:
    """RCPT TO:<recipient>, its syntax and parameters already checked. Verdict.

    :param session: the connection: client address, HELO name, TLS state, authenticated user.
    :param envelope: the transaction so far (sender and the recipients already accepted).
    :param recipient: the address, in the form described above.
    :param params: the ESMTP parameters (``NOTIFY``, ``ORCPT``).
    :returns: a Reply to decide, or None for no opinion.

    Use in plugins: relay control (relay_acl), recipient validation, per-recipient policy.
    The core answers: ``250 2.1.5 Recipient OK`` for a local domain's known recipient (``550 5.1.1``
    for one its recipient lists, aliases and catch-all do not know; ``452 4.5.3`` for a new Maildir
    past ``max_new_mailboxes_per_message`` where any local part makes one), else ``550 5.7.1 Relaying denied``
    (when nobody answers at all, the session refuses the same way: never an open relay).
    """


@hookspec(firstresult=True)
def smtpgw_data(session: Session, envelope: Envelope, message: MessageData) -> Reply | Later | None:
    """The whole message is in (after DATA or the last BDAT chunk), not yet queued. Verdict.

    :param session: the connection.
    :param envelope: the transaction: sender, accepted recipients, ``size``.
    :param message: the message as received, with the core's ``Received:`` header on top; headers
        added with ``message.prepend_header`` are kept.
    :returns: a negative Reply to refuse the message, or None to let it be queued.

    Use in plugins: content checks, per-connector size and content restrictions (relay_acl).
    The core answers: it queues the message (fsync'd) and replies ``250 2.0.0 Ok: queued as <id>``.
    """


@hookspec
def smtpgw_before_queue(session: Session | None, envelope: Envelope, message: MessageData) -> Later | None:
    """The message is accepted and about to be written to the spool: the last moment to change it. Edit.

    :param session: the connection, or ``None`` for a message queued without one: a report the
        gateway wrote (a DSN, a delay notice; null sender), mail a local program handed to
        ``smtpgw sendmail`` (``envelope.extra["submitted_by"]`` names its user), an alias's copy for
        remote addresses.
    :param envelope: the transaction as it will be queued (sender, recipients).
    :param message: what will be spooled; edits made with ``message.prepend_header`` and
        ``message.remove_headers`` are what is queued, so every delivery attempt sends the same bytes.
    :returns: None, or a Deferred/coroutine the core waits for before calling the next plugin.

    An implementation that raises is logged and the message is queued without its change: a message
    is never refused here (refuse in :func:`smtpgw_data`).

    Use in plugins: changes that must see the final headers: a DKIM signature (dkim_sign, marked
    ``trylast`` so that every other plugin's header edits come first), an ARC seal (sender_auth).
    The core answers: nothing; it queues the message as the plugins left it.
    """


@hookspec
def smtpgw_queued(envelope: Envelope) -> None:
    """The message is on disk (fsync'd) and the client has been told 250. Notification.

    :param envelope: the transaction as queued; ``envelope.id`` is its queue id.

    Use in plugins: counting, archiving hand-offs, metrics.
    The core answers: nothing; the queue starts delivering it.
    """


@hookspec(firstresult=True)
def smtpgw_command(session: Session, verb: str, argument: str) -> Reply | Later | None:
    """A verb the core does not know (ETRN, ATRN, TURN, a site's DEQUEUE...). Verdict.

    :param session: the connection.
    :param verb: the command verb, upper-case.
    :param argument: the rest of the line after one space, as sent.
    :returns: a Reply to answer it, or None.

    A positive Reply with a ``take_over`` attribute (a callable ``take_over(transport, pending)``
    that connects a protocol to the transport and returns it) ends the SMTP session after the reply
    is sent without closing the connection: the callable gets the transport and any input already
    read, and from then on the session passes every byte and the connection's end to that protocol
    (ATRN/TURN role reversal, RFC 2645; see smtpgw_plugins.etrn_dequeue.HandOff).

    Use in plugins: ETRN/ATRN (etrn_dequeue), site commands (etc/local_hooks/dequeue.py).
    The core answers: ``500 5.5.1 Command unrecognized``.
    """


@hookspec
def smtpgw_ehlo_keywords(session: Session) -> Sequence[str] | None:
    """Extra EHLO keywords for this session. Collect: every implementation is asked.

    :param session: the connection (after STARTTLS, a new EHLO asks again).
    :returns: keywords to add (``["ETRN"]``), or None.

    Use in plugins: announce the extension a plugin answers through ``smtpgw_command``.
    The core answers: its own keywords (PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, DSN,
    SMTPUTF8, CHUNKING, STARTTLS, AUTH); plugins' keywords follow, without duplicates.
    """


# -- routing and delivery ------------------------------------------------------------------------

@hookspec(firstresult=True)
def smtpgw_route(envelope: QueueEntry, recipient: str,
                 connectors: Sequence[Connector]) -> Sequence[Connector] | Reply | Later | None:
    """Choose the connectors for one remote domain's recipients. Verdict.

    :param envelope: the queued message (:class:`mta.model.queue_entry.QueueEntry`).
    :param recipient: the first recipient of the domain being delivered (form described above).
    :param connectors: the core's choice, in order: most specific address space, then lowest cost.
    :returns: the connectors to try, in order (an empty list: no route, the recipients fail
        ``550 5.4.4``); a Reply to settle every recipient of the domain with it; or None.

    Use in plugins: routing by sender or content.
    The core answers: ``connectors`` as given.
    """


@hookspec(firstresult=True)
def smtpgw_next_hops(envelope: QueueEntry, domain: str,
                     connector: Connector | None) -> Sequence[Hop] | Reply | Later | None:
    """The hosts to try for ``domain`` through ``connector``. Verdict.

    :param envelope: the queued message.
    :param domain: the recipients' domain, normalised (lower-case, no trailing dot).
    :param connector: the connector being tried.
    :returns: :class:`mta.model.nexthop.Hop` objects in the order to try them; a Reply (a 5xx fails the
        recipients, a 4xx passes them to the next connector); or None. Raising an exception with a
        ``reply`` attribute is the same as returning that Reply.

    Use in plugins: smart hosts (smart_host), ATRN sessions (etrn_dequeue).
    The core answers: DNS MX (implicit MX from A/AAAA; a null MX fails ``556 5.1.10``).
    """


@hookspec(firstresult=True)
def smtpgw_delivery_window(connector: Connector, envelope: QueueEntry,
                           domain: str) -> Hold | Go | Reply | Later | None:
    """May mail for ``domain`` go through ``connector`` now? Verdict.

    :param connector: the connector about to be tried.
    :param envelope: the queued message (``envelope.size`` for oversize schedules).
    :param domain: the recipients' domain, normalised (remote-triggered release is per domain).
    :returns: None (no opinion); :data:`mta.model.window.Go.NOW` (go now, and ask nobody after you:
        the connector's schedule included); a :class:`mta.model.window.Hold` (keep the recipients until
        ``hold.until``, showing ``hold.reason`` in the queue listing: not a failed attempt); or a Reply,
        meaning "this connector may not carry this message": the next connector is tried, and when none
        is left the Reply is the recipients' outcome (a 5xx fails them with a DSN).

    Use in plugins: change freezes, remote-triggered holds (etrn_dequeue), per-connector restrictions
    (relay_acl).
    The core answers: the connector's schedule, or its oversize schedule for large mail
    (:mod:`mta.delivery.windows`): None while open, else a Hold until it opens.
    """


@hookspec
def smtpgw_delivered(envelope: QueueEntry, recipient: str, reply: Reply) -> None:
    """``recipient`` was delivered. Notification.

    :param envelope: the queued message.
    :param recipient: the recipient, as accepted at RCPT.
    :param reply: the next hop's answer (or the Maildir's ``250 2.0.0``).

    Use in plugins: accounting, ETRN bookkeeping, metrics.
    The core answers: nothing; a NOTIFY=SUCCESS report is queued when the sender asked.
    """


@hookspec
def smtpgw_deferred(envelope: QueueEntry, recipient: str, reply: Reply) -> None:
    """``recipient`` failed temporarily and will be retried. Notification.

    :param envelope: the queued message.
    :param recipient: the recipient, as accepted at RCPT.
    :param reply: the temporary failure (a 4xx from a next hop, or the gateway's own).

    Use in plugins: alerting on a link that is down, ETRN bookkeeping.
    The core answers: nothing; the queue schedules the retry (``gateway.queue.retry``).
    """


@hookspec
def smtpgw_bounced(envelope: QueueEntry, recipient: str, reply: Reply) -> None:
    """``recipient`` failed permanently (or its time in the queue expired). Notification.

    :param envelope: the queued message.
    :param recipient: the recipient, as accepted at RCPT.
    :param reply: the permanent failure (for an expiry, a 4xx with status ``4.4.7``).

    Use in plugins: accounting, alerting.
    The core answers: nothing; a failure DSN goes to the sender (never to the null sender).
    """


# -- diagnostics ---------------------------------------------------------------------------------

@hookspec
def smtpgw_event(category: str, level: str, message: str, fields: Mapping[str, Any]) -> None:
    """A diagnostic event. Notification.

    :param category: smtp_protocol, connection_manager, queuing_engine, routing_engine, categorizer,
        ndr, authentication or transport_security.
    :param level: minimum, medium or maximum: how verbose a category's setting must be to show it.
    :param message: one line of text.
    :param fields: what the event is about (``session``, ``id``, ``recipient``...).

    A listener may also define ``wants_event(category, level) -> bool`` on its plugin object: the server
    asks it once per connection and skips the per-command events (smtp_protocol/maximum) nobody writes.
    And ``takes_event(category, level) -> bool``, False when its ``smtpgw_event`` would do nothing with
    such an event: an event no listener takes is not sent at all (decided once per category and level
    after configuration and each reload); a listener without it takes every event.

    Use in plugins: writing logs (diag_logging).
    The core answers: nothing; events are made by ``hooks.event``.
    """
