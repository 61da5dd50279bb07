"""What differs between two configurations, key by key, in the file's own key paths -- and a
configuration with some of those differences taken over.

A SIGHUP (``mta.app.reload_config``) asks which keys changed, applies the ones the running gateway can
take live and names the others (``needs a restart: virtual_servers[0].listen``). The paths are the
YAML's: ``gateway.queue.retry``, ``virtual_servers[1].limits.max_recipients``,
``connectors[0].smart_hosts``, ``plugins.diag_logging.levels.smtp_protocol``. Lists are compared whole
(``listen``, ``retry``, ``address_spaces``), except ``virtual_servers`` and ``connectors``, compared
entry by entry when their number is unchanged; a schedule is one value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mta.config.model import Config, PluginsConfig
from mta.config.schedules import Schedule

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()

# Python field -> YAML key, where they differ
_YAML_NAMES = {"exceptions": "except"}
_ENTRY_LISTS = ("virtual_servers", "connectors")       # compared entry by entry
_LEAVES = (Schedule,)                                  # dataclasses that are one value in the file


@dataclass(frozen=True)
class Change:
    """One key whose value differs. ``steps`` locate it in the model (attribute names, list indexes,
    dict keys), ``path`` names it as the file does."""

    path: str
    steps: tuple[tuple[str, Any], ...]
    old: Any
    new: Any

    @property
    def pattern(self) -> str:
        """``path`` with list indexes emptied: ``virtual_servers[].limits.timeout``."""
        return _path(self.steps, indexes=False)


def _path(steps: tuple[tuple[str, Any], ...], indexes: bool = True) -> str:
    out: list[str] = []
    for kind, step in steps:
        if kind == "index":
            out.append(f"[{step}]" if indexes else "[]")
        elif kind != "hidden":          # plugins.settings.<name> is plugins.<name> in the file
            out.append(("." if out else "") + (_YAML_NAMES.get(step, step) if kind == "attr" else str(step)))
    return "".join(out)


def _is_section(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type) and not isinstance(value, _LEAVES)


def diff(old: Config, new: Config) -> list[Change]:
    """Every key of the file whose value differs between ``old`` and ``new``, in file order."""
    out: list[Change] = []
    _walk(old, new, (), out)
    return out


def _walk(old: Any, new: Any, steps: tuple, out: list[Change]) -> None:
    if _is_section(old) and _is_section(new) and type(old) is type(new):
        for f in dataclasses.fields(old):
            if f.name == "path" and isinstance(old, Config):
                continue                # where the file is, not a key in it
            a, b = getattr(old, f.name), getattr(new, f.name)
            if isinstance(old, PluginsConfig) and f.name == "settings":
                _walk_dict(a, b, (*steps, ("hidden", f.name)), out)
            elif f.name == "extra" and isinstance(a, dict):
                _walk_dict(a, b, (*steps, ("hidden", f.name)), out)     # a connector's keys for later plugins
            elif f.name in _ENTRY_LISTS and len(a) == len(b):
                for i, (x, y) in enumerate(zip(a, b)):
                    _walk(x, y, (*steps, ("attr", f.name), ("index", i)), out)
            else:
                _walk(a, b, (*steps, ("attr", f.name)), out)
        return
    if isinstance(old, dict) and isinstance(new, dict):
        _walk_dict(old, new, steps, out)
        return
    if old != new:
        out.append(Change(_path(steps), steps, old, new))


def _walk_dict(old: dict, new: dict, base: tuple, out: list[Change]) -> None:
    """A dict's keys as keys of the file (``local_domains``, ``levels``, plugin sections)."""
    for k in list(old) + [k for k in new if k not in old]:
        a, b = old.get(k, MISSING), new.get(k, MISSING)
        steps = (*base, ("key", k))
        if isinstance(a, dict) and isinstance(b, dict):
            _walk_dict(a, b, steps, out)
        elif _is_section(a) and _is_section(b):
            _walk(a, b, steps, out)
        elif a != b:
            out.append(Change(_path(steps), steps, a, b))


def with_changes(config: Config, changes: list[Change]) -> Config:
    """``config`` with each change's new value put in place (the others keep ``config``'s)."""
    for change in changes:
        config = _put(config, change.steps, change.new)
    return config


def _put(obj: Any, steps: tuple, value: Any) -> Any:
    if not steps:
        return value
    (kind, step), rest = steps[0], steps[1:]
    if kind == "index":
        items = list(obj)
        items[step] = _put(items[step], rest, value)
        return tuple(items)
    if kind == "key":
        d = dict(obj)
        inner = _put(d.get(step, {}), rest, value) if rest else value
        if inner is MISSING:
            d.pop(step, None)
        else:
            d[step] = inner
        return d
    return dataclasses.replace(obj, **{step: _put(getattr(obj, step), rest, value)})
