"""Connector schedules through the whole queue, with a fake clock: the real Gateway (CorePolicy's
delivery window, deliverer, queue manager, spool on disk, client pool) whose ``seconds``/``callLater``
come from a ``task.Clock`` while sockets and threads are the real reactor's.

Mail outside the window is held -- no attempt counted, ``held_reason`` and ``next_attempt`` saying
why and until when, as ``smtpgw queue`` shows them -- and goes the moment the window opens; small
mail is not held by an oversize window. The smart host is a real SMTPPeer on 127.0.0.98:25.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from twisted.internet import reactor, task
from twisted.trial import unittest

from mta.config import parse_config
from mta.app.gateway import Gateway
from mta.plugin.hookspecs import hookimpl
from mta.spool.store import Spool
from peers import SMTPPeer

PEER = "127.0.0.98"
SMALL = b"Subject: small\r\n\r\nhello\r\n"
BIG = b"Subject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 100        # 8 KB: above the 4KB threshold


def at(text: str, zone: str = "UTC") -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZoneInfo(zone)).timestamp()


class ClockReactor:
    """The real reactor, except that time (``seconds``, ``callLater``) is a ``task.Clock``."""

    def __init__(self, real, start: float) -> None:
        self.clock = task.Clock()
        self.clock.advance(start)
        self._real = real

    def seconds(self) -> float:
        return self.clock.seconds()

    def callLater(self, delay, f, *args, **kw):
        return self.clock.callLater(delay, f, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._real, name)


class ScheduledQueue(unittest.TestCase):
    timeout = 30

    def setUp(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="smtpgw-schedq-"))
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.peer = SMTPPeer(PEER).start()
        self.addCleanup(self.peer.stop)
        self.gw: Gateway | None = None

    def tearDown(self):
        if self.gw is None:
            return None
        self.gw.resolver.close()
        return self.gw.stop()

    async def boot(self, now: str, delivery: dict) -> Gateway:
        fake = ClockReactor(reactor, at(now))
        self.clock = fake.clock
        cfg = {
            "gateway": {"hostname": "gw.example.test", "spool": str(self.tmp / "spool"),
                        "queue": {"retry": ["10m"], "expire": "7d", "delay_notification": "7d"}},
            "virtual_servers": [{"name": "vs", "listen": ["127.0.0.90:2525"]}],
            "connectors": [{"name": "Scheduled", "address_spaces": ["*"], "smart_hosts": [f"[{PEER}]"],
                            "outbound": {"tls": "none"}, "delivery": delivery}],
            "plugins": {"enabled": ["smart_host"]},
        }
        self.gw = Gateway(parse_config(cfg), fake)
        self.holds: list[str] = []
        self.gw.hooks.register(self, name="recorder")
        await self.gw.start()
        return self.gw

    @hookimpl
    def smtpgw_event(self, category, level, message, fields):
        if category == "routing_engine" and ": held: " in message:
            self.holds.append(message)

    async def settle(self, predicate, timeout: float = 10.0) -> bool:
        """Let due timers of the fake clock run and real I/O finish until ``predicate()`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.clock.advance(0)
            if predicate():
                return True
            await task.deferLater(reactor, 0.01, lambda: None)
        return predicate()

    def rcpt(self, entry_id: str):
        for e in self.gw.queue.entries():
            if e.id == entry_id:
                return e.rcpts[0]
        return None

    def held(self, entry_id: str) -> bool:
        r = self.rcpt(entry_id)
        return r is not None and r.held_reason is not None and not self.gw.queue._active

    async def peer_has(self, n: int) -> bool:
        return await self.settle(lambda: len(self.peer.messages) >= n)

    async def test_held_outside_the_window_and_sent_at_its_opening(self):
        gw = await self.boot("2026-11-30 07:00:00", {"schedule": {"mon": ["08:00-18:00"]}})
        entry_id = await gw.queue.inject("a@example.test", ["b@far.test"], SMALL)
        self.assertTrue(await self.settle(lambda: self.held(entry_id)))
        state = self.rcpt(entry_id)
        self.assertEqual(state.held_reason, "held: connector 'Scheduled' schedule, opens at 2026-11-30 08:00 UTC")
        self.assertEqual(state.next_attempt, at("2026-11-30 08:00:00"))
        self.assertEqual((state.attempts, state.last_error), (0, None))
        self.assertEqual(self.peer.connections, 0)
        # what a queue tool reading the spool sees
        on_disk = {e.id: e for e in Spool(str(self.tmp / "spool")).scan_sync()}[entry_id].rcpts[0]
        self.assertEqual((on_disk.held_reason, on_disk.next_attempt), (state.held_reason, state.next_attempt))

        # a forced run (queue retry, ETRN) inside the closed window still holds
        self.assertEqual(len(self.holds), 1)
        self.assertEqual(gw.queue.wake(), 1)
        self.assertTrue(await self.settle(lambda: len(self.holds) == 2 and self.held(entry_id)))
        self.assertEqual(self.rcpt(entry_id).attempts, 0)
        self.assertEqual(self.peer.connections, 0)

        self.clock.advance(3599)                        # 07:59:59: nothing is due yet
        self.assertEqual(self.rcpt(entry_id).next_attempt, at("2026-11-30 08:00:00"))
        self.assertEqual(self.peer.connections, 0)
        self.clock.advance(1)                           # 08:00:00: the queue runs at once
        self.assertTrue(await self.peer_has(1))
        self.assertEqual(self.peer.messages[0].recipients, ["b@far.test"])
        self.assertTrue(await self.settle(lambda: not gw.queue.entries()))

    async def test_oversize_mail_waits_while_small_mail_flows(self):
        gw = await self.boot("2026-11-30 10:00:00", {"schedule": "always", "oversize": {
            "threshold": "4KB", "schedule": {"mon": ["20:00-22:00"]}}})
        big_id = await gw.queue.inject("a@example.test", ["big@far.test"], BIG)
        small_id = await gw.queue.inject("a@example.test", ["small@far.test"], SMALL)
        self.assertTrue(await self.peer_has(1))
        self.assertEqual(self.peer.messages[0].recipients, ["small@far.test"])
        self.assertTrue(await self.settle(lambda: self.held(big_id) and self.rcpt(small_id) is None))
        state = self.rcpt(big_id)
        self.assertEqual(state.held_reason, f"held: connector 'Scheduled' oversize schedule (message {len(BIG)} "
                                            "> 4KB), opens at 2026-11-30 20:00 UTC")
        self.assertEqual((state.next_attempt, state.attempts), (at("2026-11-30 20:00:00"), 0))

        self.clock.advance(at("2026-11-30 20:00:00") - at("2026-11-30 10:00:00"))
        self.assertTrue(await self.peer_has(2))
        self.assertEqual(self.peer.messages[1].recipients, ["big@far.test"])
        self.assertTrue(await self.settle(lambda: not gw.queue.entries()))
