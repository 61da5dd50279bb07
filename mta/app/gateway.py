"""The running gateway's parts, built once from the configuration and handed to hooks.

``Gateway`` is the one public object that ties the core together: the plugin hooks, the spool, the
queue manager, the DNS resolver and the outbound SMTP client pool. Listeners (``mta.smtp.server.session``) and the
twistd service (``mta.app.tap``) hold one; plugins receive it through ``smtpgw_configure``.
"""
from __future__ import annotations

from typing import Any

from twisted.internet import defer

from mta.config import Config
from mta.maillog import MailLog
from mta.plugin.manager import Hooks
from mta.policy import core as defaults
from mta.smtp.client.pool import SMTPClientPool
from mta.delivery.attempt import Deliverer
from mta.queue.manager import QueueManager
from mta.delivery.nexthops import Resolver
from mta.delivery.recipients import LocalRecipients
from mta.queue.pickup import Pickup
from mta.spool.store import Spool
from mta.workers import identity


class Gateway:
    def __init__(self, config: Config, reactor: Any = None, load_plugins: bool = True) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor
            reactor = _reactor
        self.config = config
        self.reactor = reactor
        self.hooks = Hooks()
        self.mail_log = MailLog(reactor)     # the gateway's own log lines (mta.maillog), whatever plugins run
        self.core = defaults.CorePolicy(self)        # the core's own answers (mta/policy/core.py)
        self.hooks.register(self.core, name="core")
        self.core.sender_logins()                   # read the sender lists now: a bad file stops the start
        if load_plugins:
            self.hooks.load(config.plugins.enabled, config.plugins.local)
        self.spool = Spool(config.gateway.spool, reactor=reactor)
        self.resolver = Resolver(config.gateway.dns.nameservers, timeout=config.gateway.dns.timeout,
                                 reactor=reactor, local_names=[config.gateway.hostname])
        self.client = SMTPClientPool(reactor, helo_name=config.gateway.hostname)
        self.deliverer = Deliverer(self)
        self.queue = QueueManager(self)
        self.recipients = LocalRecipients(config, reactor)     # local domains' recipients and aliases
        self.pickup = Pickup(config.gateway.spool, self.queue.inject, reactor)     # smtpgw sendmail
        # mta.smtp.server.message_memory.MessageMemory: the bytes of messages being received; made by the first
        # listener (message_memory.for_gateway), once this process's worker share is known
        self.message_memory = None
        self.metrics = None     # mta.ops.metrics.GatewayMetrics when gateway.metrics.enabled (mta.app.operator)
        self.hooks.pm.hook.smtpgw_configure(config=config, services=self)

    def start(self) -> defer.Deferred:
        """Open the spool and rebuild the schedule from disk (in a thread), then start delivering;
        the worker answering the control socket (0) also picks up what ``smtpgw sendmail`` dropped."""
        d = self.queue.start()
        self.recipients.start()
        if identity.of(self).index == 0:
            d.addCallback(lambda loaded: (self.pickup.start(), loaded)[1])
        return d

    def stop(self) -> defer.Deferred:
        self.pickup.stop()
        self.recipients.stop()
        d = self.queue.stop()
        d.addBoth(lambda r: self.client.close())
        return d
