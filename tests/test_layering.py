"""The package layering of ``mta`` (docs/architecture.md), written down once as data and checked.

Every import between smtpgw's packages, at module level or inside a function, must go to the package
itself or to one listed for it below: a package never imports one above it, so there are no cycles.
``smtpgw_plugins`` (the built-in plugins, folder ``plugins/``) sit above the core and reach it only
through the public objects below them; only the command line and the application compose them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Lowest first; each package may import itself and any package listed before it.
LAYERS: list[str] = [
    "mta.config",          # errors (a leaf), values, schedules, workers, model, loader
    "mta.smtp",            # wire-level pieces: reply, the reply catalogue, address, lines
    "mta.io",              # Twisted I/O shortcuts, batched log writes
    "mta.model",           # the public objects hooks receive: session, envelope, message, queued entry, next hop
    "mta.maillog",         # the gateway's own log lines (Postfix's fields), text or JSON
    "mta.workers",         # which worker this is, ids, shared counts, the supervisor
    "mta.plugin",          # the hook contract (hookspecs) and the manager that fires it
    "mta.dsn",             # RFC 3461 parameters and RFC 3464 reports
    "mta.spool",           # durable storage: files, the writer process, the store
    "mta.smtp.client",     # outbound SMTP
    "mta.smtp.server",     # inbound SMTP
    "mta.queue",           # the queue manager, its scheduler and retry policy
    "mta.delivery",        # one attempt: connectors, next hops, delivery windows, Maildir
    "mta.policy",          # the core's own policy, as the trylast "core" plugin
    "mta.cluster",         # several gateways as one: the node's Redis link, heartbeat, shared triggers
    "smtpgw_plugins",      # the built-in plugins
    "mta.ops",             # control socket, worker fan-out, metrics
    "mta.console",         # the web console, on the control interfaces of mta.ops
    "mta.app",             # twistd: composition root, services, reload, preflight checks
    "mta.cli",             # the smtpgw command
]


def package_of(module: str) -> str | None:
    """The most specific layer a module belongs to."""
    best = None
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            if best is None or len(layer) > len(best):
                best = layer
    return best


def allowed(src: str, dst: str) -> bool:
    a, b = package_of(src), package_of(dst)
    if a is None or b is None:
        return True
    return LAYERS.index(b) <= LAYERS.index(a) or b == a


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "mta").rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    for path in sorted((REPO / "plugins").rglob("*.py")):
        rel = path.relative_to(REPO / "plugins").with_suffix("")
        parts = ["smtpgw_plugins", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """Every smtpgw module this file imports (``from X import Y`` counts Y when Y is a module)."""
    files = module_files()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            for alias in node.names:
                if f"{target}.{alias.name}" in files:
                    found.append((f"{target}.{alias.name}", node.lineno))
    return [(t, line) for t, line in found if t.split(".")[0] in ("mta", "smtpgw_plugins")]


def test_every_module_belongs_to_a_layer():
    strays = [m for m in module_files() if m != "mta" and package_of(m) is None]
    assert strays == [], f"modules outside every layer (add them to LAYERS): {strays}"


def test_no_upward_import_and_no_missing_module():
    files = module_files()
    problems = []
    for module, path in files.items():
        for target, line in imports_of(module, path):
            if target not in files and target.rpartition(".")[0] not in files:
                problems.append(f"{path.relative_to(REPO)}:{line}: imports {target}, which does not exist")
            elif not allowed(module, target):
                problems.append(f"{path.relative_to(REPO)}:{line}: {package_of(module)} imports "
                                f"{package_of(target)} ({target}), a layer above it")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("layer", LAYERS)
def test_layer_imports_on_its_own(layer):
    """Each package imports cleanly in a fresh interpreter (no import-order cycle hides)."""
    import subprocess
    import sys
    name = layer
    r = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
