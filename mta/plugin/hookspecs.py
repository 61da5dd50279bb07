"""Every hook smtpgw fires, grouped by stage of a message's life.

Verdict hooks are ``firstresult``: plugins are called in pluggy's order (tryfirst, then the most
recently registered, ..., trylast) and the first one that returns something other than ``None``
decides. A verdict is an :class:`mta.smtp.reply.Reply`. Any hook may return a Deferred or a coroutine where
it needs I/O; the core waits for it without blocking other sessions. An exception raised by a hook is
logged and answered as ``451 4.3.0`` -- it never kills a session.

The core's own behaviour (local domains accepted, others refused; MX next hops; always-open delivery
window) is registered as the ``core`` plugin with ``trylast``, so a site hook adds to it and can still
override it by answering first.

Implementations may take any subset of the arguments, so hooks can grow new arguments later.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("smtpgw")
hookimpl = pluggy.HookimplMarker("smtpgw")


# -- configuration -------------------------------------------------------------------------------

@hookspec
def smtpgw_configure(config, services):
    """Called once the configuration is loaded, before anything listens.

    :param config: the validated :class:`mta.config.Config`.
    :param services: the gateway's :class:`mta.app.gateway.Gateway` (spool, queue, resolver, hooks).

    Use in plugins: read your own section (``config.plugins.settings['<name>']``) and keep references.
    """


@hookspec
def smtpgw_reload(config):
    """The process got SIGHUP and the configuration file was read again and found valid.

    :param config: the configuration the gateway now runs on: the file's values for every key applied
        live, the values it started with for the keys that need a restart (the core has logged
        ``SIGHUP: applied: <key>`` or ``SIGHUP: needs a restart: <key>`` for each changed key).

    Use in plugins: take from it what you apply live (relay_acl: the relay settings and the connectors'
    restrictions, for new connections; diag_logging: its levels). Your own section's keys are applied
    live only where your plugin object says so with ``live_settings``, a tuple of key patterns under
    ``plugins.<name>`` (``("levels", "levels.*")``; ``*`` matches anything); the core reports every other
    change to your section as needing a restart and keeps its old value in ``config``.
    """


# -- the SMTP session ----------------------------------------------------------------------------

@hookspec(firstresult=True)
def smtpgw_connect(session):
    """A client connected. Return a Reply to refuse it (a 5xx or 421 closes the connection).

    :param session: the :class:`mta.model.envelope.Session`.
    """


@hookspec(firstresult=True)
def smtpgw_helo(session, name):
    """HELO/EHLO with ``name``. Return a Reply to refuse the greeting."""


@hookspec(firstresult=True)
def smtpgw_auth(session, mechanism, username):
    """Credentials for ``username`` checked good with ``mechanism``. Return a Reply to refuse anyway."""


@hookspec(firstresult=True)
def smtpgw_mail_from(session, envelope, sender, params):
    """MAIL FROM:<sender> with ESMTP ``params`` (dict, upper-case keys). Return a Reply to decide.

    Use in plugins: delivery restrictions (sender accept/reject lists), SIZE checks per connector.
    """


@hookspec(firstresult=True)
def smtpgw_rcpt_to(session, envelope, recipient, params):
    """RCPT TO:<recipient>. Return a Reply to decide; the core answers for local domains
    (250) and refuses everything else with ``550 5.7.1 Relaying denied`` unless a plugin accepts it first.

    Use in plugins: relay control (relay_acl), per-recipient policy.
    """


@hookspec(firstresult=True)
def smtpgw_data(session, envelope, message):
    """The whole message is in (``message`` is a :class:`mta.model.message.MessageData`), not yet queued.

    Return a Reply to refuse it; return ``None`` to let it be queued. Header edits made through
    ``message.prepend_header`` are kept.
    """


@hookspec
def smtpgw_queued(envelope):
    """The message is on disk (fsync'd) and the client has been told 250. Notification only."""


@hookspec(firstresult=True)
def smtpgw_command(session, verb, argument):
    """A verb the core does not know (ETRN, ATRN, TURN, a site DEQUEUE...).

    Return a Reply to answer it; if nobody does the client gets ``500 5.5.1``.

    A positive Reply with a ``take_over`` attribute (a callable ``take_over(transport, pending)``
    that connects a protocol to the transport and returns it) ends the SMTP session after the reply
    is sent without closing the connection: the callable gets the transport and any input already
    read, and from then on the session passes every byte and the connection's end to that protocol
    (ATRN/TURN role reversal, RFC 2645; see smtpgw_plugins.etrn_dequeue.HandOff).
    """


@hookspec
def smtpgw_ehlo_keywords(session):
    """Extra EHLO keywords for this session: return a list of strings (``["ETRN"]``) or None.

    Every implementation is asked (not firstresult); the keywords follow the core's own.
    """


# -- routing and delivery ------------------------------------------------------------------------

@hookspec(firstresult=True)
def smtpgw_route(envelope, recipient, connectors):
    """Choose the connectors for ``recipient``: return a list of :class:`mta.config.Connector`
    in the order to try them. ``connectors`` is the core's choice (address space, then cost).
    """


@hookspec(firstresult=True)
def smtpgw_next_hops(envelope, domain, connector):
    """The hosts to try for ``domain`` through ``connector``: a list of :class:`mta.delivery.nexthops.Hop`,
    or a Deferred firing with one. The core's default is DNS MX (implicit MX from A/AAAA).

    Use in plugins: smart_host answers for connectors with ``smart_hosts``.
    """


@hookspec(firstresult=True)
def smtpgw_delivery_window(connector, envelope, domain):
    """May mail for ``connector`` go now? Return ``None`` (no opinion: go), a float -- the Unix time
    at which to try again (the message is held, not counted as a failed attempt) -- or a Reply, meaning
    "this connector may not carry this message": the deliverer fails over to the next connector, and
    when none is left the Reply is the recipients' outcome (a 5xx fails them with a DSN).

    ``domain`` is the recipients' domain being delivered (remote-triggered release is per domain).
    """


@hookspec
def smtpgw_delivered(envelope, recipient, reply):
    """``recipient`` was delivered; ``reply`` is the next hop's (or Maildir's) answer."""


@hookspec
def smtpgw_deferred(envelope, recipient, reply):
    """``recipient`` failed temporarily and will be retried."""


@hookspec
def smtpgw_bounced(envelope, recipient, reply):
    """``recipient`` failed permanently (or expired); a DSN goes to the sender."""


# -- diagnostics ---------------------------------------------------------------------------------

@hookspec
def smtpgw_event(category, level, message, fields):
    """A diagnostic event. ``category`` is one of smtp_protocol, connection_manager, queuing_engine,
    routing_engine, categorizer, ndr, authentication, transport_security; ``level`` is minimum, medium
    or maximum (how verbose a setting must be to show it); ``fields`` is a dict (session or message id...).

    A listener may also define ``wants_event(category, level) -> bool`` on its plugin object: the server
    asks it once per connection and skips the per-command events (smtp_protocol/maximum) nobody writes.
    """
