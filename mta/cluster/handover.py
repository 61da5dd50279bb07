"""ATRN across the nodes of a cluster: the node the client asked collects what the others hold.

ATRN (RFC 2645) turns the client's connection around, and that connection is the only way to the
mail, so a release message (as for ETRN) is not enough: the mail held on the other nodes must come
to the node that has the connection. When node A gets ATRN it asks every other node that is up
(``{"op": "hand_over", "request": {..., "to_node": A}}``, a command through Redis,
:mod:`mta.cluster.commands`); each hands over its held entries for those domains one by one, copy
then remove, as the workers of one gateway do (:meth:`mta.queue.manager.QueueManager.hand_over`):

1. node B marks the entry durably (``handing_to``) and puts the entry and its bytes under
   ``smtpgw:transfer:<uuid>`` (TTL :data:`TRANSFER_TTL`);
2. it asks A to take it in (``{"op": "take_in", "transfer": <uuid>, "worker": i}``); A takes the
   payload with ``GETDEL`` (so B can tell afterwards whether A ever had it), queues it durably under a
   new id of its worker *i* (the one holding the client's connection), notes
   ``smtpgw:handed:<B>:<B's id>`` = ``<A>:<new id>`` (TTL two days) and answers with the new id;
3. only then does B remove its copy.

If A's answer does not come, B looks: its own ``DEL`` of the payload succeeding means A never took it
(the mark comes off, the entry stays at B); the ``handed`` note means A has it (B removes its copy).
Otherwise, and after a crash of B between 2 and 3, the entry keeps its mark and is settled when B
starts again or finds Redis again (:meth:`NodeHandOver.settle`): removed if the note is there, kept if
not. A takes a payload in once only: a second ``take_in`` of the same entry finds the note.

A waits at most :data:`COLLECT_SECONDS` for the other nodes before it reverses the connection; what
arrives after that stays queued at A, held as before, and goes at the next ATRN.
"""
from __future__ import annotations

import base64
import json
import uuid
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from mta.cluster.commands import NodeNotAnswering, ask_node
from mta.cluster.node import PREFIX, TRIGGER_TTL, Cluster
from mta.cluster.redis import Unavailable
from mta.model.queue_entry import QueueEntry
from mta.queue.manager import NotHandedOver

log = Logger(namespace="smtpgw.cluster")

TRANSFER_TTL = 600          # a payload nobody took is gone after this (the entry stayed at its node)
COLLECT_SECONDS = 10.0      # how long the ATRN node waits for the others before reversing
TAKE_IN_TIMEOUT = 30.0      # how long a giving node waits for the ATRN node to store one entry


def transfer_key(transfer: str) -> str:
    return f"{PREFIX}transfer:{transfer}"


def handed_key(node: str, entry_id: str) -> str:
    return f"{PREFIX}handed:{node}:{entry_id}"


class NodeHandOver:
    """This worker's end of node-to-node hand-overs; ``queue`` is its QueueManager."""

    def __init__(self, cluster: Cluster, queue: Any, worker: int) -> None:
        self.cluster = cluster
        self.queue = queue
        self.worker = worker

    # -- the node that got ATRN ---------------------------------------------------------------------

    async def collect(self, request: dict[str, Any], wait: float = COLLECT_SECONDS) -> int:
        """Ask every other node that is up to hand over what ``request`` names (``domains``,
        ``connectors``) to this worker; wait for their answers at most ``wait`` seconds. Returns
        how many entries arrived meanwhile (they are in this worker's queue already)."""
        try:
            nodes = [n["node"] for n in await self.cluster.status()
                     if n["state"] != "gone" and n["node"] != self.cluster.name]
        except Unavailable:
            log.warn("ATRN: Redis does not answer; only the mail this node holds goes out now")
            return 0
        if not nodes:
            return 0
        ask = {"op": "hand_over", "request": {**request, "to_node": self.cluster.name, "to": self.worker}}
        jobs = [defer.Deferred.fromCoroutine(self._ask(node, ask, wait)) for node in nodes]
        counts = await defer.gatherResults(jobs, consumeErrors=True)
        return sum(counts)

    async def _ask(self, node: str, request: dict[str, Any], wait: float) -> int:
        try:
            answer = await ask_node(self.cluster, node, request, wait)
        except (NodeNotAnswering, Unavailable) as e:
            log.warn("ATRN: node {node} did not hand its mail over in time ({e}); what it sends later "
                     "goes at the next ATRN", node=node, e=e)
            return 0
        if not answer.get("ok"):
            log.warn("ATRN: node {node} did not hand its mail over: {error}", node=node, error=answer.get("error"))
            return 0
        ids = [i for i in answer.get("ids", []) if isinstance(i, str)]
        if ids:
            log.info("ATRN: node {node} handed over {count} message(s)", node=node, count=len(ids))
        return len(ids)

    async def take_in(self, transfer: str) -> str:
        """Another node's entry, waiting under ``transfer``: queued here; returns its new id."""
        text = await self.cluster.call("GETDEL", transfer_key(transfer))
        if not text:
            raise ValueError(f"transfer {transfer} is not in Redis (taken already, or expired)")
        doc = json.loads(text)
        origin_node, origin_id = str(doc["from"]), str(doc["entry"]["id"])
        done = await self.cluster.call("GET", handed_key(origin_node, origin_id))
        if done:                                # taken in already (the giver asked again)
            return str(done).rpartition(":")[2]
        entry = QueueEntry.from_dict(doc["entry"])
        new_id = await self.queue.take_in(entry, base64.b64decode(doc["data"]), f"{origin_node}:{origin_id}")
        await self.cluster.call("SET", handed_key(origin_node, origin_id), f"{self.cluster.name}:{new_id}",
                                "EX", TRIGGER_TTL)
        return new_id

    # -- a node giving its mail -------------------------------------------------------------------------

    def sender(self, to_node: str, to_worker: int) -> Any:
        """``send(entry, data)`` for :meth:`QueueManager.hand_over`: the entry to ``to_node``'s
        worker ``to_worker``; returns its id there, or raises (:class:`NotHandedOver`: surely not)."""
        async def send(entry: QueueEntry, data: Any) -> str:
            raw = data if isinstance(data, (bytes, bytearray)) else b"".join(data)
            transfer = uuid.uuid4().hex
            payload = json.dumps({"from": self.cluster.name, "entry": entry.to_dict(),
                                  "data": base64.b64encode(raw).decode("ascii")}, separators=(",", ":"))
            try:
                await self.cluster.call("SET", transfer_key(transfer), payload, "EX", TRANSFER_TTL)
            except Unavailable as e:
                raise NotHandedOver(f"Redis does not answer: {e}") from None
            try:
                answer = await ask_node(self.cluster, to_node, {"op": "take_in", "transfer": transfer,
                                                                "worker": to_worker}, TAKE_IN_TIMEOUT)
            except NodeNotAnswering as e:
                answer = {"ok": False, "error": str(e)}
            if answer.get("ok") and isinstance(answer.get("id"), str):
                return f"{to_node}:{answer['id']}"
            if await self.cluster.call("DEL", transfer_key(transfer)):
                raise NotHandedOver(f"node {to_node} did not take it: {answer.get('error')}")
            done = await self.cluster.call("GET", handed_key(self.cluster.name, entry.id))
            if done:
                return str(done)
            raise RuntimeError(f"node {to_node} took it without saying whether it stored it; settled later")
        return send

    async def settle(self) -> None:
        """Entries whose hand-over was cut short (a stop, Redis gone): removed here if the other node
        noted that it has them, else kept (their mark taken off)."""
        for entry in self.queue.handing():
            done = await self.cluster.call("GET", handed_key(self.cluster.name, entry.id))
            await self.queue.settle_hand_over(entry.id, handed=bool(done))


__all__ = ["NodeHandOver", "COLLECT_SECONDS", "TRANSFER_TTL", "handed_key", "transfer_key"]
