"""Remote triggers (ETRN, ATRN, a site's DEQUEUE) shared by every process that holds mail: the workers
of this gateway (``gateway.workers``) and, with ``gateway.cluster``, the other nodes.

Each worker holds its own share of the queue (mta/workers), so a trigger answered by one worker must
reach the others, as one answered by a node must reach the other nodes. The two use the same
mechanism, a message plus a durable marker:

* **The message.** The worker that answered asks each other worker over its control socket
  (``{"op": "trigger"}``, :mod:`mta.ops.fanout`) and adds up what they released, so the client's
  ``250``/``251`` counts the whole gateway; with a cluster, it also publishes the trigger on Redis for
  the other nodes (:mod:`mta.cluster.node`; a node ignores its own, its workers have them from here).
* **The durable marker.** ``<spool>/triggers/<hash of the node>`` holds the last trigger for each
  ETRN node (JSON, as on Redis). A worker that was restarting when the trigger came reads the
  markers newer than the last one it applied (``<spool>/triggers/seen.<i>``) once its queue is loaded,
  and applies them; triggers that arrive before that wait for it, so none is applied to an empty queue.

ATRN needs more than a release: the client's connection is the only way to the mail, so the worker
that got ATRN asks the others to hand their entries over (``{"op": "hand_over"}``; the entries change
owner through the spool, :meth:`mta.queue.manager.QueueManager.hand_over`) and takes them into its queue.
With a cluster it asks the other nodes too, which hand theirs over through Redis
(:mod:`mta.cluster.handover`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Awaitable, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger

from mta.cluster.handover import NodeHandOver
from mta.cluster.node import TRIGGER_TTL, Cluster, Trigger
from mta.cluster.redis import Unavailable
from mta.workers.identity import SINGLE, WorkerInfo, owner_of

log = Logger(namespace="smtpgw.cluster")

MARKERS = "triggers"            # under the spool
ASK_TIMEOUT = 5.0               # a worker that does not answer a trigger within this catches up later
Ask = Callable[[int, dict[str, Any]], Awaitable[dict[str, Any]]]


def marker_name(node: str) -> str:
    return hashlib.sha256(node.lower().encode("utf-8", "replace")).hexdigest()[:32] + ".json"


class TriggerBus:
    """This process's end: ``on_trigger`` handlers release what it holds; :meth:`trigger` tells the
    rest of the gateway and the cluster. ``ask(index, request)`` reaches worker ``index``'s control
    socket (set by mta.app.gateway; None with one worker)."""

    def __init__(self, reactor: Any, spool_dir: str, node_name: str, worker: WorkerInfo = SINGLE,
                 cluster: Cluster | None = None) -> None:
        self.reactor = reactor
        self.directory = os.path.join(os.path.abspath(spool_dir), MARKERS)
        self.node_name = node_name
        self.worker = worker
        self.cluster = cluster
        self.ask: Ask | None = None
        self._handlers: list[Callable[[Trigger], int]] = []
        self._give: Callable[[dict[str, Any]], Awaitable[list[str]]] | None = None
        self._applied: set[tuple[Any, ...]] = set()
        self._waiting: list[Trigger] | None = []         # None once the queue is loaded
        self.handover: NodeHandOver | None = None      # with a cluster: set by mta.app.gateway
        if cluster is not None:
            cluster.on_trigger(self._from_elsewhere)
            cluster.on_resync(self._settle_soon)

    # -- handlers (the etrn_dequeue plugin) -----------------------------------------------------------

    def on_trigger(self, handler: Callable[[Trigger], int]) -> None:
        """``handler(trigger)`` releases what this process holds for a trigger answered elsewhere
        (another worker, another node) and returns how many messages move."""
        self._handlers.append(handler)

    def on_hand_over(self, handler: Callable[[dict[str, Any]], Awaitable[list[str]]]) -> None:
        """``handler(request)`` hands the entries an ATRN at another worker asks for over to it;
        returns their new ids."""
        self._give = handler

    @property
    def others(self) -> list[int]:
        return [i for i in range(self.worker.count) if i != self.worker.index] if self.ask else []

    # -- telling the others ---------------------------------------------------------------------------

    async def trigger(self, node: str, verb: str, connectors: list[str]) -> int:
        """A trigger this process answered: tell the other workers (and wait for them: returns how
        many messages they released) and the other nodes (not waited for)."""
        doc = {"node": node, "verb": verb, "connectors": sorted(connectors), "from": self.node_name,
               "worker": self.worker.index, "at": time.time()}
        self._applied.add(_mark(doc))
        if self.cluster is not None:
            d = defer.Deferred.fromCoroutine(self.cluster.trigger(node, verb, connectors))
            d.addErrback(lambda f: log.warn("cluster: {verb} {node}: telling the other nodes failed: {e}",
                                            verb=verb, node=node, e=f.getErrorMessage()))
        if not self.worker.many:
            return 0
        try:
            await threads.deferToThread(self._write_marker, doc)
        except OSError as e:
            log.warn("{verb} {node}: cannot write the trigger marker in {path}: {e}", verb=verb, node=node,
                     path=self.directory, e=e)
        answers = await self._ask_all({"op": "trigger", "trigger": doc})
        return sum(int(a.get("released", 0)) for a in answers if a.get("ok"))

    async def collect(self, request: dict[str, Any]) -> list[str]:
        """ATRN here: every other worker hands over what ``request`` names (``domains``: a list, or
        None for every domain of the ``connectors``); returns the ids now owned by this worker, for
        it to adopt. The other nodes' entries (a cluster) are in this worker's queue already when
        this returns (taken in as they came, within a bounded wait)."""
        doc = {**request, "to": self.worker.index}
        jobs = [defer.Deferred.fromCoroutine(self._ask_all({"op": "hand_over", "request": doc}))]
        if self.handover is not None:
            jobs.append(defer.Deferred.fromCoroutine(self.handover.collect(request)))
        results = await defer.gatherResults(jobs, consumeErrors=True)
        return [i for a in results[0] if a.get("ok") for i in a.get("ids", []) if isinstance(i, str)]

    @property
    def collects(self) -> bool:
        """Whether an ATRN here has anyone to collect from (other workers, other nodes)."""
        return bool(self.others) or self.handover is not None

    def sender(self, request: dict[str, Any]) -> Any:
        """For a hand-over ``request`` from another node (``to_node``): how to send an entry there;
        None between the workers of this gateway (they share the spool)."""
        to_node = request.get("to_node")
        if not to_node or self.handover is None:
            return None
        return self.handover.sender(str(to_node), int(request.get("to", 0)))

    async def take_in(self, transfer: Any) -> str:
        """Another node hands this worker an entry (its control request ``take_in``)."""
        if self.handover is None:
            raise ValueError("this gateway is not in a cluster")
        if not isinstance(transfer, str) or not transfer:
            raise ValueError('"transfer" must name the transfer')
        return await self.handover.take_in(transfer)

    def _settle_soon(self) -> None:
        """Hand-overs to other nodes cut short by a stop or by Redis: settled once the queue is
        loaded and Redis answers (at start and whenever Redis is back)."""
        if self.handover is None or self._waiting is not None:
            return
        d = defer.Deferred.fromCoroutine(self.handover.settle())
        d.addErrback(lambda f: None if f.check(Unavailable) else log.failure("settling hand-overs", f))

    async def announce(self, entry_ids: list[str]) -> None:
        """Copies found at start-up that a hand-over interrupted by a crash had already written
        (mta/spool/store.py): their owners may not know of them, so they are told to take them in."""
        owners: dict[int, list[str]] = {}
        for entry_id in entry_ids:
            owners.setdefault(owner_of(entry_id, self.worker.count), []).append(entry_id)
        for index, ids in owners.items():
            if index != self.worker.index and self.ask is not None:
                answer = await self.ask(index, {"op": "adopt", "ids": ids})
                if not answer.get("ok"):
                    log.warn("worker {index} did not take {ids} in: {error}; it will at its next start",
                             index=index, ids=" ".join(ids), error=answer.get("error"))

    async def _ask_all(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        others = self.others
        if not others:
            return []
        jobs = [defer.Deferred.fromCoroutine(self.ask(i, request)) for i in others]
        answers = await defer.gatherResults(jobs, consumeErrors=True)
        for index, answer in zip(others, answers):
            if not answer.get("ok"):
                log.warn("worker {index} did not take the request ({op}): {error}; it catches up from the "
                         "spool's marker when it is back", index=index, op=request["op"], error=answer.get("error"))
        return list(answers)

    # -- hearing from the others ----------------------------------------------------------------------

    def receive(self, doc: Any) -> int:
        """A trigger from another worker of this gateway (its control request): how many messages
        this process released for it (0 while its queue is still loading: it waits for that)."""
        if not isinstance(doc, dict) or not isinstance(doc.get("node"), str):
            raise ValueError('"trigger" must be a trigger object')
        return self._from_elsewhere(doc)

    async def give(self, request: Any) -> list[str]:
        """Another worker's ATRN asks for the entries this one holds (its control request)."""
        if not isinstance(request, dict) or not isinstance(request.get("to"), int):
            raise ValueError('"request" must name the worker to hand over "to"')
        if self._give is None or self._waiting is not None:
            return []
        return list(await self._give(request))

    def _from_elsewhere(self, doc: Trigger) -> int:
        if self._waiting is not None:
            self._waiting.append(doc)
            return 0
        return self._apply(doc)

    def _apply(self, doc: Trigger) -> int:
        mark = _mark(doc)
        if mark in self._applied:
            return 0
        self._applied.add(mark)
        moved = 0
        for handler in self._handlers:
            try:
                moved += int(handler(doc) or 0)
            except Exception:
                log.failure("a remote trigger's handler failed")
        if self.worker.many and doc.get("from") == self.node_name:
            d = threads.deferToThread(self._note_seen, float(doc.get("at", 0)))
            d.addErrback(lambda f: None)
        return moved

    # -- the spool's markers ----------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """The queue is loaded: apply the markers left while this worker was away, then whatever
        arrived meanwhile."""
        if not self.worker.many:
            return defer.succeed(self._ready([]))
        d = threads.deferToThread(self._missed)
        d.addErrback(lambda f: (log.warn("cannot read the trigger markers in {path}: {e}", path=self.directory,
                                         e=f.getErrorMessage()), [])[1])
        return d.addCallback(self._ready)

    def _ready(self, missed: list[Trigger]) -> None:
        waiting, self._waiting = self._waiting or [], None
        self._settle_soon()
        for doc in missed:
            log.info("{verb} {node} was answered by worker {worker} while this one was away: releasing",
                     verb=doc.get("verb", "ETRN"), node=doc.get("node"), worker=doc.get("worker"))
        for doc in sorted(missed + waiting, key=lambda d: float(d.get("at", 0))):
            self._apply(doc)
        return None

    def _seen_path(self) -> str:
        return os.path.join(self.directory, f"seen.{self.worker.index}")

    def _write_marker(self, doc: Trigger) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        path = os.path.join(self.directory, marker_name(doc["node"]))
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, sort_keys=True)
        os.replace(tmp, path)

    def _note_seen(self, at: float) -> None:
        path = self._seen_path()
        try:
            with open(path, encoding="ascii") as f:
                if float(f.read().strip() or 0) >= at:
                    return
        except (OSError, ValueError):
            pass
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{at:.6f}\n")
        os.replace(tmp, path)

    def _missed(self) -> list[Trigger]:
        try:
            with open(self._seen_path(), encoding="ascii") as f:
                seen = float(f.read().strip() or 0)
        except (OSError, ValueError):
            seen = 0.0
        oldest = max(seen, time.time() - TRIGGER_TTL)
        found = []
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.directory, name), encoding="utf-8") as f:
                    doc = json.load(f)
            except (OSError, ValueError):
                continue
            if not isinstance(doc, dict) or float(doc.get("at", 0)) <= oldest:
                continue
            if (doc.get("from"), doc.get("worker")) == (self.node_name, self.worker.index):
                continue                # this worker's own: it released its mail then
            found.append(doc)
        return found


def _mark(doc: Trigger) -> tuple[Any, ...]:
    return (str(doc.get("from")), doc.get("worker", 0), str(doc.get("node")), float(doc.get("at", 0)))


__all__ = ["ASK_TIMEOUT", "MARKERS", "TriggerBus", "marker_name"]
