"""The operator's services beside the listeners: the control socket (``smtpgw queue``) and the
Prometheus endpoint. Composed here, in the application, because the control socket's fan-out to
several workers and the metrics both sit beside the control protocol, not under it.
"""
from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService

from mta.ops.control import ControlService
from mta.ops.fanout import FanOutControl, worker_socket
from mta.ops.metrics import metrics_service
from mta.workers import identity as workers


def add_operator_services(top: service.MultiService, gateway: Any, reactor: Any) -> None:
    """What ``mta.app.tap`` adds for the operator's tools: the control socket (always) and the
    Prometheus endpoint (``gateway.metrics.enabled``), fed by the SMTP listeners already in ``top``."""
    worker = workers.of(gateway)        # several workers: worker i > 0 on <socket>.<i>, 0 answers for all
    control = ControlService(gateway, worker_socket(gateway.config.gateway.control_socket_path, worker.index))
    if worker.supervisor:
        control.control_class = FanOutControl
    control.setServiceParent(top)
    if gateway.config.gateway.metrics.enabled and worker.index == 0:
        factories = {id(s.factory): s.factory for s in top
                     if isinstance(s, StreamServerEndpointService) and hasattr(s.factory, "vs")}
        metrics_service(gateway, factories.values(), reactor).setServiceParent(top)
