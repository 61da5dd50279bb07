"""Limits that hold for the whole gateway when it runs several workers (``gateway.workers``): a
virtual server's ``max_connections`` counted over every process through ``<spool>/worker.counts``,
and a connector's outbound limits split between the workers."""
from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from gwprocess import base_config, wait_until
from mta.smtp import replies as R
from mta.config import parse_config
from mta.delivery.attempt import Deliverer
from mta.smtp.server.message_memory import MessageMemory
from mta.maillog import MailLog
from mta.smtp.server.session import SMTPServerFactory, SMTPServerProtocol
from mta.workers.counts import FILE_NAME, SharedConnectionLimit, WorkerCounts
from mta.workers.identity import WorkerInfo
from mta.config.workers import MAX_WORKERS

GW_HOST, GW_PORT = "127.0.0.150", 2525


# -- the shared file -------------------------------------------------------------------------------

def test_two_workers_see_each_others_counts(tmp_path):
    w0 = WorkerCounts(str(tmp_path), WorkerInfo(0, 2), counters=2)
    w1 = WorkerCounts(str(tmp_path), WorkerInfo(1, 2), counters=2)
    w0.store(0, 3)
    w1.store(0, 4)
    w1.store(1, 1)
    for view in (w0, w1):
        assert view.total(0) == 7 and view.total(1) == 1
        assert (view.value(0, 0), view.value(0, 1)) == (3, 4)
    size = (tmp_path / FILE_NAME).stat().st_size
    assert size == MAX_WORKERS * 3 * 8


def test_a_restarted_worker_starts_from_zero_and_its_predecessor_stops_writing(tmp_path):
    w0 = WorkerCounts(str(tmp_path), WorkerInfo(0, 2), counters=1, pid=100)
    old = WorkerCounts(str(tmp_path), WorkerInfo(1, 2), counters=1, pid=101)
    w0.store(0, 2)
    old.store(0, 5)                             # then worker 1 dies holding 5 connections
    assert w0.total(0) == 7
    new = WorkerCounts(str(tmp_path), WorkerInfo(1, 2), counters=1, pid=102)
    assert w0.total(0) == 2 and new.value(0, 1) == 0
    assert not old.owner and new.owner
    old.store(0, 4)                             # the predecessor, still finishing, writes no more
    new.store(0, 1)
    assert w0.total(0) == 3


def test_slots_of_workers_beyond_the_count_are_ignored(tmp_path):
    stale = WorkerCounts(str(tmp_path), WorkerInfo(2, 3), counters=1, pid=200)
    stale.store(0, 9)                           # left by a run with three workers
    now = WorkerCounts(str(tmp_path), WorkerInfo(0, 2), counters=1, pid=201)
    now.store(0, 1)
    assert now.total(0) == 1


def test_the_file_grows_for_more_virtual_servers_and_never_shrinks(tmp_path):
    big = WorkerCounts(str(tmp_path), WorkerInfo(0, 2), counters=3, pid=300)
    big.store(2, 6)
    small = WorkerCounts(str(tmp_path), WorkerInfo(1, 2), counters=1, pid=301)
    assert (tmp_path / FILE_NAME).stat().st_size == MAX_WORKERS * 4 * 8
    small.store(0, 1)
    assert big.total(2) == 6 and big.total(0) == 1


def _gateway(tmp_path: Path, index: int, count: int = 2, max_connections: int = 2) -> SimpleNamespace:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["limits"]["max_connections"] = max_connections
    events = []
    hooks = SimpleNamespace(event=lambda *a, **kw: events.append(a), listening=lambda: False)
    config = parse_config(cfg)
    worker = WorkerInfo(index, count)
    reactor = Clock()
    return SimpleNamespace(config=config, reactor=reactor, hooks=hooks, events=events, worker=worker,
                           message_memory=MessageMemory.for_worker(config.gateway.message_memory, worker),
                           mail_log=MailLog(reactor))


def test_a_connection_limit_is_the_total_of_every_worker(tmp_path):
    g0, g1 = _gateway(tmp_path, 0), _gateway(tmp_path, 1)
    a = SharedConnectionLimit.for_factory(g0, g0.config.virtual_servers[0])
    b = SharedConnectionLimit.for_factory(g1, g1.config.virtual_servers[0])
    a.publish(1)
    b.publish(1)
    assert a.total(1) == b.total(1) == 2         # each sees the other's connection as well as its own
    b.publish(0)
    a.publish(2)
    assert (a.total(2), b.total(0)) == (2, 2)


def test_a_single_process_keeps_its_plain_count(tmp_path):
    g = _gateway(tmp_path, 0, count=1)
    factory = SMTPServerFactory(g, g.config.virtual_servers[0])
    assert factory.shared is None
    assert not (tmp_path / "spool" / FILE_NAME).exists()


def test_the_factories_of_two_workers_refuse_the_connection_over_the_total(tmp_path):
    g0, g1 = _gateway(tmp_path, 0), _gateway(tmp_path, 1)
    f0 = SMTPServerFactory(g0, g0.config.virtual_servers[0])
    f1 = SMTPServerFactory(g1, g1.config.virtual_servers[0])
    first, second = f0.buildProtocol(None), f1.buildProtocol(None)
    assert isinstance(first, SMTPServerProtocol) and isinstance(second, SMTPServerProtocol)
    refused = f0.buildProtocol(None)
    transport = StringTransport()
    refused.makeConnection(transport)
    assert transport.value() == R.TOO_MANY_CONNECTIONS.to_bytes() and transport.disconnecting
    assert (f0.active, f1.active) == (1, 1)         # the metrics figure stays this process's own
    f1.connection_closed(second)
    assert isinstance(f0.buildProtocol(None), SMTPServerProtocol)


# -- outbound limits, split --------------------------------------------------------------------------

def test_share_is_the_limit_divided_and_rounded_up():
    assert WorkerInfo(0, 1).share(3) == 3
    assert WorkerInfo(0, 2).share(3) == 2 and WorkerInfo(1, 2).share(4) == 2
    assert WorkerInfo(0, 3).share(1000) == 334
    assert WorkerInfo(1, 4).share(1) == 1           # never 0: every worker can still deliver
    assert WorkerInfo(0, 2).share(None) is None


def test_each_worker_takes_its_share_of_a_connectors_limits(tmp_path):
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["connectors"][0].update(max_connections=10, max_connections_per_host=3)
    config = parse_config(cfg)
    connector = config.connectors[0]
    split = Deliverer(SimpleNamespace(config=config, worker=WorkerInfo(1, 2)))._policy(connector)
    assert (split.max_connections, split.max_connections_per_host) == (5, 2)
    whole = Deliverer(SimpleNamespace(config=config, worker=WorkerInfo()))._policy(connector)
    assert (whole.max_connections, whole.max_connections_per_host) == (10, 3)


# -- end to end: the real daemon with two workers ---------------------------------------------------

def _connect() -> tuple[bytes, socket.socket]:
    """The first line the gateway sends, and the socket (still open)."""
    sock = socket.create_connection((GW_HOST, GW_PORT), timeout=15)
    line = sock.makefile("rb").readline()
    return line, sock


def test_max_connections_is_the_gateways_total_over_two_workers(gateway, tmp_path):
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["gateway"]["workers"] = 2
    cfg["virtual_servers"][0]["limits"]["max_connections"] = 4
    gw = gateway(cfg)
    assert wait_until(lambda: "worker 1 started" in gw.log() and "control.sock.1" in gw.log(), 30), gw.log()
    assert (tmp_path / "spool" / FILE_NAME).exists()
    held = []
    try:
        for _ in range(4):
            line, sock = _connect()
            held.append(sock)
            assert line.startswith(b"220 "), line
        # whichever worker the kernel hands them to, nobody has room any more
        for _ in range(6):
            line, sock = _connect()
            sock.close()
            assert line == R.TOO_MANY_CONNECTIONS.to_bytes(), line
        held.pop(0).close()

        def admitted() -> bool:
            line, sock = _connect()
            if line.startswith(b"220 "):
                held.append(sock)
                return True
            sock.close()
            return False

        assert wait_until(admitted, 15, interval=0.05)
        line, sock = _connect()
        sock.close()
        assert line == R.TOO_MANY_CONNECTIONS.to_bytes(), line
    finally:
        for sock in held:
            sock.close()
