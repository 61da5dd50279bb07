"""Operator commands from one node to another, through Redis: ``smtpgw queue hold mx2:ID`` typed on
mx1, or ``smtpgw cluster drain mx2``.

Each node listens on its own channel, ``smtpgw:command:<node>``. A command is JSON,
``{"id": ..., "from": node, "request": {control request}}``; the node that receives it runs the
request through the very control object that answers its own control socket (mta/ops/control.py, so
the same checks and the same code path as the local ``smtpgw queue``), and leaves the answer under
``smtpgw:reply:<id>`` (TTL :data:`REPLY_TTL`) for the asking node, which reads it there until its
timeout. ``PUBLISH`` tells the asking node at once when nobody listens on the channel (the node is
down, or not in this cluster).

Only the requests in :data:`REMOTE_OPS` are run; anyone who can write to the cluster's Redis can
send them, so Redis is to be protected like the control socket (a password or ACL, TLS, a private
network).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from mta.cluster.node import PREFIX, Cluster
from mta.cluster.redis import Subscription, Unavailable

log = Logger(namespace="smtpgw.cluster")

REPLY_TTL = 120
POLL_SECONDS = 0.05
DEFAULT_TIMEOUT = 15.0

# what another node may ask of this one: the queue tools and drain, and ATRN's hand-over of held mail
# (mta/cluster/handover.py), nothing that reaches further
REMOTE_OPS = frozenset({"ping", "list", "show", "cat", "retry", "requeue", "hold", "release", "delete",
                        "drain", "undrain", "drain_status", "hand_over", "take_in"})


def command_channel(node: str) -> str:
    return f"{PREFIX}command:{node}"


def reply_key(command_id: str) -> str:
    return f"{PREFIX}reply:{command_id}"


class NodeNotAnswering(Exception):
    """The node named is not listening, or did not answer in time: the text says which and what to do."""


class CommandServer:
    """This node's end: runs each command addressed to it with ``handle(request) -> Deferred[dict]``."""

    def __init__(self, cluster: Cluster, handle: Callable[[dict[str, Any]], defer.Deferred]) -> None:
        self.cluster = cluster
        self.handle = handle
        self.subscription = Subscription(cluster.reactor, cluster.address, [command_channel(cluster.name)],
                                         self._message, lambda: None)

    def start(self) -> None:
        self.subscription.start()

    def stop(self) -> defer.Deferred:
        return self.subscription.stop()

    def _message(self, channel: Any, message: Any) -> None:
        try:
            doc = json.loads(message)
            command_id, request = str(doc["id"]), doc["request"]
        except (TypeError, ValueError, KeyError):
            log.warn("cluster: ignoring a command on {channel} that is not one", channel=channel)
            return
        d = defer.Deferred.fromCoroutine(self._run(command_id, request, str(doc.get("from", "?"))))
        d.addErrback(lambda f: None if f.check(Unavailable) else log.failure("cluster command", f))

    async def _run(self, command_id: str, request: Any, origin: str) -> None:
        op = request.get("op") if isinstance(request, dict) else None
        if op not in REMOTE_OPS:
            answer = {"ok": False, "error": f"node {self.cluster.name} does not take {op!r} from another node"}
        else:
            if op not in ("ping", "list", "show", "cat", "drain_status", "take_in"):
                log.info("cluster: queue {op} asked by node {origin}", op=op, origin=origin)
            answer = await self.handle(request)
        answer = {**answer, "node": self.cluster.name}
        await self.cluster.call("SET", reply_key(command_id), json.dumps(answer, separators=(",", ":")),
                                "EX", REPLY_TTL)


async def ask_node(cluster: Cluster, node: str, request: dict[str, Any],
                   timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """``node``'s answer to the control ``request``; raises :class:`NodeNotAnswering` (and
    :class:`mta.cluster.redis.Unavailable` when Redis itself is down)."""
    command_id = uuid.uuid4().hex
    doc = json.dumps({"id": command_id, "from": cluster.name, "request": request}, separators=(",", ":"))
    listeners = await cluster.call("PUBLISH", command_channel(node), doc)
    if not listeners:
        raise NodeNotAnswering(f"node {node} is not listening on Redis (stopped, or not a node of this "
                               f"cluster); `smtpgw cluster status` lists the nodes")
    key = reply_key(command_id)
    deadline = cluster.reactor.seconds() + timeout
    while cluster.reactor.seconds() < deadline:
        text = await cluster.call("GET", key)
        if text:
            await cluster.call("DEL", key)
            try:
                answer = json.loads(text)
            except ValueError:
                answer = None
            if not isinstance(answer, dict):
                return {"ok": False, "error": f"node {node} gave an answer that is not JSON"}
            return answer
        await task.deferLater(cluster.reactor, POLL_SECONDS, lambda: None)
    raise NodeNotAnswering(f"node {node} did not answer within {timeout:g}s; it may be busy or "
                           f"stopping: try again, or run the command on {node} itself")


__all__ = ["CommandServer", "NodeNotAnswering", "ask_node", "command_channel", "REMOTE_OPS"]
