"""The README's examples work as printed: its connector snippet passes ``smtpgw check-config`` and its
local hook refuses what it says it refuses, on a real gateway."""
from __future__ import annotations

import re
import smtplib
import subprocess
from pathlib import Path

import pytest
import yaml

from gwprocess import GatewayProcess, base_config
from test_cli_queue import smtpgw_command

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
GW_HOST, GW_PORT = "127.0.0.193", 2525


def snippet(language: str, starts: str) -> str:
    """The first fenced block of ``language`` whose text starts with ``starts``."""
    for block in re.findall(rf"```{language}\n(.*?)```", README, re.S):
        if block.startswith(starts):
            return block
    raise AssertionError(f"README has no {language} block starting with {starts!r}")


def test_the_readme_connector_example_is_a_valid_configuration(tmp_path):
    cfg = base_config(tmp_path)
    cfg["connectors"] = yaml.safe_load(snippet("yaml", "connectors:"))["connectors"]
    gw = GatewayProcess(tmp_path, cfg)
    gw.write_config()
    checked = subprocess.run([*smtpgw_command(), "check-config", "-c", str(gw.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "internet" in checked.stdout


@pytest.fixture
def readme_hook_gateway(tmp_path, gateway):
    hook = tmp_path / "local_policy.py"
    hook.write_text(snippet("python", "# /etc/smtpgw/local_policy.py"))
    cfg = base_config(tmp_path, listen=f"{GW_HOST}:{GW_PORT}")
    local = yaml.safe_load(snippet("yaml", "plugins:\n  local:"))["plugins"]["local"]
    assert [entry["path"] for entry in local] == ["/etc/smtpgw/local_policy.py"]
    cfg["plugins"]["local"] = [{"path": str(hook), "settings": local[0]["settings"]}]
    return gateway(cfg)


def test_the_readme_local_hook_refuses_all_staff_to_anonymous_clients(readme_hook_gateway):
    with smtplib.SMTP(GW_HOST, GW_PORT, timeout=30) as client:
        client.ehlo("client.example")
        client.mail("someone@example.test")
        code, text = client.rcpt("all-staff@example.test")
        assert (code, text) == (550, b"5.7.1 Only signed-in users may write to all-staff")
        assert client.rcpt("bob@example.test")[0] == 250


def test_the_readme_cluster_example_is_a_valid_configuration(tmp_path):
    """README "Running several gateways": the node's YAML, merged into a minimal configuration."""
    example = yaml.safe_load(snippet("yaml", "gateway:\n  hostname: mx1.isp.example"))
    cfg = base_config(tmp_path)
    cfg["gateway"].update(hostname=example["gateway"]["hostname"], cluster=example["gateway"]["cluster"])
    cfg["virtual_servers"] = example["virtual_servers"]
    cfg["connectors"] = example["connectors"]
    cfg["plugins"]["enabled"].append("etrn_dequeue")
    gw = GatewayProcess(tmp_path, cfg)
    gw.write_config()
    checked = subprocess.run([*smtpgw_command(), "check-config", "-c", str(gw.config_path)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
