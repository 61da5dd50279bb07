"""This gateway as a node of a cluster (``gateway.cluster``): its registration and heartbeat, remote
triggers shared with the other nodes, and what ``smtpgw cluster status`` shows.

Nothing here is on the path of a message before its ``250``: the spool of each node stays the queue of
record, and Redis holds only what the nodes share. When Redis is down each node goes on alone (it
logs that once, as degraded, and once more when Redis is back, then registers again and catches up
on the triggers it missed).

Keys, all under ``smtpgw:`` (soft state with a TTL):

* ``smtpgw:nodes``: the set of node names ever registered (a node whose heartbeat key expired is
  shown as gone);
* ``smtpgw:node:<name>``: a hash (host, pid, started, heartbeat, queue size, state), TTL
  :data:`HEARTBEAT_TTL`, renewed every :data:`HEARTBEAT_SECONDS`;
* ``smtpgw:trigger:<node>``: the last remote trigger (ETRN/ATRN/DEQUEUE) for ``<node>`` (``example.com``,
  ``@example.com``, ``#queue``) as JSON, TTL :data:`TRIGGER_TTL`: the durable marker a node that was
  away reads when it comes back;
* ``smtpgw:seen:<name>``: the time of the last trigger this node applied (``smtpgw:seen:<name>:<i>`` for
  its worker *i* > 0 with ``gateway.workers``: each worker holds mail of its own);
* channel ``smtpgw:triggers``: each trigger, for the nodes that are up.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from mta.cluster.redis import RedisLink, Subscription, Unavailable
from mta.config import Config
from mta.config.values import parse_redis_url

log = Logger(namespace="smtpgw.cluster")

PREFIX = "smtpgw:"
NODES = PREFIX + "nodes"
TRIGGERS = PREFIX + "triggers"
HEARTBEAT_SECONDS = 5.0
HEARTBEAT_TTL = 15             # seconds without a heartbeat after which a node counts as gone
TRIGGER_TTL = 2 * 86400


def node_key(name: str) -> str:
    return f"{PREFIX}node:{name}"


def trigger_key(node: str) -> str:
    return f"{PREFIX}trigger:{node}"


def seen_key(name: str) -> str:
    return f"{PREFIX}seen:{name}"


Trigger = dict[str, Any]        # {"node": text, "verb": "ETRN", "connectors": [names], "from": node, "at": time}


class Cluster:
    """One node's link to the others. ``on_trigger`` callbacks get each remote trigger once."""

    def __init__(self, config: Config, reactor: Any, queue_size: Callable[[], Any] = lambda: 0,
                 heartbeat: bool = True, worker: int = 0) -> None:
        self.config = config
        self.reactor = reactor
        self.name = config.gateway.node_name
        self.worker = worker            # which process of the node (gateway.workers): each catches up on its own
        self.address = parse_redis_url(config.gateway.cluster.redis, "gateway.cluster.redis")
        self.queue_size = queue_size
        self.leases_held: Callable[[], int] = lambda: 0         # set by the connection leases (mta.cluster.leases)
        self.node_state: Callable[[], str] = lambda: "up"       # "draining"/"drained" (mta.ops.drain)
        self.redis = RedisLink(reactor, self.address)
        self.subscription = Subscription(reactor, self.address, [TRIGGERS], self._message, self._resync)
        self.started = time.time()
        self.degraded = False
        self.degraded_since: float | None = None      # when Redis stopped answering (for status and metrics)
        self.outages = 0                               # how many times it did, since the node started
        self._heartbeat = task.LoopingCall(self._beat) if heartbeat else None
        self._handlers: list[Callable[[Trigger], Any]] = []
        self._applied: set[tuple[str, float]] = set()   # (node, at) applied already (pub/sub and marker both)
        self._resynced: list[Callable[[], Any]] = []

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self.redis.start()
        self.subscription.start()
        if self._heartbeat is not None:
            self._heartbeat.clock = self.reactor
            self._heartbeat.start(HEARTBEAT_SECONDS, now=True)

    def stop(self) -> defer.Deferred:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        return defer.DeferredList([self.subscription.stop(), self.redis.stop()], consumeErrors=True)

    # -- Redis up or down ------------------------------------------------------------------------

    def _down(self, why: Any) -> None:
        if not self.degraded:
            self.degraded = True
            self.degraded_since = time.time()
            self.outages += 1
            log.warn("cluster: Redis at {address} unreachable ({why}); node {name} runs on its own, with "
                     "local limits (degraded)", address=str(self.address), why=why, name=self.name)

    def _up(self) -> None:
        if self.degraded:
            self.degraded = False
            self.degraded_since = None
            log.info("cluster: Redis at {address} is back; node {name} registered again",
                     address=str(self.address), name=self.name)

    async def call(self, command: str, *args: Any) -> Any:
        """A command, noting whether Redis answers; raises Unavailable when it does not."""
        try:
            reply = await self.redis.call(command, *args)
        except Unavailable as e:
            self._down(e)
            raise
        self._up()
        return reply

    # -- heartbeat -------------------------------------------------------------------------------

    def beat(self) -> defer.Deferred:
        """Register now (a change of state, such as a drain, shows at once), not at the next beat."""
        return self._beat()

    def _beat(self) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(self.register())
        d.addErrback(lambda f: None if f.check(Unavailable) else log.failure("cluster heartbeat", f))
        return d

    async def register(self) -> None:
        key = node_key(self.name)
        queued = self.queue_size()          # an int, or (several workers) a Deferred of one
        if isinstance(queued, defer.Deferred):
            queued = await queued
        await self.call("HSET", key, "host", self.config.gateway.hostname, "pid", os.getpid(),
                        "started", f"{self.started:.3f}", "heartbeat", f"{time.time():.3f}",
                        "queue", queued, "state", self.node_state(), "leases", self.leases_held())
        await self.call("EXPIRE", key, HEARTBEAT_TTL)
        await self.call("SADD", NODES, self.name)

    async def status(self) -> list[dict[str, Any]]:
        """Every node registered: its last heartbeat, queue size and state (``gone`` once its key expired)."""
        names = sorted(await self.call("SMEMBERS", NODES) or [])
        rows = []
        for name in names:
            flat = await self.call("HGETALL", node_key(name)) or []
            fields = dict(zip(flat[::2], flat[1::2])) if isinstance(flat, list) else dict(flat)
            if not fields:
                rows.append({"node": name, "state": "gone", "heartbeat": None, "queue": None, "host": None,
                             "pid": None, "leases": None})
                continue
            rows.append({"node": name, "state": str(fields.get("state", "up")),
                         "heartbeat": float(fields.get("heartbeat", 0)), "queue": int(fields.get("queue", 0)),
                         "leases": int(fields.get("leases", 0)),
                         "host": str(fields.get("host", "")), "pid": int(fields.get("pid", 0))})
        return rows

    # -- remote triggers -------------------------------------------------------------------------

    def on_trigger(self, handler: Callable[[Trigger], Any]) -> None:
        """``handler(trigger)`` runs for each trigger answered by another node (a plugin releases its
        held mail there); the node that answered the client applies it itself."""
        self._handlers.append(handler)

    async def trigger(self, node: str, verb: str, connectors: list[str]) -> bool:
        """Tell the other nodes that ``node`` asked for its mail: the durable marker, then the
        message. False when Redis is down (the client got its answer from this node alone)."""
        doc = {"node": node, "verb": verb, "connectors": sorted(connectors), "from": self.name, "at": time.time()}
        text = json.dumps(doc, sort_keys=True)
        try:
            await self.call("SET", trigger_key(node), text, "EX", TRIGGER_TTL)
            await self.call("PUBLISH", TRIGGERS, text)
        except Unavailable:
            return False
        return True

    def _message(self, channel: Any, message: Any) -> None:
        try:
            doc = json.loads(message)
        except (TypeError, ValueError):
            log.warn("cluster: ignoring a message on {channel} that is not JSON", channel=channel)
            return
        self._apply(doc)

    def _apply(self, doc: Trigger) -> None:
        if not isinstance(doc, dict) or doc.get("from") == self.name:
            return          # this node's own: its workers had it from mta.cluster.triggers
        mark = (str(doc.get("node")), float(doc.get("at", 0)))
        if mark in self._applied:
            return
        self._applied.add(mark)
        log.info("cluster: {verb} {node} answered by node {origin}: releasing what node {name} holds for it",
                 verb=doc.get("verb", "ETRN"), node=doc.get("node"), origin=doc.get("from"), name=self.name)
        for handler in self._handlers:
            try:
                handler(doc)
            except Exception:
                log.failure("cluster: a trigger handler failed")
        self.reactor.callLater(0, self._note_seen, mark[1])

    def _note_seen(self, at: float) -> None:
        d = defer.Deferred.fromCoroutine(self._store_seen(at))
        d.addErrback(lambda f: None)

    async def _store_seen(self, at: float) -> None:
        seen = float(await self.call("GET", self._seen_key) or 0)
        if at > seen:
            await self.call("SET", self._seen_key, f"{at:.6f}", "EX", TRIGGER_TTL)

    @property
    def _seen_key(self) -> str:
        return seen_key(self.name) + (f":{self.worker}" if self.worker else "")

    def on_resync(self, handler: Callable[[], Any]) -> None:
        """``handler()`` each time the node (re)connects to Redis, which may have lost everything:
        the queue index (mta.cluster.queue_index) writes itself again."""
        self._resynced.append(handler)

    def _resync(self) -> None:
        """Subscribed (again): register at once and apply the markers left while this node was away."""
        for handler in self._resynced:
            handler()
        d = defer.Deferred.fromCoroutine(self._catch_up())
        d.addErrback(lambda f: None if f.check(Unavailable) else log.failure("cluster resync", f))

    async def _catch_up(self) -> None:
        if self.worker == 0:
            await self.register()
        seen = float(await self.call("GET", self._seen_key) or 0)
        cursor = "0"
        markers = []
        while True:
            cursor, keys = await self.call("SCAN", cursor, "MATCH", trigger_key("*"), "COUNT", 200)
            for key in keys:
                text = await self.call("GET", key)
                if text:
                    try:
                        markers.append(json.loads(text))
                    except ValueError:
                        continue
            if str(cursor) == "0":
                break
        for doc in sorted(markers, key=lambda d: d.get("at", 0)):
            if float(doc.get("at", 0)) > seen:
                self._apply(doc)


__all__ = ["Cluster", "Trigger", "HEARTBEAT_SECONDS", "HEARTBEAT_TTL", "node_key", "trigger_key"]
