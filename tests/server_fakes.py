"""A small gateway for server tests: real hooks and core policy, a queue whose answer the test controls,
and a scripted client over an in-memory transport."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from mta.config import (Config, GatewayConfig, Limits, ListenAddress, LocalDomain, QueueConfig, TlsConfig,
                        VirtualServer)
from mta.delivery.recipients import LocalRecipients
from mta.policy.core import CorePolicy
from mta.plugin.manager import Hooks
from mta.smtp.server.message_memory import MessageMemory
from mta.smtp.server.session import SMTPServerFactory
from mta.workers.identity import SINGLE
from mta.maillog import MailLog

HOSTNAME = "mx.example.test"
CLIENT_IP = "192.0.2.7"


class Code(enum.IntEnum):
    HELP = 214
    READY = 220
    CLOSING = 221
    OK = 250
    CANNOT_VERIFY = 252
    START_INPUT = 354
    UNAVAILABLE = 421
    LOCAL_ERROR = 451
    INSUFFICIENT_STORAGE = 452
    SYNTAX_ERROR = 500
    ARGUMENT_ERROR = 501
    NOT_IMPLEMENTED = 502
    BAD_SEQUENCE = 503
    TLS_REQUIRED = 530
    MAILBOX_UNAVAILABLE = 550
    EXCEEDED_STORAGE = 552
    NAME_NOT_ALLOWED = 553
    TRANSACTION_FAILED = 554
    PARAMS_NOT_RECOGNIZED = 555


def make_config(max_hops: int = 30, tls: TlsConfig | None = None, **limits: Any) -> Config:
    gateway = GatewayConfig(hostname=HOSTNAME, spool="/nonexistent", postmaster="postmaster@example.test",
                            local_domains={"example.test": LocalDomain("example.test", "/nonexistent")},
                            queue=QueueConfig(max_hops=max_hops))
    vs = VirtualServer(name="Test Virtual Server", listen=(ListenAddress("127.0.0.21", 0),),
                       limits=Limits(**limits), tls=tls or TlsConfig())
    return Config(gateway=gateway, virtual_servers=(vs,), connectors=())


@dataclass
class Submitted:
    session: Any
    envelope: Any
    message: bytes
    answer: defer.Deferred


class FakeQueue:
    """``submit`` answers at once with ``Q<envelope id>`` unless ``hold`` is set."""

    def __init__(self) -> None:
        self.hold = False
        self.submitted: list[Submitted] = []

    def submit(self, session: Any, envelope: Any, message: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.submitted.append(Submitted(session, envelope, message.as_bytes(), d))
        if not self.hold:
            d.callback("Q" + envelope.id)
        return d


class FakeGateway:
    def __init__(self, config: Config | None = None, reactor: Any = None, core: bool = True) -> None:
        self.config = config or make_config()
        self.reactor = reactor if reactor is not None else task.Clock()
        self.hooks = Hooks()
        if core:
            self.hooks.register(CorePolicy(self), name="core")
        self.recipients = LocalRecipients(self.config, self.reactor)
        self.queue = FakeQueue()
        self.worker = SINGLE
        self.mail_log = MailLog(self.reactor)
        self.message_memory = MessageMemory(self.config.gateway.message_memory)
        self.client_counts = None           # per-client table, made at the first connection


@dataclass
class Answer:
    code: int
    lines: list[str] = field(default_factory=list)   # text after "code-"/"code "

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def parse_replies(data: bytes) -> list[Answer]:
    answers: list[Answer] = []
    current: Answer | None = None
    for line in data.decode("utf-8").split("\r\n")[:-1]:
        code, sep, text = int(line[:3]), line[3:4], line[4:]
        if current is None:
            current = Answer(code)
        current.lines.append(text)
        if sep != "-":
            answers.append(current)
            current = None
    return answers


class Dialog:
    """One client over a StringTransport; ``send`` returns the replies it caused."""

    def __init__(self, gateway: FakeGateway | None = None, factory: SMTPServerFactory | None = None) -> None:
        self.gateway = gateway or FakeGateway()
        self.factory = factory or SMTPServerFactory(self.gateway, self.gateway.config.virtual_servers[0])
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", CLIENT_IP, 40000),
                                         hostAddress=IPv4Address("TCP", "127.0.0.21", 25))
        self.protocol = self.factory.buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.banner = self.read()

    def read(self) -> list[Answer]:
        data = self.transport.value()
        self.transport.clear()
        return parse_replies(data)

    def send(self, data: bytes) -> list[Answer]:
        self.protocol.dataReceived(data)
        return self.read()

    def codes(self, data: bytes) -> list[int]:
        return [a.code for a in self.send(data)]

    def ehlo(self) -> list[Answer]:
        return self.send(b"EHLO client.test\r\n")

    def start_transaction(self, rcpt: str = "user@example.test") -> None:
        assert self.codes(b"EHLO client.test\r\nMAIL FROM:<sender@remote.test>\r\nRCPT TO:<"
                          + rcpt.encode() + b">\r\nDATA\r\n") == [Code.OK, Code.OK, Code.OK, Code.START_INPUT]

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting

    @property
    def paused(self) -> bool:
        return self.transport.producerState == "paused"

    @property
    def submitted(self) -> list[Submitted]:
        return self.gateway.queue.submitted
