"""The Cluster page as an administrator uses it to act on another node's mail: a real redis-server, two
``twistd smtpgw`` nodes (mx1 serving the console, mx2 holding the mail), a recording smart host for mx2,
headless Chromium. Each row of "Queued on every node" has the actions ``smtpgw queue hold NODE:ID`` has
(the same control request, ``cluster_command``, through Redis to the node); every action carries the
session's CSRF token and is logged with the user's name on the console's node and as asked by mx1 on mx2.
"""
from __future__ import annotations

import subprocess
import urllib.error
import urllib.parse
import urllib.request

from browser import browser  # noqa: F401  (fixture)
from gwprocess import GatewayProcess, base_config, port_open, wait_until
from test_cli_queue import entries, smtpgw_command
from test_console_browser import CONSOLE, GW_HOST, console_config, login, notice, send

MX2, MX2_SMART_HOST = "127.0.0.125", "127.0.0.126"


def cluster_rows(driver) -> dict[str, dict[str, str]]:
    """The "Queued on every node" rows by queue id: {column: text}."""
    from selenium.webdriver.common.by import By

    out = {}
    for tr in driver.find_elements(By.CSS_SELECTOR, "table.cluster-queue tbody tr"):
        cells = {c.get_attribute("data-label"): c.text for c in tr.find_elements(By.TAG_NAME, "td")}
        out[cells["Queue ID"]] = cells
    return out


def act(driver, ident: str, op: str, confirm: bool = False) -> str:
    """Choose ``op`` in the row of ``ident`` and apply it; the notice the page shows after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    row = WebDriverWait(driver, 30, ignored_exceptions=(Exception,)).until(
        lambda d: next(tr for tr in d.find_elements(By.CSS_SELECTOR, "table.cluster-queue tbody tr")
                       if tr.find_element(By.CSS_SELECTOR, 'td[data-label="Queue ID"]').text == ident))
    choice = row.find_element(By.CSS_SELECTOR, 'select[name="op"]')
    choice.click()                      # the focus in the form: the live table leaves it alone meanwhile
    Select(choice).select_by_value(op)
    old = driver.find_element(By.TAG_NAME, "html")
    row.find_element(By.CSS_SELECTOR, "button").click()
    if confirm:
        WebDriverWait(driver, 10).until(expected_conditions.alert_is_present()).accept()
    WebDriverWait(driver, 20).until(expected_conditions.staleness_of(old))
    assert driver.current_url.endswith("/cluster")
    return notice(driver)


def node_queue(gw: GatewayProcess) -> dict[str, dict]:
    return {e["id"]: e for e in entries(gw)}


def test_cluster_page_holds_releases_retries_and_deletes_another_nodes_mail(gateway, peers, browser,
                                                                              redis_server, tmp_path):
    smart = peers(MX2_SMART_HOST)
    smart.set_reply("rcpt", "451 4.3.0 try later")
    cfg = console_config(tmp_path)
    cfg["gateway"]["cluster"] = {"redis": redis_server.url, "node": "mx1"}
    gw = gateway(cfg)
    other_cfg = base_config(tmp_path / "mx2", listen=f"{MX2}:2525")
    other_cfg["gateway"]["cluster"] = {"redis": redis_server.url, "node": "mx2"}
    other_cfg["gateway"]["queue"]["retry"] = ["1h"]
    other_cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    other_cfg["connectors"][0]["smart_hosts"] = [f"[{MX2_SMART_HOST}]"]
    (tmp_path / "mx2").mkdir()
    other = GatewayProcess(tmp_path / "mx2", other_cfg).start()
    try:
        assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
        assert wait_until(lambda: redis_server.cli("SCARD", "smtpgw:nodes") == "2", 20)
        for subject, rcpt in (("keep", "keep@far.test"), ("drop", "drop@far.test"), ("again", "again@far.test")):
            send(subject, rcpt, host=MX2)
        assert wait_until(lambda: len(node_queue(other)) == 3
                          and all(e["last_error"] for e in node_queue(other).values()), 30), other.log()
        ids = {e["recipients_pending"][0].split("@")[0]: i for i, e in node_queue(other).items()}

        login(browser, page="/cluster")
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(browser, 30, ignored_exceptions=(Exception,)).until(
            lambda d: set(ids.values()) <= set(cluster_rows(d)))
        assert cluster_rows(browser)[ids["keep"]]["Node"] == "mx2"

        assert act(browser, ids["keep"], "hold") == "Hold: 1 done."
        assert node_queue(other)[ids["keep"]]["held"]
        assert wait_until(lambda: f"console: admin: hold ids=mx2:{ids['keep']}: 1 done" in gw.log(), 10)
        assert "cluster: queue hold asked by node mx1" in other.log()

        assert act(browser, ids["drop"], "delete", confirm=True) == "Delete (no report): 1 done."
        assert ids["drop"] not in node_queue(other)
        assert wait_until(lambda: f"console: admin: delete ids=mx2:{ids['drop']}: 1 done" in gw.log(), 10)

        smart.set_reply("rcpt", None)                     # the smart host takes mail again
        assert act(browser, ids["again"], "retry") == "Retry now: 1 done."
        assert smart.wait_for(1, 30) and b"Subject: again" in smart.messages[0].data
        assert act(browser, ids["keep"], "release") == "Release: 1 done."
        assert smart.wait_for(2, 30) and b"Subject: keep" in smart.messages[1].data
        assert wait_until(lambda: not node_queue(other), 30), node_queue(other)
        assert f"console: admin: release ids=mx2:{ids['keep']}: 1 done" in gw.log()

        # the same form without the session's token: refused, and nothing reaches mx2
        smart.set_reply("rcpt", "451 4.3.0 try later")
        send("guarded", "guarded@far.test", host=MX2)
        assert wait_until(lambda: len(node_queue(other)) == 1 and next(iter(node_queue(other).values()))["last_error"], 30)
        guarded = next(iter(node_queue(other)))
        cookie = browser.get_cookie("smtpgw_console") or {}
        body = urllib.parse.urlencode({"op": "delete", "node": "mx2", "id": guarded, "back": "/cluster"}).encode()
        req = urllib.request.Request(CONSOLE + "/action", data=body, method="POST",
                                     headers={"Cookie": f"{cookie.get('name')}={cookie.get('value')}"})
        try:
            urllib.request.urlopen(req, timeout=30)
            status = 200
        except urllib.error.HTTPError as e:
            status = e.code
        assert status == 403 and guarded in node_queue(other)
        cli = subprocess.run([*smtpgw_command(), "queue", "list", "--cluster", "-c", str(gw.config_path)],
                             env=gw.env(), capture_output=True, text=True, timeout=60)
        assert guarded in cli.stdout
    finally:
        other.stop()
