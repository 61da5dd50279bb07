"""The etrn_dequeue pieces on their own: configuration keys, ETRN nodes, authorization, the rate limit,
the hold answer, the verbs' refusals, the client schedule. End to end: tests/test_etrn_e2e.py."""
from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock

from gwprocess import base_config
from mta.config import ConfigError, parse_config
from mta.model.envelope import Session
from mta.model.queue_entry import QueueEntry, RecipientState
from mta.config.schedules import Schedule
from smtpgw_plugins.etrn_dequeue import EtrnDequeue
from smtpgw_plugins.etrn_dequeue.nodes import is_authorized, parse_domain_list, parse_node
from smtpgw_plugins.etrn_dequeue.requester import build_request, next_time


def config_dict(**delivery) -> dict:
    cfg = base_config(Path("/nonexistent"), listen="127.0.0.120:2525")
    cfg["connectors"].append({"name": "Site queue", "address_spaces": ["site.test", "*.site.test"],
                              "delivery": {"remote_triggered": True,
                                           "authorized": [{"network": "127.0.0.121/32"}, {"account": "site"}],
                                           **delivery}})
    cfg["plugins"]["enabled"] = ["etrn_dequeue"]
    return cfg


def session(peer: str = "127.0.0.121", user: str | None = None, helo: str | None = "client.test",
            vs: str = "Default SMTP Virtual Server") -> Session:
    return Session(id="s1", virtual_server=vs, peer_host=peer, peer_port=1, local_host="127.0.0.120",
                   local_port=25, helo=helo, authenticated_user=user)


@pytest.fixture
def plugin():
    from mta.app.gateway import Gateway
    config = parse_config(config_dict())
    gw = Gateway(config, Clock(), load_plugins=False)
    p = EtrnDequeue()
    p.smtpgw_configure(config, gw)
    return p


# -- configuration --------------------------------------------------------------------------------

def test_config_keys_and_their_errors():
    config = parse_config(config_dict())
    auth = config.connectors[1].delivery.authorized
    assert str(auth[0].network) == "127.0.0.121/32" and auth[1].account == "site"
    bad = config_dict()
    bad["connectors"][1]["delivery"]["authorized"] = [{"network": "10.0.0.0/8", "account": "x"}]
    with pytest.raises(ConfigError, match=r"connectors\[1\].delivery.authorized\[0\]: expected exactly one"):
        parse_config(bad)
    bad = config_dict(remote_triggered=False)
    with pytest.raises(ConfigError, match=r"delivery.authorized: is only used with remote_triggered"):
        parse_config(bad)
    cfg = config_dict()
    cfg["connectors"][0]["etrn"] = {"server": "isp.example:2525", "domains": ["Site.Test"],
                                    "schedule": "every 30m"}
    etrn = parse_config(cfg).connectors[0].etrn
    assert etrn.domains == ("site.test",) and etrn.command == "ETRN" and etrn.schedule.every == 1800
    cfg["connectors"][0]["etrn"] = {"server": "isp.example", "domains": ["site.test"], "command": "ATRN"}
    with pytest.raises(ConfigError, match=r"connectors\[0\].etrn.auth: required with command: ATRN"):
        parse_config(cfg)
    cfg["connectors"][0]["etrn"] = {"server": "isp.example", "domains": ["site.test"], "command": "x\ny"}
    with pytest.raises(ConfigError, match=r"etrn.command"):
        parse_config(cfg)
    cfg["connectors"][0]["etrn"] = {"server": "isp.example", "domains": ["site.test"],
                                    "command": "atrn", "auth": {"username": "u", "password": "p"}}
    req = build_request(parse_config(cfg), parse_config(cfg).connectors[0])
    assert (req.command, req.port, req.tls) == ("ATRN", 366, "required")
    cfg["plugins"]["etrn_dequeue"] = {"rate_limit": {"requests": 0}}
    with pytest.raises(ConfigError, match=r"plugins.etrn_dequeue.rate_limit.requests"):
        parse_config(cfg)


# -- nodes, authorization, limits -------------------------------------------------------------------

def test_nodes():
    assert parse_node("Site.Test").matches_domain("site.test")
    assert not parse_node("site.test").matches_domain("lab.site.test")
    assert parse_node("@site.test").matches_domain("lab.site.test")
    assert parse_node("#Site queue").kind == "queue"
    for bad in ("", "two words", "@", "a..b", "-x.test"):
        assert parse_node(bad) is None, bad
    assert parse_domain_list("a.test, B.test,a.test") == ["a.test", "b.test"]
    assert parse_domain_list("") == [] and parse_domain_list("a.test,,b") is None


def test_authorization_by_network_or_account():
    connector = parse_config(config_dict()).connectors[1]
    assert is_authorized(connector, session("127.0.0.121"))
    assert is_authorized(connector, session("::ffff:127.0.0.121"))
    assert not is_authorized(connector, session("127.0.0.123"))
    assert is_authorized(connector, session("127.0.0.123", user="site"))
    assert not is_authorized(connector, session("127.0.0.123", user="other"))


def test_rate_limit_is_per_client_and_counts_over_the_window(plugin):
    """At most ``requests`` per client in each window (the gateway's per-client table, shared by
    the workers: mta/cluster/windows.py); a later window starts over."""
    from mta.cluster.windows import ClientWindows
    from mta.workers.clients import ClientCounts
    from mta.workers.identity import SINGLE

    now = [1_000_000.0]
    table = ClientCounts(None, SINGLE, clock=lambda: now[0])
    plugin.services.client_windows = ClientWindows(lambda: table)
    plugin.rate = type(plugin.rate)(2, 60.0)
    assert [plugin.dequeue(session(), "site.test").code for _ in range(3)] == [251, 251, 458]
    assert plugin.dequeue(session("127.0.0.9"), "site.test").code == 459       # another client
    now[0] += 61
    assert plugin.dequeue(session(), "site.test").code == 251


# -- holding and the verbs ----------------------------------------------------------------------------

def test_hold_for_remote_triggered_connectors_only(plugin):
    internet, site = plugin.config.connectors
    entry = QueueEntry(id="e1", sender="a@x.test", rcpts=[RecipientState("b@site.test")], received_at=0)
    now = plugin.services.reactor.seconds()
    hold = plugin.smtpgw_delivery_window(site, entry, "site.test")
    assert hold.until > now + 86400 and "waiting for ETRN/ATRN for site.test" in hold.reason
    assert plugin.smtpgw_delivery_window(internet, entry, "site.test") is None


def test_verbs_refusals(plugin):
    assert plugin.dequeue(session(helo=None), "site.test").code == 503
    assert plugin.dequeue(session(), "site.test").code == 251             # authorized, nothing held
    assert plugin.dequeue(session("127.0.0.9"), "site.test").code == 459
    assert plugin.smtpgw_command(session(), "TURN", "").code == 502
    assert plugin.smtpgw_command(session(user="site"), "ATRN", "site.test").code == 502   # not ODMR
    assert plugin.smtpgw_command(session(), "XYZZY", "") is None
    assert plugin.smtpgw_ehlo_keywords(session()) == ["ETRN"]
    plugin.turn_enabled = True
    assert plugin.smtpgw_command(session(), "TURN", "").code == 530
    assert plugin.smtpgw_command(session(user="site"), "TURN", "").code == 453         # nothing held
    assert plugin.smtpgw_command(session(user="nobody"), "TURN", "").code == 450


def test_schedule_times():
    assert next_time(None, 100.0) is None
    assert next_time(Schedule.periodic(1800), 100.0) == 1900.0
    monday_8 = Schedule.weekly({32})             # Monday 08:00-08:15
    opening = next_time(monday_8, 0.0)           # 1970-01-01 was a Thursday
    assert opening == (4 * 86400) + 8 * 3600
