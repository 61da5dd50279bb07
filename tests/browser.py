"""A real browser for the console's tests: Debian's headless Chromium, driven by Selenium through the
system chromedriver (nothing downloaded). Tests skip with a clear reason where they are missing
(tests/run installs both)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# what this machine's closed network needs: no sandbox as root, no background connections
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--window-size=1280,900")


def chromium(profile: Path):
    """A new headless Chromium with an empty profile in ``profile``."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed (tests/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    os.environ.setdefault("SE_OFFLINE", "true")        # Selenium Manager must not look for downloads
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    return driver


MAIN_PAGES = ("/dashboard", "/queues", "/connectors", "/diagnostics")


def main_pages(driver, folder: Path) -> None:
    """After a failure: a screenshot of each of the console's main pages as they were then
    (``failure-queues.png``...), from the site the browser was on, with its session."""
    from urllib.parse import urlsplit

    site = urlsplit(driver.current_url)
    if site.scheme not in ("http", "https"):
        return
    driver.set_page_load_timeout(10)
    for path in MAIN_PAGES:
        driver.get(f"{site.scheme}://{site.netloc}{path}")
        shot = folder / f"failure-{path.strip('/')}.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot of {path} at failure: {shot}")


@pytest.fixture
def browser(tmp_path, request):
    """A headless Chromium; on a failed test, screenshots of its page and of the console's main pages
    are left in the test's folder."""
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    driver = chromium(profile)
    yield driver
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        shot = tmp_path / "failure.png"
        try:
            driver.save_screenshot(str(shot))
            print(f"screenshot of the page at failure: {shot} ({driver.current_url})")
            main_pages(driver, tmp_path)
        except Exception:
            pass
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)
