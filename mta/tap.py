"""``twistd smtpgw``: command-line options and the service tree.

``makeService`` only builds objects: listeners bind in ``privilegedStartService`` (so ``twistd -u/-g``
can drop root after taking port 25), and the spool scan and queue start happen in ``startService``.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application import internet, service
from twisted.python import usage

from mta.config import Config, ConfigError, ListenAddress, load_config


class Options(usage.Options):
    synopsis = "[-c FILE]"
    longdesc = "Run the smtpgw SMTP gateway with the configuration in FILE (default etc/gateway.yaml)."
    optParameters = [["config", "c", "etc/gateway.yaml", "the gateway's YAML configuration file"]]

    def postOptions(self) -> None:
        """Validate the whole file before anything listens; the error names the key."""
        try:
            self.parsed: Config = load_config(self["config"])
        except ConfigError as e:
            from mta.cli import format_config_error
            raise usage.UsageError(format_config_error(self["config"], e)) from None


class GatewayService(service.Service):
    """Starts the queue (spool scan, scheduled retries) and stops it cleanly."""

    name = "smtpgw-gateway"

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def startService(self) -> None:
        super().startService()
        self.gateway.start()

    def stopService(self):
        super().stopService()
        return self.gateway.stop()


def endpoint_for(reactor: Any, listen: ListenAddress, tls_context: Any = None) -> Any:
    """A TCP endpoint; for a ``tls: true`` entry (implicit TLS, port 465) a TLS one whose sessions start
    encrypted, with the virtual server's context (``mta.server_tls.ServerTLS``, so SIGHUP reaches it)."""
    from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint

    host = listen.host or "0.0.0.0"
    if listen.tls:
        if tls_context is None:
            raise ValueError(f"{host}:{listen.port}: implicit TLS without a certificate")
        return SSL4ServerEndpoint(reactor, listen.port, tls_context, backlog=1024, interface=host)
    if ipaddress.ip_address(host).version == 6:
        return TCP6ServerEndpoint(reactor, listen.port, backlog=1024, interface=host)
    return TCP4ServerEndpoint(reactor, listen.port, backlog=1024, interface=host)


def makeService(options: Options) -> service.MultiService:
    from twisted.internet import reactor

    from mta.gateway import Gateway
    from mta.config_reload import ConfigReload
    from mta.protocol_log import ProtocolLogService
    from mta.reload import ReloadService
    from mta.server import SMTPServerFactory

    config = options.parsed
    gateway = Gateway(config, reactor)
    top = service.MultiService()
    GatewayService(gateway).setServiceParent(top)
    tls_contexts = []
    for vs in config.virtual_servers:
        factory = SMTPServerFactory(gateway, vs)
        if factory.tls_context is not None:
            tls_contexts.append(factory.tls_context)
        if factory.protocol_log is not None:     # its last lines are written when twistd stops
            ProtocolLogService(factory.protocol_log).setServiceParent(top)
        for listen in vs.listen:
            svc = internet.StreamServerEndpointService(endpoint_for(reactor, listen, factory.tls_context),
                                                       factory)
            svc._raiseSynchronously = True       # a port in use stops startup with a clear error
            svc.setName(f"{vs.name} {listen.host}:{listen.port}")
            svc.setServiceParent(top)
    # SIGHUP re-reads certificates, and the file for what plugins apply live (smtpgw_reload)
    ReloadService(reactor, [*tls_contexts, ConfigReload(gateway)]).setServiceParent(top)
    from mta.control import add_operator_services
    add_operator_services(top, gateway, reactor)        # control socket (smtpgw queue), metrics endpoint
    return top
