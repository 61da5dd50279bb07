"""Per-destination traffic shaping (``gateway.shaping``) as a destination meets it: a real ``twistd
smtpgw`` sending to a real peer that counts the connections it has open at once and answers 421 when
told to. Gateway on 127.0.0.160:2525, the destination's host on 127.0.0.161:25."""
from __future__ import annotations

import smtplib
import threading
import time

import pytest

from gwprocess import base_config, wait_until
from mta.config import ConfigError, parse_config
from mta.delivery.shaping import Shaper, Verdict, matches, merge_snapshots, verdict_of
from mta.model.nexthop import Hop
from test_cli_queue import entries, run_json

GW_HOST, GW_PORT = "127.0.0.160", 2525
DEST = "127.0.0.161"


def shaped_config(tmp_path, shaping: list[dict]) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0].update({"smart_hosts": [f"[{DEST}]"], "max_connections_per_host": 20})
    cfg["gateway"]["shaping"] = shaping
    return cfg


def send(n: int, domain: str = "far.test") -> None:
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as s:
        for i in range(n):
            s.sendmail("a@sender.test", [f"user{i}@{domain}"], f"Subject: {i}\r\n\r\nHello.\r\n")


class Concurrency:
    """Counts the peer's open connections at each message, holding each one a moment so that
    connections overlap when the gateway lets them."""

    def __init__(self, peer, hold: float = 0.3) -> None:
        self.peer, self.hold, self.most = peer, hold, 0
        self.lock = threading.Lock()

    def __call__(self, argument: str) -> None:
        with self.lock:
            self.most = max(self.most, self.peer.open_connections())
        time.sleep(self.hold)
        return None


def test_max_connections_holds_at_the_destination_and_unshaped_mail_is_not_held_back(gateway, peers, tmp_path):
    dest = peers(DEST)
    seen = Concurrency(dest)
    dest.set_reply("dot", seen)
    gateway(shaped_config(tmp_path, [{"match": "far.test", "max_connections": 2}]))
    send(8)
    assert dest.wait_for(8, 40)
    assert seen.most == 2           # the gateway used what it may, and no more

    seen.most = 0                   # another domain, not shaped: the connector's 20 per host apply
    send(8, domain="other.test")
    assert dest.wait_for(16, 40)
    assert seen.most > 2


def refuse_once(dest) -> list[float]:
    """The destination answers the first MAIL with 421, every later one as usual; returns the list
    that gets the time of each MAIL."""
    mails: list[float] = []

    def mail(argument: str) -> str | None:
        mails.append(time.monotonic())
        return "421 4.7.0 Try again later, closing connection" if len(mails) == 1 else None

    dest.set_reply("mail", mail)
    return mails


def test_a_421_pauses_and_slows_the_destination_and_the_retry_waits_for_the_pause(gateway, peers, tmp_path):
    """While the pause lasts (a minute here, so that nothing below races its end): the destination
    shows paused at half its connections, and the queue's retry (due after 1s) holds the message until
    the pause ends instead of connecting."""
    dest = peers(DEST)
    refuse_once(dest)
    gw = gateway(shaped_config(tmp_path, [{"match": "*.test", "max_connections": 4, "back_off_on_421": "1m"}]))
    send(1)
    assert wait_until(lambda: "shaping: destination *.test said 421 4.7.0" in gw.log(), 10)
    shape = run_json(gw, "summary")
    [row] = shape["shaping"]
    assert (row["destination"], row["state"], row["connections"], row["max_connections"]) == ("*.test", "paused", 2, 4)
    assert row["back_offs"] == 1 and row["last_trouble"].startswith("421 4.7.0")
    # the retry came and was held for the rest of the pause, without a second connection
    assert wait_until(lambda: "paused by traffic shaping" in (entries(gw)[0]["why_held"] or ""), 20), entries(gw)
    [held] = entries(gw)
    assert held["next_attempt"] >= row["paused_until"] - 1 and not dest.messages
    assert dest.connections == 1


def test_after_a_421_pause_a_success_restores_the_destination(gateway, peers, tmp_path):
    """A short pause: the message goes once the pause is over (never before), and that success
    brings the destination back to its configured connections."""
    dest = peers(DEST)
    mails = refuse_once(dest)
    gw = gateway(shaped_config(tmp_path, [{"match": "*.test", "max_connections": 4, "back_off_on_421": "3s"}]))
    send(1)
    assert wait_until(lambda: "shaping: destination *.test said 421 4.7.0" in gw.log(), 10)
    assert dest.wait_for(1, 60)
    assert mails[1] - mails[0] >= 3.0
    assert wait_until(lambda: "back to 4 connections" in gw.log(), 20), gw.log()
    assert wait_until(lambda: run_json(gw, "summary")["shaping"][0]["state"] == "normal", 20)
    [row] = run_json(gw, "summary")["shaping"]
    assert (row["connections"], row["sent"], row["back_offs"]) == (4, 1, 1)


def test_a_burst_of_4xx_backs_off_too(gateway, peers, tmp_path):
    dest = peers(DEST)
    dest.set_reply("rcpt", "451 4.3.0 busy")
    gw = gateway(shaped_config(tmp_path, [{"match": "*", "max_connections": 3, "back_off_on_421": "1m"}]))
    send(3)
    assert wait_until(lambda: "shaping: destination far.test said 451 4.3.0 busy: slowed to 1 connection(s), "
                              "paused 60s" in gw.log(), 20)
    [row] = run_json(gw, "summary")["shaping"]
    assert row["state"] == "paused" and row["connections"] == 1


def test_messages_per_minute_spaces_the_transactions(gateway, peers, tmp_path):
    dest = peers(DEST)
    times: list[float] = []
    dest.set_reply("mail", lambda argument: times.append(time.monotonic()))
    gateway(shaped_config(tmp_path, [{"match": "far.test", "messages_per_minute": 120}]))   # one per 0.5s
    send(4)
    assert dest.wait_for(4, 20)
    # paced, the four MAILs span at least three intervals (a late one can only make a later gap shorter,
    # never the span; unshaped they would all come within a few milliseconds)
    assert len(times) == 4 and times[-1] - times[0] >= 1.4


# -- the pieces on their own -----------------------------------------------------------------------

def test_config_keys_and_their_errors(tmp_path):
    cfg = shaped_config(tmp_path, [{"match": "gmail.com", "max_connections": 20, "messages_per_minute": 600},
                                   {"match": "*.outlook.com", "max_connections": 10},
                                   {"match": "*", "max_connections": 50, "back_off_on_421": "5m"}])
    rules = parse_config(cfg).gateway.shaping
    assert [(r.match, r.max_connections, r.messages_per_minute, r.back_off_on_421) for r in rules] == [
        ("gmail.com", 20, 600.0, 60.0), ("*.outlook.com", 10, None, 60.0), ("*", 50, None, 300.0)]
    for bad, key in (({"max_connections": 2}, "gateway.shaping[0].match"),
                     ({"match": "a.test", "max_connections": 0}, "gateway.shaping[0].max_connections"),
                     ({"match": "a.test", "messages_per_minute": -1}, "gateway.shaping[0].messages_per_minute"),
                     ({"match": "a.test", "speed": 1}, "gateway.shaping[0]")):
        with pytest.raises(ConfigError) as e:
            parse_config(shaped_config(tmp_path, [bad]))
        assert e.value.path.startswith(key)
    with pytest.raises(ConfigError) as e:
        parse_config(shaped_config(tmp_path, [{"match": "a.test"}, {"match": "A.test"}]))
    assert e.value.path == "gateway.shaping[1].match"


def test_matching_by_domain_or_mx_host_suffix():
    assert matches("gmail.com", "gmail.com", "") and not matches("gmail.com", "x.gmail.com", "")
    assert matches("*.outlook.com", "contoso.test", "contoso-test.mail.protection.outlook.com")
    assert matches("*.outlook.com", "eu.outlook.com", "") and not matches("*.outlook.com", "outlook.com", "")
    assert matches("*", "anything.test", "")


def test_suffix_rules_pool_their_domains_and_star_keeps_each_apart():
    from mta.config.model import ShapingRule
    from twisted.internet.task import Clock as TwistedClock

    shaper = Shaper([ShapingRule("*.outlook.com", 10), ShapingRule("*", 2)], TwistedClock())
    a = shaper.destination("contoso.test", Hop("10.0.0.1", 25, name="contoso.mail.protection.outlook.com"))
    b = shaper.destination("fabrikam.test", Hop("10.0.0.2", 25, name="fabrikam.mail.protection.outlook.com"))
    c, d = shaper.destination("one.test", Hop("10.0.0.3")), shaper.destination("two.test", Hop("10.0.0.4"))
    assert a is b and a.name == "*.outlook.com"
    assert c is not d and (c.name, d.name) == ("one.test", "two.test")
    assert verdict_of([250, 451]) is Verdict.OK and verdict_of([451, 421]) is Verdict.BUSY
    assert verdict_of([550]) is Verdict.NEUTRAL and verdict_of([451, 452]) is Verdict.TEMPORARY


def test_workers_snapshots_merge_into_one_row_per_destination():
    row = {"destination": "far.test", "match": "*", "state": "normal", "max_connections": 2, "connections": 2,
           "in_flight": 1, "messages_per_minute": None, "sent": 5, "paused_until": None, "back_offs": 0,
           "last_trouble": ""}
    other = {**row, "state": "paused", "connections": 1, "paused_until": 100.0, "back_offs": 1,
             "last_trouble": "421 4.7.0 later"}
    [merged] = merge_snapshots([[row], [other]])
    assert (merged["max_connections"], merged["connections"], merged["sent"], merged["back_offs"]) == (4, 3, 10, 1)
    assert (merged["state"], merged["paused_until"], merged["last_trouble"]) == ("paused", 100.0, "421 4.7.0 later")
