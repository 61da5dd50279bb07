"""The control socket's line protocol on its own: answers in request order, whatever each costs."""
from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.testing import StringTransport

from mta.ops.control import ControlFactory


class SlowControl:
    """Answers each request when the test says so."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def handle(self, request: dict) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def connect(control) -> tuple[object, StringTransport]:
    protocol = ControlFactory(control).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


def answers(transport: StringTransport) -> list[dict]:
    return [json.loads(line) for line in transport.value().splitlines()]


def test_bad_json_behind_a_pending_request_is_answered_after_it():
    control = SlowControl()
    protocol, transport = connect(control)
    protocol.dataReceived(b'{"op": "list"}\n{not json\n')
    assert answers(transport) == []                     # the first request is still being answered
    control.pending[0].callback({"ok": True, "entries": []})
    first, second = answers(transport)
    assert first == {"ok": True, "entries": []}
    assert second["ok"] is False and second["error"].startswith("bad JSON: ")


def test_bad_json_alone_is_answered_at_once():
    protocol, transport = connect(SlowControl())
    protocol.dataReceived(b"[1, 2\n")
    [answer] = answers(transport)
    assert answer["ok"] is False and "bad JSON" in answer["error"]
