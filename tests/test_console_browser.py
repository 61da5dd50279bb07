"""The web console as an administrator uses it: a real headless Chromium, driven by Selenium, against
the gateway running as ``twistd`` with the console on loopback, real SMTP peers, a real Maildir.

Log in; see held mail in its connector's row; release it and see it reach the smart host; requeue a
selection; delete a message with an NDR and see the report arrive; a wrong password refused; an action
without the CSRF token refused 403; the dashboard charting the messages just sent, live; the connectors'
schedule grids, the virtual servers, the diagnostic events; HTTPS; a gateway of two workers.
"""
from __future__ import annotations

import smtplib
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

from browser import browser  # noqa: F401  (fixture)
from gwprocess import GatewayProcess, base_config, maildir_messages, port_open, wait_until
from test_cli_queue import entries, smtpgw_command

GW_HOST, GW_PORT = "127.0.0.120", 2525
SMART_HOST = "127.0.0.121"
CONSOLE = f"http://{GW_HOST}:8025"
USER, PASSWORD = "admin", "correct horse battery staple"


def make_users(tmp_path: Path) -> Path:
    """The users file, written by ``smtpgw passwd`` as an administrator would."""
    users = tmp_path / "console-users"
    r = subprocess.run([*smtpgw_command(), "passwd", "-c", "--stdin", str(users), USER],
                       input=PASSWORD + "\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return users


def console_config(tmp_path: Path) -> dict:
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["gateway"]["queue"]["retry"] = ["1h"]              # deferred mail waits for the administrator
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]"]
    cfg["gateway"]["console"] = {"enabled": True, "listen": f"{GW_HOST}:8025", "users": str(make_users(tmp_path))}
    return cfg


def send(subject: str, rcpt: str, sender: str = "alice@example.test", host: str = GW_HOST, port: int = GW_PORT) -> None:
    msg = (f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
           f"Message-ID: <{uuid.uuid4().hex}@example.test>\r\n\r\nHello from {subject}.\r\n")
    with smtplib.SMTP(host, port, timeout=30) as s:
        s.sendmail(sender, [rcpt], msg)


def start(gateway, tmp_path: Path) -> GatewayProcess:
    gw = gateway(console_config(tmp_path))
    assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
    return gw


def login(driver, user: str = USER, password: str = PASSWORD, page: str = "/queues") -> None:
    """Open ``page``, which sends the browser to the login form first, and log in there."""
    from selenium.webdriver.common.by import By

    driver.get(CONSOLE + page)
    assert "/login" in driver.current_url
    driver.find_element(By.ID, "user").send_keys(user)
    field = driver.find_element(By.ID, "password")
    field.send_keys(password)
    field.submit()
    from selenium.webdriver.support.ui import WebDriverWait     # the next page: the console, or the refusal
    WebDriverWait(driver, 20).until(
        lambda d: "/login" not in d.current_url or d.find_elements(By.CSS_SELECTOR, "[role=alert]"))


def notice(driver) -> str:
    """The result line the page shows after an action (waiting for the page that has it; one read
    while the page is being replaced is read again)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_element(By.CSS_SELECTOR, ".notice").text)


def row_of(driver, domain: str):
    """The Queues table's row for ``domain``, or None. A page that is being replaced while it is read
    (a refresh, a poll) is read again, so the answer is about one whole page."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.common.by import By

    def read():
        for row in driver.find_elements(By.CSS_SELECTOR, "table.queues tbody tr"):
            if row.find_element(By.CSS_SELECTOR, 'td[data-label="Destination"]').text == domain:
                return row
        return None

    for _ in range(20):
        try:
            return read()
        except (StaleElementReferenceException, WebDriverException):
            continue
    return read()


def act_on_row(driver, domain: str, action: str) -> None:
    """Choose ``action`` (the option's value) in the row's menu, apply it, and wait for the next page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from selenium.common.exceptions import WebDriverException

    for attempt in range(5):            # a row read while the page was being replaced is read again
        row = row_of(driver, domain)
        old = driver.find_element(By.TAG_NAME, "html")
        try:
            Select(row.find_element(By.CSS_SELECTOR, "select[name=op]")).select_by_value(action)
            row.find_element(By.CSS_SELECTOR, "button[type=submit]").send_keys("\n")     # Enter, as from the keyboard
            break
        except WebDriverException:
            if attempt == 4:
                raise

    def replaced(_driver) -> bool:
        """The old page is gone: its element is stale, or (while Chromium swaps the page's context)
        chromedriver answers "unhandled inspector error", which selenium's staleness_of lets through."""
        try:
            old.is_enabled()
        except WebDriverException:
            return True
        return False

    WebDriverWait(driver, 20).until(replaced)


def test_login_hold_release_delete_with_ndr(gateway, peers, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import Select, WebDriverWait

    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    gw = start(gateway, tmp_path)
    send("keep me", "bob@held.test")
    send("bounce me", "carol@ndr.test")
    assert wait_until(lambda: sum(1 for e in entries(gw) if e["last_error"]) == 2, 30), entries(gw)

    login(browser)
    assert browser.current_url.endswith("/queues"), browser.current_url
    assert "admin" in browser.find_element(By.CSS_SELECTOR, "header .user").text
    row = row_of(browser, "held.test")
    cells = {c.get_attribute("data-label"): c.text for c in row.find_elements(By.TAG_NAME, "td")}
    assert cells["Connector"] == "Internet SMTP connector" and cells["Messages"] == "1"
    assert cells["State"].startswith("retrying") and "451 4.3.0 try later" in cells["State"]

    act_on_row(browser, "held.test", "hold")                 # the whole destination, from its row
    assert "Hold: 1 done." in notice(browser)
    held = row_of(browser, "held.test").find_element(By.CSS_SELECTOR, 'td[data-label="State"]').text
    assert held.startswith("held") and "held by the administrator" in held
    assert "console: admin: hold domain=held.test: 1 done" in gw.log()
    browser.save_screenshot(str(tmp_path / "queues.png"))

    peer.set_reply("rcpt", None)                            # the smart host takes mail again
    act_on_row(browser, "held.test", "release")
    assert "Release: 1 done." in notice(browser)
    assert peer.wait_for(1, 20)
    assert b"Subject: keep me" in peer.messages[0].data
    assert wait_until(lambda: (browser.refresh(), row_of(browser, "held.test") is None)[1], 20, 0.3)
    assert row_of(browser, "ndr.test") is not None

    # one message, from its own page: delete it and send the sender an NDR
    peer.set_reply("rcpt", "451 4.3.0 try later")
    browser.find_element(By.LINK_TEXT, "ndr.test").click()
    WebDriverWait(browser, 20).until(lambda d: "/messages?" in d.current_url)
    # a selection: tick the message, requeue it (its retry schedule starts over; the peer still says 451)
    browser.find_element(By.CSS_SELECTOR, 'table.messages input[name="id"]').send_keys(" ")
    Select(browser.find_element(By.ID, "sel-op")).select_by_value("requeue")
    old = browser.find_element(By.TAG_NAME, "html")
    browser.find_element(By.CSS_SELECTOR, "#selection button").click()
    WebDriverWait(browser, 20).until(expected_conditions.staleness_of(old))
    assert "Requeue (the retry schedule starts over): 1 done." in notice(browser)
    assert wait_until(lambda: "console: admin: requeue ids=" in gw.log(), 10)
    browser.find_element(By.CSS_SELECTOR, "table.messages tbody a").click()
    WebDriverWait(browser, 20).until(lambda d: "/message?" in d.current_url)
    assert "Subject" in browser.find_element(By.CSS_SELECTOR, "table.headers").text
    assert "carol@ndr.test" in browser.find_element(By.CSS_SELECTOR, "table.recipients").text
    browser.find_element(By.LINK_TEXT, "Show the whole message").click()
    WebDriverWait(browser, 20).until(lambda d: "body=1" in d.current_url)
    assert "Hello from bounce me." in browser.find_element(By.CSS_SELECTOR, "pre.raw").text
    Select(browser.find_element(By.ID, "msg-op")).select_by_value("delete_ndr")
    browser.find_element(By.CSS_SELECTOR, "form.act button").click()
    browser.switch_to.alert.accept()                          # "this cannot be undone"
    assert "1 NDR queued to the sender" in notice(browser)
    assert browser.current_url.endswith("/queues") and row_of(browser, "ndr.test") is None
    assert wait_until(lambda: maildir_messages(tmp_path / "mail", "alice"), 20)
    report = maildir_messages(tmp_path / "mail", "alice")[0]
    assert b"deleted from the queue by the administrator" in report and b"Subject: bounce me" in report
    assert len(peer.messages) == 1


def test_wrong_password_and_missing_csrf_token_refused(gateway, browser, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw = start(gateway, tmp_path)
    login(browser, password="not the password")
    assert "/login" in browser.current_url
    assert "Wrong user name or password." in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
    assert wait_until(lambda: "console: login refused for 'admin'" in gw.log(), 10)
    browser.get(CONSOLE + "/queues")                           # still not in
    assert "/login" in browser.current_url

    login(browser)
    assert browser.current_url.endswith("/queues")
    cookie = browser.get_cookie("smtpgw_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # the logout form without its token (a forged form would have none): refused, still logged in
    browser.execute_script('document.querySelector(".logout input[name=csrf]").remove()')
    browser.find_element(By.CSS_SELECTOR, ".logout button").click()
    # the old page's h1 may be found and then replaced before it is read (a stale element): read again
    assert WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_element(By.TAG_NAME, "h1").text == "Forbidden")
    # an action posted with the session's cookie but no token: 403, and nothing done
    data = urllib.parse.urlencode({"op": "delete", "domain": "remote.test", "back": "/queues"}).encode()
    req = urllib.request.Request(CONSOLE + "/action", data=data,
                                 headers={"Cookie": f"smtpgw_console={cookie['value']}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 403
    assert "refused POST /action" in gw.log() and "console: admin: delete" not in gw.log()
    browser.get(CONSOLE + "/queues")
    assert browser.current_url.endswith("/queues")


def figure(driver, label: str) -> str:
    """A dashboard figure, read in one script run: the page redraws its cards every 10 s, and cards
    found one call and read the next could be replaced in between (a stale element, seen under load)."""
    return driver.execute_script("""
        for (const card of document.querySelectorAll('.figure')) {
            const name = card.querySelector('.label'), value = card.querySelector('.value');
            if (name && value && name.innerText.trim() === arguments[0]) return value.innerText.trim();
        }
        return '';""", label)


def test_dashboard_charts_the_messages_just_sent_live(gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By

    gw = start(gateway, tmp_path)
    send("one", "bob@example.test")
    send("two", "bob@example.test")
    assert wait_until(lambda: len(maildir_messages(tmp_path / "mail", "bob")) == 2, 30)
    login(browser, page="/")                                 # the dashboard is the home page
    assert browser.current_url.endswith("/dashboard"), browser.current_url
    # the delivery is counted once its outcome is recorded, a moment after the Maildir file appears
    assert wait_until(lambda: (figure(browser, "received in the period"), figure(browser, "delivered in the period"))
                      == ("2", "2") or browser.refresh(), 20, 0.5)
    # read in one script run each: the charts are redrawn every 10 s (a node found, then replaced)
    role, desc, marks = browser.execute_script("""
        const chart = document.querySelector('#chart-messages');
        return [chart.getAttribute('role'), chart.querySelector('desc').textContent,
                chart.querySelectorAll('polyline, circle').length];""")
    assert role == "img" and "received: 2" in desc and marks, (role, desc, marks)
    assert "Default SMTP Virtual Server" in browser.execute_script(
        "return document.querySelector('#chart-connections + .legend').innerText")
    browser.save_screenshot(str(tmp_path / "dashboard.png"))

    browser.execute_script("window.notReloaded = true")
    send("three", "bob@example.test")                        # the page polls /dashboard.json and redraws
    assert wait_until(lambda: figure(browser, "received in the period") == "3", 60, 0.5)
    assert browser.execute_script("return window.notReloaded") is True


def test_connectors_virtual_servers_and_diagnostics(gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    cfg = console_config(tmp_path)
    cfg["connectors"].append({
        "name": "Branch office", "address_spaces": [{"domain": "branch.test", "cost": 5}, "*.branch.test"],
        "smart_hosts": ["[192.0.2.25]"], "bridgeheads": ["Default SMTP Virtual Server"],
        "delivery": {"schedule": {"mon": ["08:00-18:00"], "sat": ["22:00-24:00"]}, "timezone": "Europe/Paris",
                     "oversize": {"threshold": "2MB", "schedule": "never"}}})
    gw = gateway(cfg)
    assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
    send("to the branch", "dave@branch.test")
    login(browser, page="/connectors")
    branch = browser.find_element(By.ID, "connector-1")
    text = branch.text
    assert "Branch office" in text and "*.branch.test" in text and "[192.0.2.25]" in text
    assert "weekly grid, 12 hours a week (Europe/Paris)" in text
    assert "messages over 2MB: never: closed; never opens" in text
    grid = branch.find_element(By.CSS_SELECTOR, "svg.grid7")
    desc = grid.find_element(By.TAG_NAME, "desc").get_attribute("textContent")
    assert desc.startswith("Mon: 08:00-18:00; Tue: closed") and "Sat: 22:00-24:00" in desc
    assert len(grid.find_elements(By.CSS_SELECTOR, "rect")) == 7 * 96
    assert len(grid.find_elements(By.CSS_SELECTOR, "rect.on")) == 48
    assert "always (UTC): open now" in browser.find_element(By.ID, "connector-0").text
    browser.save_screenshot(str(tmp_path / "connectors.png"))

    browser.find_element(By.LINK_TEXT, "Virtual servers").click()
    WebDriverWait(browser, 20).until(lambda d: d.current_url.endswith("/virtual-servers"))
    assert f"{GW_HOST}:{GW_PORT}" in browser.find_element(By.ID, "vs-0").text

    browser.find_element(By.LINK_TEXT, "Diagnostics").click()
    WebDriverWait(browser, 20).until(lambda d: d.current_url.endswith("/diagnostics"))
    Select(browser.find_element(By.ID, "category")).select_by_value("queuing_engine")
    browser.find_element(By.CSS_SELECTOR, "form.act button").click()
    WebDriverWait(browser, 20).until(lambda d: "category=queuing_engine" in d.current_url)
    # read in one script run: the page replaces its table every 5 s (rows found, then replaced)
    categories, table = browser.execute_script("""
        const table = document.querySelector('table.events');
        return [Array.from(table.querySelectorAll('tbody tr'),
                           r => r.querySelector('td[data-label="Category"]').innerText.trim()),
                table.innerText];""")
    assert categories and set(categories) == {"queuing_engine"}, categories
    assert "sender=alice@example.test" in table


def test_console_over_tls_sets_a_secure_cookie(gateway, tmp_path):
    """With a certificate and key the console speaks HTTPS only, and its cookie is Secure."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(GW_HOST)
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "console.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "console.key"))
    cfg = console_config(tmp_path)
    cfg["gateway"]["console"]["tls"] = {"certificate": str(tmp_path / "console.crt"),
                                        "key": str(tmp_path / "console.key")}
    gw = gateway(cfg)
    assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with urllib.request.urlopen(f"https://{GW_HOST}:8025/login", context=context, timeout=10) as page:
        assert page.status == 200 and b'name="csrf"' in page.read()
        cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" in cookie
    assert f"console listening on https://{GW_HOST}:8025/" in gw.log()
    with pytest.raises(Exception):               # no plain HTTP on the TLS port
        urllib.request.urlopen(f"http://{GW_HOST}:8025/login", timeout=10).read()


def test_check_config_names_a_missing_users_file(tmp_path):
    cfg = console_config(tmp_path)
    cfg["gateway"]["console"]["users"] = str(tmp_path / "nobody")
    gw = GatewayProcess(tmp_path, cfg)
    gw.write_config()
    r = subprocess.run([*smtpgw_command(), "check-config", "-c", str(gw.config_path)], env=gw.env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "gateway.console.users:" in (r.stdout + r.stderr), (r.stdout, r.stderr)


class Admin:
    """The console scripted over HTTP (cookies kept), for what needs no browser."""

    def __init__(self) -> None:
        import http.cookiejar

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))

    def get(self, path: str) -> str:
        with self.opener.open(CONSOLE + path, timeout=30) as page:
            return page.read().decode("utf-8")

    def post(self, path: str, fields: dict) -> str:
        import re

        token = re.search(r'name="csrf" value="([^"]+)"', self.get("/login" if path == "/login" else "/queues")).group(1)
        data = urllib.parse.urlencode({**fields, "csrf": token}, doseq=True).encode()
        with self.opener.open(CONSOLE + path, data=data, timeout=30) as page:
            return page.read().decode("utf-8")


def test_two_workers_one_console(gateway, peers, tmp_path):
    """With two workers the console (in worker 0) shows and acts on both workers' messages."""
    from mta.workers.identity import owner_of

    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    cfg = console_config(tmp_path)
    cfg["gateway"]["workers"] = 2
    gw = gateway(cfg)
    assert wait_until(lambda: port_open(GW_HOST, 8025), 30), gw.log()
    for i in range(6):
        send(f"message {i}", f"user{i}@remote.test")

    def deferred() -> list[dict]:
        from mta.cli.queue import run_request
        from mta.config import load_config

        reply = run_request(load_config(str(gw.config_path)), {"op": "list"})   # every worker answering
        return [e for e in reply.get("entries", []) if e["last_error"]] if reply["ok"] else []

    assert wait_until(lambda: len(deferred()) == 6, 30), gw.log()
    ids = [e["id"] for e in deferred()]
    admin = Admin()
    assert "Wrong user name" not in admin.post("/login", {"user": USER, "password": PASSWORD, "next": "/queues"})
    queues = admin.get("/queues")
    assert "6 messages queued for 1 destination" in queues and ">remote.test<" in queues
    other = next((i for i in ids if owner_of(i, 2) == 1), None)
    if other is not None:                       # a message of worker 1: its page and its body, asked there
        page = admin.get(f"/message?id={other}&body=1")
        assert "Hello from message" in page and "451 4.3.0 try later" in page
    peer.set_reply("rcpt", None)
    done = admin.post("/action", {"op": "retry", "domain": "remote.test", "back": "/queues"})
    assert "Retry now: 6 done." in done
    assert peer.wait_for(6, 30)


def test_why_trace_of_a_deferred_and_a_scheduled_message(gateway, peers, browser, tmp_path):
    """The message page's "why": the connector and address space that matched, with its cost, the hop
    tried and the reply it gave, a schedule hold with its time; ``smtpgw queue show`` prints the same."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 try later")
    cfg = console_config(tmp_path)
    cfg["connectors"].append({"name": "Night link", "address_spaces": [{"domain": "*.night.test", "cost": 3}],
                              "smart_hosts": [f"[{SMART_HOST}]"], "delivery": {"schedule": "never"}})
    gw = gateway(cfg)
    assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
    send("deferred", "bob@slow.test")
    send("waiting", "eve@branch.night.test")
    assert wait_until(lambda: sum(1 for e in entries(gw) if e["last_error"] or e["why_held"]) == 2, 30), entries(gw)
    slow = next(e["id"] for e in entries(gw) if e["recipients_pending"] == ["bob@slow.test"])
    night = next(e["id"] for e in entries(gw) if e["recipients_pending"] == ["eve@branch.night.test"])

    login(browser, page=f"/message?id={slow}")
    why = browser.find_element(By.ID, "why")
    routing = why.find_element(By.CSS_SELECTOR, "table.routing").text
    assert "Internet SMTP connector" in routing and "the default address space * matches any domain, cost 1" in routing
    assert f"smart hosts [{SMART_HOST}]" in routing and "open now" in routing
    replies = why.find_element(By.CSS_SELECTOR, "table.attempts").text
    assert "bob@slow.test" in replies and "451 4.3.0 try later" in replies and "deferred" in replies
    steps = why.find_element(By.CSS_SELECTOR, "table.steps").text
    assert f"slow.test: via Internet SMTP connector: hops [{SMART_HOST}]:25" in steps
    assert "status=deferred" in steps                          # the mail log's own line

    browser.get(CONSOLE + "/diagnostics")                     # asked from Diagnostics by its queue id
    browser.find_element(By.ID, "why-id").send_keys(night + "\n")
    WebDriverWait(browser, 20).until(lambda d: f"/message?id={night}" in d.current_url)
    why = browser.find_element(By.ID, "why")
    assert "*.night.test covers branch.night.test, cost 3" in why.find_element(By.CSS_SELECTOR, "table.routing").text
    holds = why.find_element(By.CSS_SELECTOR, "table.holds").text
    assert "schedule" in holds and "connector 'Night link' schedule is never open" in holds
    browser.save_screenshot(str(tmp_path / "why.png"))

    shown = subprocess.run([*smtpgw_command(), "queue", "show", "-c", str(gw.config_path), slow], env=gw.env(),
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "the default address space * matches any domain, cost 1" in shown.stdout
    assert "451 4.3.0 try later" in shown.stdout and f"hops [{SMART_HOST}]:25" in shown.stdout


def test_why_trace_of_a_deferred_message_survives_a_restart(gateway, peers, browser, tmp_path):
    """A message deferred by a sink answering 451: after the gateway restarts, the message page and
    ``smtpgw queue show`` still show that reply among its steps (and so does the stopped gateway's
    spool); deleting the message removes its trace file."""
    from selenium.webdriver.common.by import By

    peer = peers(SMART_HOST)
    peer.set_reply("rcpt", "451 4.3.0 sink says try later")
    gw = start(gateway, tmp_path)
    send("deferred before a restart", "bob@slow.test")
    assert wait_until(lambda: entries(gw) and entries(gw)[0]["last_error"], 30), gw.log()
    ident = entries(gw)[0]["id"]
    gw.stop()

    def show() -> str:
        shown = subprocess.run([*smtpgw_command(), "queue", "show", "-c", str(gw.config_path), ident],
                               env=gw.env(), capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        return shown.stdout.split("steps", 1)[1]

    stopped = show()                                        # the stopped gateway's spool
    assert "451 4.3.0 sink says try later" in stopped and "status=deferred" in stopped

    gw.start()
    assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
    steps = show()
    assert "451 4.3.0 sink says try later" in steps and f"hops [{SMART_HOST}]:25" in steps
    login(browser, page=f"/message?id={ident}")
    why = browser.find_element(By.ID, "why")
    replies = why.find_element(By.CSS_SELECTOR, "table.attempts").text
    assert "bob@slow.test" in replies and "451 4.3.0 sink says try later" in replies
    assert "status=deferred" in why.find_element(By.CSS_SELECTOR, "table.steps").text

    trace = tmp_path / "spool" / "trace" / ident
    assert trace.exists()
    deleted = subprocess.run([*smtpgw_command(), "queue", "delete", "-c", str(gw.config_path), ident],
                             env=gw.env(), capture_output=True, text=True, timeout=60)
    assert deleted.returncode == 0, deleted.stderr
    assert wait_until(lambda: not trace.exists(), 10)


def login_from(source: str, password: str) -> tuple[int, dict]:
    """A login posted from ``source`` (a loopback address of its own): the status and headers."""
    import http.client
    import re

    conn = http.client.HTTPConnection(GW_HOST, 8025, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", "/login")
        form = conn.getresponse()
        cookie = form.getheader("Set-Cookie").split(";")[0]
        token = re.search(r'name="csrf" value="([^"]+)"', form.read().decode()).group(1)
        body = urllib.parse.urlencode({"user": USER, "password": password, "csrf": token, "next": "/queues"})
        conn.request("POST", "/login", body=body, headers={"Cookie": cookie,
                                                           "Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        answer.read()
        return answer.status, dict(answer.getheaders())
    finally:
        conn.close()


def test_wrong_passwords_slow_down_that_address_only(gateway, browser, tmp_path):
    """Five wrong passwords in five minutes from one address: its next login is refused 429 with
    Retry-After, even with the right password; the administrator at another address logs in."""
    import re

    from selenium.webdriver.common.by import By

    gw = start(gateway, tmp_path)
    for _ in range(5):
        login(browser, password="guess")
        assert "Wrong user name or password." in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
    login(browser)                                           # the right one, too late
    assert "/login" in browser.current_url
    assert "Too many wrong passwords from your address" in browser.find_element(By.CSS_SELECTOR, "[role=alert]").text
    assert wait_until(lambda: "too many wrong passwords" in gw.log(), 10)
    guesser = re.search(r"console: (\S+) may not log in for 300s: 5 wrong passwords in 300s", gw.log()).group(1)
    status, headers = login_from(guesser, PASSWORD)
    assert status == 429 and 1 <= int(headers["Retry-After"]) <= 300
    admin = "127.0.0.123" if guesser != "127.0.0.123" else "127.0.0.124"
    status, headers = login_from(admin, PASSWORD)           # elsewhere: not locked out
    assert status == 303 and headers["Location"] == "/queues"
    assert f"console: admin logged in from {admin}" in gw.log()


def test_cluster_page_lists_the_nodes_and_their_queues_live(gateway, browser, redis_server, tmp_path):
    """With gateway.cluster.redis set, Cluster lists every node as `smtpgw cluster status` does (this
    node marked, heartbeat, queue, leases) and every node's queued messages as `smtpgw queue list
    --cluster` does; a node being drained shows draining, and one that stops shows gone, without a reload."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    cfg = console_config(tmp_path)
    cfg["gateway"]["cluster"] = {"redis": redis_server.url, "node": "mx1"}
    gw = gateway(cfg)
    other_cfg = base_config(tmp_path / "mx2", listen="127.0.0.125:2525")
    other_cfg["gateway"]["cluster"] = {"redis": redis_server.url, "node": "mx2"}
    other_cfg["gateway"]["queue"]["retry"] = ["1h"]
    other_cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    other_cfg["connectors"][0]["smart_hosts"] = ["[127.0.0.126]"]        # nobody there: deferred
    (tmp_path / "mx2").mkdir()
    other = GatewayProcess(tmp_path / "mx2", other_cfg).start()
    try:
        assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
        assert wait_until(lambda: redis_server.cli("SCARD", "smtpgw:nodes") == "2", 20)
        send("waiting at mx2", "dave@far.test", host="127.0.0.125")
        assert wait_until(lambda: entries(other) and entries(other)[0]["last_error"], 30), other.log()
        held_id = entries(other)[0]["id"]
        login(browser, page="/cluster")
        assert browser.current_url.endswith("/cluster")
        assert browser.find_element(By.CSS_SELECTOR, 'nav a[aria-current="page"]').text == "Cluster"

        def rows(kind: str = "nodes", key: str = "Node") -> dict[str, dict[str, str]]:
            out = {}
            for tr in browser.find_elements(By.CSS_SELECTOR, f"table.{kind} tbody tr"):
                cells = {c.get_attribute("data-label"): c.text for c in tr.find_elements(By.TAG_NAME, "td")}
                out[cells[key].split()[0]] = cells
            return out

        got = rows()
        assert set(got) == {"mx1", "mx2"} and got["mx1"]["Node"] == "mx1 (this node)"
        assert got["mx1"]["State"] == "up" and got["mx1"]["Connection leases"] == "0"
        assert got["mx2"]["Last heartbeat"].endswith("ago")
        WebDriverWait(browser, 30, ignored_exceptions=(Exception,)).until(
            lambda d: held_id in rows("cluster-queue", "Queue ID"))
        queued = rows("cluster-queue", "Queue ID")[held_id]
        assert queued["Node"] == "mx2" and queued["Pending recipients"] == "dave@far.test"
        assert queued["State"] == "deferred" and queued["Last error or hold"]

        browser.execute_script("window.notReloaded = true")
        drain = subprocess.run([*smtpgw_command(), "cluster", "-c", str(other.config_path), "drain"],
                               env=other.env(), capture_output=True, text=True, timeout=60)
        assert drain.returncode == 0, drain.stdout + drain.stderr
        WebDriverWait(browser, 30, ignored_exceptions=(Exception,)).until(
            lambda d: rows().get("mx2", {}).get("State") == "draining")
        other.stop()
        redis_server.cli("DEL", "smtpgw:node:mx2")               # as when its entry expires: gone
        WebDriverWait(browser, 30, ignored_exceptions=(Exception,)).until(
            lambda d: rows().get("mx2", {}).get("State") == "gone")
        assert "stale" in rows("cluster-queue", "Queue ID")[held_id]["Node"]
        assert browser.execute_script("return window.notReloaded") is True
    finally:
        other.stop()


def test_sighup_applies_the_console_users_file_and_certificate(gateway, tmp_path):
    """SIGHUP: a new users file and new certificate files apply (`SIGHUP: applied: gateway.console.users`,
    the next login checks the new file, the next connection gets the new certificate); a new listen
    address is named as needing a restart and the console stays where it was; a users file that does not
    load refuses the reload, naming the key."""
    import http.client
    import re
    import ssl

    import trustme

    from test_reload_keys import reload_lines, sighup
    from test_tls_e2e import write_cert

    ca = trustme.CA()
    cert, key, first = write_cert(ca, tmp_path / "tls1", GW_HOST)
    cfg = console_config(tmp_path)
    cfg["gateway"]["console"]["tls"] = {"certificate": str(cert), "key": str(key)}
    gw = gateway(cfg)
    assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def served() -> bytes:
        import socket

        with socket.create_connection((GW_HOST, 8025), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=GW_HOST) as tls:
                return tls.getpeercert(binary_form=True)

    def login_status(user: str, password: str) -> int:
        conn = http.client.HTTPSConnection(GW_HOST, 8025, context=context, timeout=30)
        try:
            conn.request("GET", "/login")
            form = conn.getresponse()
            cookie = form.getheader("Set-Cookie").split(";")[0]
            token = re.search(r'name="csrf" value="([^"]+)"', form.read().decode()).group(1)
            conn.request("POST", "/login", urllib.parse.urlencode({"user": user, "password": password, "csrf": token}),
                         {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
            answer = conn.getresponse()
            answer.read()
            return answer.status
        finally:
            conn.close()

    assert served() == first and login_status(USER, PASSWORD) == 303
    users = tmp_path / "operators"
    r = subprocess.run([*smtpgw_command(), "passwd", "-c", "--stdin", str(users), "operator"],
                       input="another passphrase\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    new_cert, new_key, second = write_cert(ca, tmp_path / "tls2", GW_HOST)
    cfg["gateway"]["console"].update(users=str(users), listen=f"{GW_HOST}:8026",
                                     tls={"certificate": str(new_cert), "key": str(new_key)})
    sighup(gw, cfg)
    assert {"gateway.console.users", "gateway.console.tls.certificate", "gateway.console.tls.key"} \
        <= set(reload_lines(gw, "applied"))
    assert reload_lines(gw, "needs a restart") == ["gateway.console.listen"]
    assert wait_until(lambda: served() == second, 10), gw.log()
    assert login_status("operator", "another passphrase") == 303 and login_status(USER, PASSWORD) == 401
    assert not port_open(GW_HOST, 8026)

    cfg["gateway"]["console"]["users"] = str(tmp_path / "missing")
    gw.config = cfg
    gw.write_config()
    gw.proc.send_signal(__import__("signal").SIGHUP)
    assert wait_until(lambda: "the running configuration is kept" in gw.log(), 10), gw.log()
    assert re.search(r"SIGHUP: .*: gateway\.console\.users: .*missing", gw.log())
    assert login_status("operator", "another passphrase") == 303
