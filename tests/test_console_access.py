"""Every console page without a mouse and on a phone, in headless Chromium against one gateway (in a
cluster of one node, so the Cluster page is there too) holding a deferred message:

* the first Tab reaches a visible "Skip to the content" link, and following it puts the next Tab inside
  the page's content;
* Tab reaches every control of the page, in the order they are on the page, each with a visible focus ring;
* every form field has a label (a screen reader names it), every button a name;
* at a 390 pixel wide viewport the page itself never scrolls sideways (a wide table scrolls in its own
  box, which the keyboard can reach);
* and the whole round trip works from the keyboard alone: log in, hold the message from its row, see it held.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from browser import browser  # noqa: F401  (fixture)
from gwprocess import GatewayProcess, port_open, wait_until
from peers import SMTPPeer
from redisfixture import RedisServer
from test_cli_queue import entries
from test_console_browser import CONSOLE, GW_HOST, PASSWORD, SMART_HOST, USER, console_config, login, send

PHONE_WIDTH = 390


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The gateway, its Redis, its smart host answering 451: the pages (paths) to check."""
    tmp: Path = tmp_path_factory.mktemp("console-access")
    redis = RedisServer(tmp / "redis").start()
    peer = SMTPPeer(host=SMART_HOST).start()
    peer.set_reply("rcpt", "451 4.3.0 try later, the queue's very long reply text goes on and on without "
                           "a break: averyveryverylongwordthatnobrowsercouldbreakatanyspaceanywhereatall")
    cfg = console_config(tmp)
    cfg["gateway"]["cluster"] = {"redis": redis.url, "node": "mx1"}
    gw = GatewayProcess(tmp, cfg)
    try:
        gw.start()
        assert wait_until(lambda: port_open(GW_HOST, 8025), 20), gw.log()
        send("waiting", "bob@a-rather-long-destination-domain-name.example.test")
        assert wait_until(lambda: entries(gw) and entries(gw)[0]["last_error"], 30), gw.log()
        ident = entries(gw)[0]["id"]
        yield gw, ["/dashboard", "/queues", "/messages", f"/message?id={ident}", f"/message?id={ident}&body=1",
                   "/connectors", "/virtual-servers", "/diagnostics", "/cluster"]
    finally:
        gw.stop()
        peer.stop()
        redis.stop()


def press(driver, *keys) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(*keys).perform()


def open_page(driver, path: str) -> None:
    driver.get(CONSOLE + path)
    assert "/login" not in driver.current_url, path
    driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0)")


# what the keyboard should reach, in page order: visible, enabled controls not taken out of the order
FOCUSABLE = """
return Array.from(document.querySelectorAll(
    'a[href], button, input:not([type=hidden]), select, textarea, [tabindex]:not([tabindex="-1"])'))
  .filter(e => !e.disabled && e.getClientRects().length && getComputedStyle(e).visibility !== 'hidden'
               && !e.closest('[hidden]') && !(e.classList.contains('skip')))
  .map(e => e.outerHTML.slice(0, 120));
"""


def test_skip_link_is_first_visible_and_leads_to_the_content(site, browser):
    from selenium.webdriver.common.keys import Keys

    _, pages = site
    login(browser)
    for path in pages:
        open_page(browser, path)
        press(browser, Keys.TAB)
        active = browser.switch_to.active_element
        assert active.text == "Skip to the content", path
        box = browser.execute_script("const r = arguments[0].getBoundingClientRect();"
                                     "return [r.left, r.top, r.width, r.height, innerWidth];", active)
        assert box[0] >= 0 and box[1] >= 0 and box[2] > 20 and box[3] > 10 and box[0] + box[2] <= box[4], (path, box)
        press(browser, Keys.ENTER)                   # the focus moves to the content, past the navigation
        assert browser.switch_to.active_element.get_attribute("id") == "main", path
        press(browser, Keys.TAB)
        inside = browser.execute_script("return !!document.activeElement.closest('main') "
                                        "|| !document.querySelector('main').querySelector('a[href], button, input, select')")
        assert inside, (path, browser.switch_to.active_element.get_attribute("outerHTML")[:200])


def test_tab_reaches_every_control_in_page_order_with_a_visible_focus(site, browser):
    from selenium.webdriver.common.keys import Keys

    _, pages = site
    for path in ["/login"] + pages:                  # the login form first, before logging in
        if path == "/login":                          # its user name field has the focus: Tab goes on from there
            browser.get(CONSOLE + path)
            assert browser.switch_to.active_element.get_attribute("id") == "user"
            expected = browser.execute_script(FOCUSABLE)
            expected = expected[[i for i, e in enumerate(expected) if 'id="user"' in e][0] + 1:]
        else:
            open_page(browser, path)
            expected = browser.execute_script(FOCUSABLE)
            press(browser, Keys.TAB)                 # the skip link first
        assert expected, path
        reached = []
        for _ in range(len(expected)):
            press(browser, Keys.TAB)
            if browser.execute_script("return document.activeElement === document.body"):
                break
            style = browser.execute_script(
                "const e = document.activeElement, s = getComputedStyle(e);"
                "return [e.matches(':focus-visible'), s.outlineStyle, parseFloat(s.outlineWidth), e.outerHTML.slice(0, 120)];")
            assert style[0] and style[1] != "none" and style[2] >= 2, (path, style)
            reached.append(style[3])
        assert reached == expected, path
        if path == "/login":
            login(browser)


LABELS = """
const bad = [];
for (const e of document.querySelectorAll('input:not([type=hidden]), select, textarea')) {
  const named = (e.labels && Array.from(e.labels).some(l => l.textContent.trim()))
      || (e.getAttribute('aria-label') || '').trim() || e.getAttribute('aria-labelledby');
  if (!named) bad.push(e.outerHTML.slice(0, 160));
}
for (const b of document.querySelectorAll('button, a[href]')) {
  if (!(b.textContent.trim() || (b.getAttribute('aria-label') || '').trim())) bad.push(b.outerHTML.slice(0, 160));
}
for (const r of document.querySelectorAll('[tabindex="0"]:not(a):not(button):not(input):not(select)')) {
  if (!(r.getAttribute('aria-label') || r.getAttribute('aria-labelledby') || r.tagName === 'PRE')) bad.push(r.outerHTML.slice(0, 160));
}
return bad;
"""


def test_every_form_field_and_button_has_a_name(site, browser):
    _, pages = site
    browser.get(CONSOLE + "/login")
    assert browser.execute_script(LABELS) == []
    login(browser)
    for path in pages:
        open_page(browser, path)
        assert browser.execute_script(LABELS) == [], path


def test_phone_width_never_scrolls_the_page_sideways(site, browser):
    from selenium.webdriver.common.by import By

    _, pages = site
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": PHONE_WIDTH, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    browser.get(CONSOLE + "/login")
    pages = ["/login"] + pages
    login(browser)
    for path in pages:
        if path == "/login":
            continue
        open_page(browser, path)
        width = browser.execute_script("return [innerWidth, document.documentElement.scrollWidth, "
                                       "document.body.scrollWidth]")
        # nothing lies or spills off the right edge, except inside a box that scrolls on its own
        outside = browser.execute_script("""
            const scrolls = e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
            return Array.from(document.querySelectorAll('body *')).filter(e => {
              const r = e.getBoundingClientRect();
              if (!r.width || r.left < 0 || e.closest('.sr') || e.parentElement.closest('.table-box, pre')) return false;
              return r.right > %d + 1 || (!scrolls(e) && e.scrollWidth > e.clientWidth + 1 && e.clientWidth);
            }).map(e => e.outerHTML.slice(0, 120));""" % PHONE_WIDTH)
        assert width[0] == PHONE_WIDTH and max(width[1:]) <= PHONE_WIDTH, (path, width, outside)
        assert outside == [], (path, outside)
        size = browser.execute_script("return parseFloat(getComputedStyle(document.querySelector('main')).fontSize)")
        assert size >= 14, (path, size)
        assert browser.find_element(By.CSS_SELECTOR, 'meta[name="viewport"]')


def main_text(driver) -> str:
    """The content's text, read in one step (the page may be being replaced)."""
    return driver.execute_script("const m = document.querySelector('main'); return m ? m.innerText : ''")


def test_hold_a_message_with_the_keyboard_alone(site, browser):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    gw, _ = site
    ident = entries(gw)[0]["id"]
    browser.get(CONSOLE + "/queues")                   # the login form: the user name field has the focus
    assert browser.execute_script("return document.activeElement.id") == "user"
    press(browser, USER, Keys.TAB, PASSWORD, Keys.ENTER)
    WebDriverWait(browser, 20).until(lambda d: d.current_url.endswith("/queues"))

    def focus_on(predicate: str, limit: int = 60) -> None:
        for _ in range(limit):
            press(browser, Keys.TAB)
            if browser.execute_script(f"const e = document.activeElement; return {predicate};"):
                return
        raise AssertionError(f"Tab never reached {predicate}")

    focus_on("e.tagName === 'SELECT' && e.name === 'op'")
    for _ in range(2):                                     # Retry now, Requeue, Hold
        press(browser, Keys.ARROW_DOWN)
    assert browser.execute_script("return document.activeElement.value") == "hold"
    press(browser, Keys.TAB, Keys.ENTER)                   # Apply
    WebDriverWait(browser, 20).until(lambda d: "Hold: 1 done." in main_text(d))
    assert wait_until(lambda: entries(gw)[0]["held"], 10)
    assert "console: admin: hold domain=" in gw.log()
    focus_on("e.tagName === 'SELECT' && e.name === 'op'")
    for _ in range(3):                                     # ... Release
        press(browser, Keys.ARROW_DOWN)
    assert browser.execute_script("return document.activeElement.value") == "release"
    press(browser, Keys.TAB, Keys.ENTER)
    WebDriverWait(browser, 20).until(lambda d: "Release: 1 done." in main_text(d))
    assert wait_until(lambda: not entries(gw)[0]["held"], 10)
    assert ident == entries(gw)[0]["id"]
