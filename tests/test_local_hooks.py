"""Local hook files (``plugins.local``) as a site meets them: a misspelt hook name stops the gateway
with one line naming the function and the file, and a hook's own ``settings`` reach it."""
from __future__ import annotations

import re
import smtplib
import subprocess

import pytest

from gwprocess import GatewayProcess, base_config, port_open, wait_until
from test_cli_queue import smtpgw_command

GW_HOST, GW_PORT = "127.0.0.191", 2525

MISSPELT = '''\
from mta.plugin.hookspecs import hookimpl


{marker}
def smtpgw_rcpt(session, recipient):
    return None
'''

POLICY = '''\
from mta.plugin.hookspecs import hookimpl
from mta.smtp.address import domain_of
from mta.smtp.reply import Reply

blocked = set()
refusal = "Refused by local policy"
services = None


@hookimpl
def smtpgw_configure(services, settings):
    globals()["services"] = services
    blocked.update(settings.get("blocked_domains", []))
    globals()["refusal"] = settings.get("refusal", refusal)


@hookimpl
def smtpgw_rcpt_to(session, recipient):
    if domain_of(recipient) not in blocked:
        return None
    services.hooks.event("smtp_protocol", "minimum", "local policy refused a recipient",
                         session=session.id, recipient=recipient)
    return Reply(550, "5.7.1", refusal)
'''


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "plugins.local[0]" in line]


@pytest.mark.parametrize("marker", ["@hookimpl", "# no @hookimpl marker: the smtpgw_ prefix is enough"])
def test_a_misspelt_hook_name_is_a_check_config_error(tmp_path, marker):
    hooks = tmp_path / "site_hooks.py"
    hooks.write_text(MISSPELT.format(marker=marker))
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["plugins"]["local"] = [str(hooks)]
    gw = GatewayProcess(tmp_path, cfg)
    gw.write_config()
    checked = subprocess.run([*smtpgw_command(), "check-config", "-c", str(gw.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 2
    lines = error_lines(checked.stderr)
    assert len(lines) == 1, checked.stderr
    assert re.search(rf"smtpgw_rcpt\(\) at {re.escape(str(hooks))}:\d+ is not an smtpgw hook "
                     r"\(did you mean smtpgw_rcpt_to\?\)$", lines[0]), lines[0]


def test_a_misspelt_hook_name_stops_twistd_with_one_line(tmp_path):
    hooks = tmp_path / "site_hooks.py"
    hooks.write_text(MISSPELT.format(marker="@hookimpl"))
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["plugins"]["local"] = [{"path": str(hooks), "settings": {"any": "thing"}}]
    gw = GatewayProcess(tmp_path, cfg)
    gw.start(wait=False)
    try:
        assert gw.proc.wait(60) != 0
        out = gw.output()
        lines = error_lines(out)
        assert len(lines) == 1, out
        assert re.search(rf"smtpgw_rcpt\(\) at {re.escape(str(hooks))}:\d+ is not an smtpgw hook "
                     r"\(did you mean smtpgw_rcpt_to\?\)$", lines[0]), lines[0]
        assert "Traceback" not in out
        assert not port_open(GW_HOST, GW_PORT)
    finally:
        gw.stop()


def test_local_hook_settings_reach_the_hook_and_it_logs_through_diag_logging(gateway, tmp_path):
    policy = tmp_path / "local_policy.py"
    policy.write_text(POLICY)
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    cfg["plugins"]["local"] = [{"path": str(policy),
                                "settings": {"blocked_domains": ["blocked.test"],
                                             "refusal": "No mail for blocked.test from here"}}]
    cfg["gateway"]["local_domains"]["blocked.test"] = {"maildir": str(tmp_path / "blocked")}
    gw = gateway(cfg)
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=10) as s:
        s.ehlo("client.test")
        assert s.mail("a@sender.test")[0] == 250
        assert s.rcpt("bob@Blocked.TEST") == (550, b"5.7.1 No mail for blocked.test from here")
        assert s.rcpt("bob@example.test")[0] == 250             # the core still decides the rest
    assert wait_until(lambda: "local policy refused a recipient" in gw.log())
    assert "bob@Blocked.TEST" in gw.log()                       # the address as the client wrote it
