"""The operator's services beside the listeners: the control socket (``smtpgw queue``), the
Prometheus endpoint and the web console. Composed here, in the application, because the control socket's fan-out to
several workers and the metrics both sit beside the control protocol, not under it.
"""
from __future__ import annotations

from typing import Any, Callable

from twisted.application import service
from twisted.internet import defer
from twisted.application.internet import StreamServerEndpointService

from mta.cluster.commands import CommandServer
from mta.console.history import reader
from mta.console.web import console_service
from mta.ops.control import ControlService
from mta.ops.fanout import FanOutControl, ask_worker, worker_socket
from mta.ops.metrics import gateway_metrics, metrics_service


def add_operator_services(top: service.MultiService, gateway: Any, reactor: Any) -> None:
    """What ``mta.app.tap`` adds for the operator's tools: the control socket (always), the
    Prometheus endpoint (``gateway.metrics.enabled``), fed by the SMTP listeners already in ``top``,
    and the web console (``gateway.console.enabled``), which acts through the same control object
    the socket serves, so the browser and ``smtpgw queue`` take one code path."""
    worker = gateway.worker        # several workers: worker i > 0 on <socket>.<i>, 0 answers for all
    control = ControlService(gateway, worker_socket(gateway.config.gateway.control_socket_path, worker.index))
    if worker.supervisor:
        control.control_class = FanOutControl
    control.setServiceParent(top)
    if worker.index == 0:
        _drain_and_commands(gateway, control.control_class(gateway)).setServiceParent(top)
    settings = gateway.config.gateway
    ask = _asker(reactor, settings.control_socket_path)
    if settings.metrics.enabled or settings.console.enabled:
        # every worker counts its share; worker 0 serves the page (and the console's dashboard) and
        # asks the others at each scrape
        factories = {id(s.factory): s.factory for s in top
                     if isinstance(s, StreamServerEndpointService) and hasattr(s.factory, "vs")}
        metrics = gateway_metrics(gateway, factories.values())
        if settings.metrics.enabled and worker.index == 0:
            metrics_service(metrics, reactor, worker.count, ask).setServiceParent(top)
        if settings.console.enabled and worker.index == 0:
            read = reader(metrics, worker.count, ask, reactor.seconds)
            console_service(gateway, control.control_class(gateway), reactor, read).setServiceParent(top)


class _NodeCommands(service.Service):
    """Commands from the other nodes (mta.cluster.commands), answered by worker 0's control object."""

    def __init__(self, server: CommandServer) -> None:
        self.server = server

    def startService(self) -> None:
        super().startService()
        self.server.start()

    def stopService(self) -> Any:
        super().stopService()
        return self.server.stop()


def _drain_and_commands(gateway: Any, control: Any) -> service.Service:
    """Worker 0 counts what a draining node still holds through the same control object as
    ``smtpgw queue`` (so over every worker), and, in a cluster, runs the other nodes' commands on it:
    a remote ``queue hold`` or ``cluster drain`` takes the local tool's code path."""
    async def count() -> int:
        listed = await control.handle({"op": "list"})
        if not listed.get("ok"):
            raise RuntimeError(listed.get("error"))
        return sum(1 for e in listed["entries"] if not e.get("corrupt"))

    gateway.drain.count = count
    if gateway.cluster is None:
        return service.Service()
    return _NodeCommands(CommandServer(gateway.cluster, control.handle))


def _asker(reactor: Any, path: str) -> Callable[[int, dict[str, Any]], defer.Deferred]:
    """``ask(index, request)``: worker ``index``'s answer on its control socket, as a Deferred."""
    def ask(index: int, request: dict[str, Any]) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(ask_worker(reactor, path, index, request))
    return ask
