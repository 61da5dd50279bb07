"""One queue view over the cluster: each node keeps a Redis index of its own queue current, and
``smtpgw queue list --cluster`` reads every node's.

The spool stays the queue of record; the index is a copy for looking at, written after the fact:
the queue manager only notes which entries changed (a set, in the reactor thread) and the index
writes them in one batch :data:`FLUSH_DELAY` later, so a message queued and delivered within the
same moment costs one ``HDEL`` and nothing is ever written before a ``250``.

Keys: ``smtpgw:queue:<node>:<worker>``, a hash of queue id -> the row as JSON (:func:`row`), one per
worker process (each worker holds its own share of the spool), with a TTL of :data:`INDEX_TTL`
renewed every :data:`REFRESH_SECONDS`. The rows of a node that stopped stay until it comes back (the
view marks them stale: the node's heartbeat is gone) or until the TTL; a node that starts, or sees
Redis again after an outage, writes its whole index afresh (into a side key, then ``RENAME``), so
what a dead node left behind is replaced, never merged.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from mta.cluster.node import PREFIX, Cluster
from mta.cluster.redis import Unavailable
from mta.model.queue_entry import QueueEntry
from mta.queue.manager import is_held

log = Logger(namespace="smtpgw.cluster")

FLUSH_DELAY = 0.25          # seconds from the first change to the batch that writes it
INDEX_TTL = 86400           # a node gone for a day leaves nothing behind
REFRESH_SECONDS = 30.0      # TTL renewed, and a lost index (Redis restarted empty) written again
SYNC_BATCH = 500            # rows per HSET (and per reactor turn) when the whole index is written


def index_key(node: str, worker: int) -> str:
    return f"{PREFIX}queue:{node}:{worker}"


INDEX_PATTERN = f"{PREFIX}queue:*"
SYNC_SUFFIX = ":sync"


def parse_index_key(key: str) -> tuple[str, int] | None:
    """``(node, worker)`` of an index key; None for anything else (a side key being written)."""
    node, _, worker = key[len(PREFIX) + len("queue:"):].rpartition(":")
    return (node, int(worker)) if node and worker.isdigit() else None


def state_of(entry: QueueEntry, active: bool) -> str:
    """One word for the view: in delivery, held by the administrator, waiting (a schedule, ETRN),
    deferred (a temporary failure so far) or queued (not attempted yet)."""
    if active:
        return "active"
    if is_held(entry):
        return "held"
    pending = entry.pending()
    if any(r.held_reason for r in pending):
        return "waiting"
    if any(r.attempts or r.last_error for r in pending):
        return "deferred"
    return "queued"


def row(node: str, entry: QueueEntry, active: bool) -> dict[str, Any]:
    """What the cluster view shows of one message (a subset of ``smtpgw queue list``'s row)."""
    pending = entry.pending()
    held = is_held(entry)
    return {
        "node": node,
        "id": entry.id,
        "sender": entry.sender,
        "recipients_pending": [r.address for r in pending],
        "recipients_total": len(entry.rcpts),
        "state": state_of(entry, active),
        "next_attempt": None if held or not pending else min(r.next_attempt for r in pending),
        "received_at": entry.received_at,
        "size": entry.size,
        "destinations": sorted({r.address.rpartition("@")[2].lower() for r in pending}),
        "last_hop": next((r.last_hop for r in pending if r.last_hop), None),
        "last_error": next((r.last_error for r in pending + entry.rcpts if r.last_error), None),
        "why_held": "held by the administrator" if held else next(
            (r.held_reason for r in pending if r.held_reason), None),
    }


class QueueIndex:
    """This worker's share of the node's index. ``queue`` is the worker's QueueManager."""

    def __init__(self, cluster: Cluster, queue: Any, worker: int = 0, workers: int = 1) -> None:
        self.cluster = cluster
        self.queue = queue
        self.worker, self.workers = worker, workers
        self.key = index_key(cluster.name, worker)
        self.reactor = cluster.reactor
        self.dirty: set[str] = set()
        self.synced = False             # the index in Redis is whole (else: write it all again)
        self._busy = False              # a flush or a sync is running
        self._timer: Any = None
        self._refresh = task.LoopingCall(self._tick)
        self._refresh.clock = self.reactor
        queue.watchers.append(self.touched)
        cluster.on_resync(self.resync)
        if worker == 0 and workers > 1:     # the heartbeat's queue size: every worker's share, not 0's
            cluster.queue_size = lambda: defer.Deferred.fromCoroutine(self.node_size())

    def start(self) -> None:
        """After the queue was loaded: write the whole index, then keep it current."""
        self._refresh.start(REFRESH_SECONDS, now=True)

    def stop(self) -> None:
        if self._refresh.running:
            self._refresh.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def touched(self, entry_id: str) -> None:
        self.dirty.add(entry_id)
        self._soon()

    def resync(self) -> None:
        """Redis is back (maybe empty): write the whole index again."""
        self.synced = False
        self._soon()

    def _soon(self) -> None:
        if self._timer is None or not self._timer.active():
            self._timer = self.reactor.callLater(FLUSH_DELAY, self._run)

    def _tick(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._refresh_ttl())

    async def _refresh_ttl(self) -> None:
        if self.synced and not self._busy:
            try:
                kept = await self.cluster.call("EXPIRE", self.key, INDEX_TTL)
            except Unavailable:
                self.synced = False
                return
            if not kept and self.queue.ids():       # Redis lost it (restarted empty)
                self.synced = False
        if not self.synced:
            self._soon()

    def _run(self) -> None:
        if self._busy:
            self._soon()
            return
        self._busy = True
        d = defer.Deferred.fromCoroutine(self._sync() if not self.synced else self._flush())
        d.addErrback(lambda f: None if f.check(Unavailable) else log.failure("cluster queue index", f))

        def done(_: Any) -> None:
            self._busy = False
            if self.synced and self.dirty:  # changed meanwhile (not synced: Redis is down, and
                self._soon()                # its return or the refresh tick writes it all)
        d.addBoth(done)

    def _row(self, entry_id: str) -> str | None:
        entry = self.queue.get(entry_id)
        if entry is None or entry.is_done():
            return None
        return json.dumps(row(self.cluster.name, entry, self.queue.is_active(entry_id)), separators=(",", ":"))

    async def _flush(self) -> None:
        ids, self.dirty = self.dirty, set()
        put: list[str] = []
        gone: list[str] = []
        for entry_id in ids:
            text = self._row(entry_id)
            if text is None:
                gone.append(entry_id)
            else:
                put += [entry_id, text]
        try:
            if put:
                await self.cluster.call("HSET", self.key, *put)
            if gone:
                await self.cluster.call("HDEL", self.key, *gone)
            if put:
                await self.cluster.call("EXPIRE", self.key, INDEX_TTL)
        except Unavailable:
            self.dirty |= ids
            self.synced = False
            raise

    async def _sync(self) -> None:
        """The whole index, written into a side key and renamed over the old one; changes made
        meanwhile stay in ``dirty`` and are written after."""
        side = self.key + SYNC_SUFFIX
        self.dirty.clear()
        ids = self.queue.ids()
        try:
            await self.cluster.call("DEL", side)
            for start in range(0, len(ids), SYNC_BATCH):
                put: list[str] = []
                for entry_id in ids[start:start + SYNC_BATCH]:
                    text = self._row(entry_id)
                    if text is not None:
                        put += [entry_id, text]
                if put:
                    await self.cluster.call("HSET", side, *put)
            if await self.cluster.call("EXISTS", side):
                await self.cluster.call("RENAME", side, self.key)
                await self.cluster.call("EXPIRE", self.key, INDEX_TTL)
            else:
                await self.cluster.call("DEL", self.key)
            if self.worker == 0:
                await self._drop_other_workers()
        except Unavailable:
            self.dirty |= set(ids)
            raise
        self.synced = True

    async def node_size(self) -> int:
        """Messages the node holds over all its workers, as their indexes have them (this worker's
        own share counted live)."""
        total = len(self.queue.ids())
        for worker in range(self.workers):
            if worker != self.worker:
                total += int(await self.cluster.call("HLEN", index_key(self.cluster.name, worker)) or 0)
        return total

    async def _drop_other_workers(self) -> None:
        """The shares of workers this node no longer runs (``gateway.workers`` lowered)."""
        cursor = "0"
        while True:
            cursor, keys = await self.cluster.call("SCAN", cursor, "MATCH", index_key(self.cluster.name, "*"),
                                                   "COUNT", 200)
            stale = [k for k in keys if (p := parse_index_key(str(k))) and p[0] == self.cluster.name
                     and p[1] >= self.workers]
            if stale:
                await self.cluster.call("DEL", *stale)
            if str(cursor) == "0":
                break


async def cluster_queue(cluster: Cluster, rows_of: Callable[[dict[str, Any]], bool] = lambda r: True
                        ) -> dict[str, Any]:
    """Every node's indexed messages, each row with its node's state (``gone``: the node's
    heartbeat stopped, so the row is stale: what it held when it was last seen)."""
    nodes = {n["node"]: n for n in await cluster.status()}
    keys: list[str] = []
    cursor = "0"
    while True:
        cursor, found = await cluster.call("SCAN", cursor, "MATCH", INDEX_PATTERN, "COUNT", 500)
        keys += [str(k) for k in found if parse_index_key(str(k)) is not None and not str(k).endswith(SYNC_SUFFIX)]
        if str(cursor) == "0":
            break
    entries: list[dict[str, Any]] = []
    for key in sorted(set(keys)):
        node, _ = parse_index_key(key)
        flat = await cluster.call("HGETALL", key) or []
        values = flat[1::2] if isinstance(flat, list) else list(flat.values())
        state = nodes.get(node, {}).get("state", "gone")
        for text in values:
            try:
                doc = json.loads(text)
            except (TypeError, ValueError):
                continue
            if isinstance(doc, dict) and rows_of(doc):
                doc["node_state"] = state
                doc["stale"] = state == "gone"
                entries.append(doc)
    entries.sort(key=lambda e: (e.get("received_at") or 0, e.get("node", ""), e.get("id", "")))
    return {"nodes": sorted(nodes.values(), key=lambda n: n["node"]), "entries": entries}


__all__ = ["QueueIndex", "cluster_queue", "index_key", "row", "state_of", "INDEX_TTL"]
