"""Keeping MTA-STS policies fresh (RFC 8461 10.2) and ``gateway.mta_sts.ca_file`` live on SIGHUP, with
the real twistd gateway, dnsmasq and the HTTPS policy server of test_mta_sts."""
from __future__ import annotations

import json
import signal

import trustme

from gwprocess import wait_until
from httpsfixture import policy
from tlsfixture import ca_file
from test_mta_sts import ca, config, dns, https, send, start, subjects, tls_peer  # noqa: F401 (fixtures)
from test_mta_sts import MX1, MX2


def cache_entry(tmp_path) -> dict:
    return json.loads((tmp_path / "spool" / "mta-sts" / "sts.test.json").read_text())


def test_a_policy_in_use_is_refreshed_in_the_background_before_it_expires(
        tmp_path, gateway, peers, dns, https, ca):
    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    # max_age 6s: refreshed at half its age (a day for real policies), with no mail waiting on it
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx2.sts.test", max_age=6))
    send("first")
    assert mx2.wait_for(1, timeout=20), gw.log()
    assert https.fetches("sts.test") == 1
    first = cache_entry(tmp_path)

    # the same id, a longer max_age: only a refresh that fetches despite the unchanged id sees it
    https.set_policy("sts.test", policy("enforce", "mx2.sts.test", max_age=600))
    refreshed = "MTA-STS: policy of sts.test (id 1, mode enforce) refreshed in the background; in force for another 600s"
    assert wait_until(lambda: refreshed in gw.log(), 20), gw.log()
    assert https.fetches("sts.test") == 2
    # written to the durable cache right after that line
    assert wait_until(lambda: "max_age: 600" in cache_entry(tmp_path)["policy"], 10)
    again = cache_entry(tmp_path)
    assert again["fetched"] > first["fetched"] and again["expires"] >= again["fetched"] + 600

    send("second")                                  # the refreshed policy is the one in force
    assert mx2.wait_for(2, timeout=20), gw.log()
    assert subjects(mx2) == ["first", "second"] and https.fetches("sts.test") == 2


def test_a_refresh_that_fails_keeps_the_policy_in_force(tmp_path, gateway, peers, dns, https, ca):
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    # refreshed at 10s, expiring at 20s: the second message comes between the two
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx2.sts.test", max_age=20))
    send("first")
    assert mx2.wait_for(1, timeout=20), gw.log()
    https.set_response("sts.test", 500, "text/plain", "down")
    assert wait_until(lambda: "MTA-STS: policy of sts.test (id 1) not fetched" in gw.log(), 20), gw.log()
    assert "HTTP 500" in gw.log() and "the cached policy (id 1, mode enforce) stays in force" in gw.log()
    send("second")                                  # still enforced: to mx2, never to the preferred mx1
    assert mx2.wait_for(2, timeout=20), gw.log()
    assert mx1.connections == 0


def test_a_new_ca_file_is_applied_on_sighup(tmp_path, gateway, peers, dns, https, ca):
    mx1 = tls_peer(peers, MX1, ca, "mx1.sts.test")
    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    cfg = config(tmp_path, dns, ca)
    cfg["gateway"]["mta_sts"]["ca_file"] = ca_file(trustme.CA(), tmp_path, "other-ca.pem")  # not the policy host's
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx2.sts.test"), cfg)
    send("untrusted policy host")
    assert mx1.wait_for(1, timeout=20), gw.log()    # no policy could be fetched: mail goes as before
    assert "MTA-STS: policy of sts.test (id 1) not fetched" in gw.log()

    cfg["gateway"]["mta_sts"]["ca_file"] = ca_file(ca, tmp_path)
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "read again and valid" in gw.log(), 20), gw.log()
    assert "SIGHUP: applied: gateway.mta_sts.ca_file" in gw.log()
    assert "needs a restart: gateway.mta_sts" not in gw.log()

    send("trusted now")                             # fetched at once (not held back by the failure)
    assert mx2.wait_for(1, timeout=20), gw.log()
    assert "MTA-STS: policy of sts.test is now id 1, mode enforce" in gw.log()
    assert subjects(mx1) == ["untrusted policy host"] and subjects(mx2) == ["trusted now"]


def test_a_damaged_cache_file_is_named_and_the_policy_looked_up_afresh(tmp_path, gateway, peers, dns, https, ca):
    """A FIFO where the cache file should be would block the reading thread for good; junk is no policy."""
    import os

    mx2 = tls_peer(peers, MX2, ca, "mx2.sts.test")
    cache = tmp_path / "spool" / "mta-sts"
    cache.mkdir(parents=True)
    os.mkfifo(cache / "sts.test.json")
    gw = start(tmp_path, gateway, dns, https, ca, policy("enforce", "mx2.sts.test"))
    send("past the pipe")
    assert mx2.wait_for(1, timeout=20), gw.log()
    assert (f"MTA-STS: cached policy of sts.test ignored: {cache}/sts.test.json: a named pipe, not a policy file; "
            "it is looked up afresh") in gw.log()
    assert wait_until(lambda: (cache / "sts.test.json").is_file() and cache_entry(tmp_path)["id"] == "1")
