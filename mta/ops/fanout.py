"""``smtpgw queue`` on a gateway with several workers: worker 0 answers for all of them.

Each worker i > 0 serves the ordinary control protocol (:mod:`mta.ops.control`) on ``<socket>.<i>`` for
its own share of the queue. Worker 0 serves the control socket the tool knows, and
:class:`FanOutControl` sends each request where the entries are: ids to their owner (the id says
which worker that is, :func:`mta.workers.identity.owner_of`), a list, a domain or ``all`` to every worker, and
merges the answers. So the tool needs no change, and every change to an entry is still made by the
one process that holds it in memory. A worker that does not answer (restarting) makes the request
fail with a clear error rather than give a partial answer.
"""
from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from mta.delivery.shaping import merge_snapshots
from mta.delivery.tls_report import merge_periods
from mta.ops.control import MAX_REQUEST, QueueControl
from mta.workers.identity import owner_of

ASK_TIMEOUT = 30.0


def worker_socket(path: str, index: int) -> str:
    return path if index == 0 else f"{path}.{index}"


class _Ask(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 256 * 1024 * 1024

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.answer: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.sendLine(json.dumps(self.request, separators=(",", ":")).encode("utf-8"))

    def lineReceived(self, line: bytes) -> None:
        if not self.answer.called:
            try:
                self.answer.callback(json.loads(line))
            except ValueError as e:
                self.answer.errback(e)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.answer.called:
            self.answer.errback(reason)


async def ask_worker(reactor: Any, path: str, index: int, request: dict[str, Any],
                     timeout: float = ASK_TIMEOUT) -> dict[str, Any]:
    """Worker ``index``'s answer to ``request`` on its control socket (``path`` is worker 0's); a
    worker that does not answer (within ``timeout``) gives ``ok: false`` with a clear error, never an
    exception."""
    from twisted.internet.endpoints import UNIXClientEndpoint

    endpoint = UNIXClientEndpoint(reactor, worker_socket(path, index), timeout=5)
    try:
        proto = await endpoint.connect(Factory.forProtocol(lambda: _Ask(request)))
        timer = reactor.callLater(timeout, proto.transport.abortConnection)
        try:
            answer = await proto.answer
        finally:
            if timer.active():
                timer.cancel()
    except Exception as e:
        return {"ok": False, "error": f"worker {index} is not answering ({e.__class__.__name__}); "
                                      "it may be restarting: try again"}
    return answer if isinstance(answer, dict) else {"ok": False, "error": f"worker {index}: bad answer"}


class FanOutControl(QueueControl):
    """Worker 0's control: its own queue plus the other workers', as one."""

    def __init__(self, gateway: Any) -> None:
        super().__init__(gateway)
        self.count = gateway.worker.count
        self.path = gateway.config.gateway.control_socket_path

    async def _ask(self, index: int, request: dict[str, Any]) -> dict[str, Any]:
        if index == 0:
            return await super().handle(request)
        return await ask_worker(self.gateway.reactor, self.path, index, request)

    async def _gather(self, asks: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
        indexes = sorted(asks)
        answers = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._ask(i, asks[i])) for i in indexes])
        return list(answers)

    def handle(self, request: Any) -> defer.Deferred:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return super().handle(request)
        return defer.Deferred.fromCoroutine(self._fan_out(request))

    async def _fan_out(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "ping":
            answer = await super().handle(request)
            if answer.get("ok"):
                answer["workers"] = self.count
            return answer
        if op == "take_in":             # another node's entry for the worker holding an ATRN connection
            worker = request.get("worker")
            return await self._ask(worker if isinstance(worker, int) and 0 <= worker < self.count else 0, request)
        inner = request.get("request")
        if op == "hand_over" and isinstance(inner, dict) and inner.get("to_node"):
            # ATRN at another node: every worker hands over what it holds
            answers = await self._gather({i: request for i in range(self.count)})
            return {"ok": True, "ids": [i for a in answers if a.get("ok") for i in a.get("ids", [])]}
        if op in ("show", "cat"):
            entry_id = request.get("id")
            owner = owner_of(entry_id, self.count) if isinstance(entry_id, str) else 0
            return await self._ask(owner, request)
        if op == "tls_rpt_show":
            answers = await self._gather({i: request for i in range(self.count)})
            failed = next((a for a in answers if not a.get("ok")), None)
            if failed is not None:
                return failed
            return {"ok": True, "period": merge_periods(a["period"] for a in answers), "now": answers[0].get("now")}
        if op == "tls_rpt_send":        # every worker closes its period, then worker 0 sends them all
            answers = await self._gather({i: {"op": "tls_rpt_close"} for i in range(self.count)})
            failed = next((a for a in answers if not a.get("ok")), None)
            if failed is not None:
                return failed
            return await super().handle({"op": "tls_rpt_send", "closed_others": True})
        ids = request.get("ids")
        if isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids) and not request.get("all") \
                and not request.get("domain"):
            by_owner: dict[int, list[str]] = {}
            for entry_id in ids:
                by_owner.setdefault(owner_of(entry_id, self.count), []).append(entry_id)
            asks = {i: {**request, "ids": part} for i, part in by_owner.items()}
        elif op in ("list", "retry", "hold", "release", "requeue", "delete"):
            asks = {i: request for i in range(self.count)}
        else:
            return await super().handle(request)
        answers = await self._gather(asks)
        failed = next((a for a in answers if not a.get("ok")), None)
        if failed is not None:
            return failed
        if op == "list":
            entries = [e for a in answers for e in a.get("entries", [])]
            entries.sort(key=lambda e: (e.get("received_at", 0), e.get("id", "")))
            return {"ok": True, "entries": entries,
                    "shaping": merge_snapshots([a.get("shaping") or [] for a in answers])}
        return {"ok": True, "results": [r for a in answers for r in a.get("results", [])]}


__all__ = ["FanOutControl", "ask_worker", "worker_socket", "MAX_REQUEST"]
