"""docs/architecture.md is where a newcomer looks a module up: every module of the core (``mta/``)
and of the built-in plugins (``plugins/``) is named there, so a module added without a line in it
fails here rather than staying unknown."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_module_is_named_in_the_architecture_page():
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([A-Za-z_][\w.]*)`", text))
    words = {part for name in named for part in name.split(".")}
    missing = []
    for folder in ("mta", "plugins"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "__init__.py" or "static" in path.parts:
                continue
            if path.stem not in words:
                missing.append(str(path.relative_to(REPO)))
    assert not missing, f"not named in docs/architecture.md: {', '.join(missing)}"
