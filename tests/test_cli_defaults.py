"""What every ``smtpgw`` subcommand and ``twistd smtpgw`` share: the version and where the
configuration is found when ``-c`` is not given ($SMTPGW_CONFIG, /etc/smtpgw/gateway.yaml,
etc/gateway.yaml)."""
from __future__ import annotations

import os
import subprocess
import sys

import yaml

from gwprocess import REPO, base_config


def smtpgw(*args: str, env_config: str | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SMTPGW_CONFIG", None)
    if env_config:
        env["SMTPGW_CONFIG"] = env_config
    return subprocess.run([sys.executable, "-m", "mta.cli.main", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=60)


def test_version():
    r = smtpgw("--version")
    assert r.returncode == 0 and r.stdout.startswith("smtpgw ")


def test_config_comes_from_the_environment_then_etc(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump(base_config(tmp_path)))
    r = smtpgw("check-config", env_config=str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{path}: OK")
    if not os.path.exists("/etc/smtpgw/gateway.yaml"):
        r = smtpgw("check-config", cwd=str(tmp_path))           # no etc/gateway.yaml here either
        assert r.returncode == 2 and "etc/gateway.yaml: no such file" in r.stderr
