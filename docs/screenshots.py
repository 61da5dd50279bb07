"""The README's console screenshots, made again: a real gateway with some mail, the console in headless
Chromium, PNGs of its main pages.

    python docs/screenshots.py [--out docs/images]

Run it from the repository (it uses the test suite's helpers in tests/: the gateway as a real
``twistd`` process, a recording SMTP peer as the smart host, the same Chromium and chromedriver the
console's browser tests drive, Debian's redis-server). It listens on 127.0.0.150 (gateway :2525, console
:8025), 127.0.0.151 (the smart host, :2526), 127.0.0.152 (redis-server, :6391) and 127.0.0.153 (a second
gateway, :2525, for the cluster page), and keeps its files in a temporary folder it removes.

The gateway gets mail delivered locally (the dashboard's charts), mail the smart host defers with 451
(a retrying row, and the message whose "why" trace is shown), mail a closed schedule holds and a
message held by the administrator; a second node of the cluster holds deferred mail of its own. Pages
written: dashboard, queues, message (with its why trace), connectors (1100 pixels wide), cluster (1300).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from browser import chromium  # noqa: E402  (tests/: the suite's helpers)
from gwprocess import GatewayProcess, base_config, port_open, wait_until  # noqa: E402
from peers import SMTPPeer  # noqa: E402
from redisfixture import RedisServer  # noqa: E402
import test_console_browser as console_tests  # noqa: E402

from mta.cli.queue import run_request  # noqa: E402
from mta.config import load_config  # noqa: E402
from mta.smtp.server.users import hash_password, set_user_line, write_atomically  # noqa: E402

HOST, PORT, CONSOLE_PORT = "127.0.0.150", 2525, 8025
SMART_HOST, SMART_PORT = "127.0.0.151", 2526
REDIS_HOST, REDIS_PORT, OTHER_HOST = "127.0.0.152", 6391, "127.0.0.153"
CONSOLE = f"http://{HOST}:{CONSOLE_PORT}"
USER, PASSWORD = "admin", "screenshots only"
WIDTH, HEIGHT = 1100, 760


def other_node(tmp: Path, redis: str) -> dict:
    """The cluster's second node, mx2: deferred mail of its own to show on the cluster page."""
    cfg = base_config(tmp, listen=f"{OTHER_HOST}:{PORT}")
    cfg["gateway"]["hostname"] = "mx2.example.test"
    cfg["gateway"]["queue"]["retry"] = ["1h"]
    cfg["gateway"]["cluster"] = {"redis": redis, "node": "mx2"}
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]:{SMART_PORT}"]
    return cfg


def configuration(tmp: Path) -> dict:
    users = tmp / "console-users"
    write_atomically(str(users), set_user_line("", USER, hash_password(PASSWORD)))
    cfg = base_config(tmp, listen=f"{HOST}:{PORT}")
    cfg["gateway"]["hostname"] = "gw.example.test"
    cfg["gateway"]["queue"]["retry"] = ["1h"]
    cfg["virtual_servers"][0]["relay"]["allow"] = ["127.0.0.0/8"]
    cfg["connectors"][0]["smart_hosts"] = [f"[{SMART_HOST}]:{SMART_PORT}"]
    cfg["connectors"].append({
        "name": "Branch office", "address_spaces": [{"domain": "branch.example", "cost": 5}, "*.branch.example"],
        "smart_hosts": [f"[{SMART_HOST}]:{SMART_PORT}"], "bridgeheads": ["Default SMTP Virtual Server"],
        "delivery": {"schedule": {"mon": ["08:00-18:00"], "wed": ["08:00-18:00"], "sat": ["22:00-24:00"]},
                     "timezone": "Europe/Paris", "oversize": {"threshold": "2MB", "schedule": "never"}}})
    cfg["gateway"]["console"] = {"enabled": True, "listen": f"{HOST}:{CONSOLE_PORT}", "users": str(users)}
    return cfg


def send(subject: str, rcpt: str) -> None:
    console_tests.send(subject, rcpt, host=HOST, port=PORT)


def queue(gw: GatewayProcess, request: dict) -> dict:
    return run_request(load_config(str(gw.config_path)), request)


def shoot(driver, path: Path, height: int = HEIGHT, width: int = WIDTH) -> None:
    driver.set_window_size(width, height)
    driver.save_screenshot(str(path))
    print(f"{path} ({path.stat().st_size // 1024} KB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "images"), help="where the PNGs go")
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory(prefix="smtpgw-screenshots-") as folder:
        tmp = Path(folder)
        peer = SMTPPeer(host=SMART_HOST, port=SMART_PORT).start()
        peer.set_reply("rcpt", lambda rcpt: "451 4.3.0 mailbox busy, try later"
                       if "slow" in rcpt or "hold" in rcpt else None)
        redis = RedisServer(tmp / "redis", REDIS_HOST, REDIS_PORT).start()
        cfg = configuration(tmp)
        cfg["gateway"]["cluster"] = {"redis": redis.url, "node": "mx1"}
        gw = GatewayProcess(tmp, cfg).start()
        (tmp / "mx2").mkdir()
        other = GatewayProcess(tmp / "mx2", other_node(tmp / "mx2", redis.url)).start()
        (tmp / "chromium").mkdir()
        driver = chromium(tmp / "chromium")
        try:
            assert wait_until(lambda: port_open(HOST, CONSOLE_PORT), 20), gw.log()
            for i in range(12):
                send(f"Report {i}", "bob@example.test")
            for i in range(4):
                send(f"Order {i}", f"orders{i}@partner.example")
            for rcpt in ("sales@slow.example", "info@slow.example", "ap@slow.example"):
                send("Invoice", rcpt)
            send("Nightly sync", "files@branch.example")
            send("Quarterly figures", "board@hold.example")
            assert wait_until(lambda: len(peer.messages) >= 4, 30)
            assert wait_until(lambda: sum(1 for e in queue(gw, {"op": "list"})["entries"]
                                          if e["last_error"] or e["why_held"]) >= 5, 30)
            queue(gw, {"op": "hold", "domain": "hold.example"})
            for rcpt in ("desk@slow.example", "office@hold.example"):
                console_tests.send("From mx2", rcpt, host=OTHER_HOST, port=PORT)
            assert wait_until(lambda: sum(1 for e in queue(other, {"op": "list"})["entries"] if e["last_error"]) == 2, 30)

            driver.set_window_size(WIDTH, HEIGHT)
            driver.get(CONSOLE + "/dashboard")
            driver.find_element(By.ID, "user").send_keys(USER)
            field = driver.find_element(By.ID, "password")
            field.send_keys(PASSWORD)
            field.submit()
            WebDriverWait(driver, 20).until(lambda d: d.current_url.endswith("/dashboard"))
            WebDriverWait(driver, 30, 1).until(lambda d: d.refresh() or "12" in d.find_element(By.ID, "main").text)
            shoot(driver, out / "console-dashboard.png", 1000)

            driver.get(CONSOLE + "/queues")
            shoot(driver, out / "console-queues.png", 700)

            slow = next(e["id"] for e in queue(gw, {"op": "list"})["entries"]
                        if e["recipients_pending"] == ["sales@slow.example"])
            driver.get(f"{CONSOLE}/message?id={slow}")
            driver.execute_script("document.getElementById('why').scrollIntoView()")
            shoot(driver, out / "console-message-why.png", 1050)

            driver.get(CONSOLE + "/connectors")
            driver.execute_script("document.getElementById('connector-1').scrollIntoView()")
            shoot(driver, out / "console-connectors.png", 1150)

            driver.get(CONSOLE + "/cluster")
            WebDriverWait(driver, 30, 1).until(
                lambda d: d.refresh() or len(d.find_elements(By.CSS_SELECTOR, "table.cluster-queue tbody tr")) >= 5)
            driver.set_window_size(1300, 900)             # the whole table, its actions column included
            driver.execute_script("document.querySelector('table.cluster-queue').scrollIntoView()")
            shoot(driver, out / "console-cluster.png", 900, 1300)
        finally:
            driver.quit()
            gw.stop()
            other.stop()
            redis.stop()
            peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
