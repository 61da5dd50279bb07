"""Loading plugins and calling hooks that may answer later.

pluggy has no notion of Deferreds: a ``firstresult`` hook would take the first pending Deferred as the
answer. So verdict hooks are walked here, one implementation at a time in pluggy's call order, waiting
for each Deferred or coroutine before asking the next. A plugin that raises is logged and turned into
``451 4.3.0`` rather than a broken session.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable

import pluggy
from twisted.internet import defer
from twisted.logger import Logger

from mta.plugin import hookspecs
from mta.smtp.reply import Reply

log = Logger(namespace="smtpgw.hooks")

ENTRY_POINT_GROUP = "smtpgw.plugins"
PLUGIN_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")


class PluginError(Exception):
    """A plugin named in the configuration cannot be loaded."""


def available_plugins() -> dict[str, Any]:
    """Installed plugins by name (entry points of the ``smtpgw.plugins`` group), not yet imported."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_local_module(path: str) -> ModuleType:
    """Import a site's hook module from a file path, under a private module name."""
    p = Path(path)
    name = f"smtpgw_local_{p.stem}_{abs(hash(str(p.resolve()))):x}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load local hook module {path!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class Hooks:
    """The gateway's plugin manager plus the Deferred-aware way to call it."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("smtpgw")
        self.pm.add_hookspecs(hookspecs)
        self._order: dict[str, list[Any]] = {}      # hook name -> implementations, in call order

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)
        self._order.clear()

    def load(self, enabled: Iterable[str], local: Iterable[str] = ()) -> None:
        """Register the named built-in/third-party plugins, then the site's local hook files."""
        found = available_plugins()
        for name in enabled:
            if name not in found:
                raise PluginError(
                    f"plugins.enabled: unknown plugin {name!r} (installed: {', '.join(sorted(found)) or 'none'})")
            plugin = found[name].load()
            if isinstance(plugin, type):
                plugin = plugin()     # a plugin class gets one instance per gateway
            self.pm.register(plugin, name=name)
        for path in local:
            self.pm.register(load_local_module(path), name=f"local:{path}")
        self._order.clear()

    def implementations(self, hook_name: str) -> list[Any]:
        """Implementations in call order (pluggy keeps them in reverse); asked several times for
        every message, so kept until the next registration (register ``Hooks``, not ``pm``)."""
        order = self._order.get(hook_name)
        if order is None:
            order = self._order[hook_name] = list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))
        return order

    @staticmethod
    def _call_one(impl: Any, kwargs: dict[str, Any]) -> Any:
        args = [kwargs[name] for name in impl.argnames]
        return impl.function(*args)

    def first(self, hook_name: str, **kwargs: Any) -> Any:
        """Ask each implementation in order; the first non-None answer (after waiting) wins.

        Returns the answer itself when every implementation answered at once (the common case, kept
        free of Deferred overhead on the hot path), else a Deferred firing with it. An exception
        becomes :data:`PLUGIN_ERROR`, so a session answers 451 rather than breaking.
        """
        return self._first_from(self.implementations(hook_name), 0, hook_name, kwargs)

    def _first_from(self, impls: list[Any], index: int, hook_name: str, kwargs: dict[str, Any]) -> Any:
        while index < len(impls):
            impl = impls[index]
            index += 1
            try:
                result = self._call_one(impl, kwargs)
            except Exception as e:
                return self._error_reply(e, impl.plugin_name, hook_name)
            if inspect.iscoroutine(result):
                result = defer.Deferred.fromCoroutine(result)
            if isinstance(result, defer.Deferred):
                def resume(value: Any, i: int = index) -> Any:
                    if value is not None:
                        return value
                    return self._first_from(impls, i, hook_name, kwargs)

                def failed(f: Any, name: str = impl.plugin_name) -> Reply:
                    return self._error_reply(f.value, name, hook_name, f)

                return result.addCallbacks(resume, failed)
            if result is not None:
                return result
        return None

    @staticmethod
    def _error_reply(error: BaseException, plugin: str, hook_name: str, failure: Any = None) -> Reply:
        """An exception that carries a ``reply`` (a DNS error, a refused host) is an answer, not a
        crash; anything else is logged as a plugin failure and answered 451 4.3.0."""
        reply = getattr(error, "reply", None)
        if isinstance(reply, Reply):
            return reply
        log.failure("plugin {plugin} failed in {hook}", failure, plugin=plugin, hook=hook_name)
        return PLUGIN_ERROR

    def first_deferred(self, hook_name: str, **kwargs: Any) -> defer.Deferred:
        """:meth:`first`, always as a Deferred."""
        return defer.maybeDeferred(self.first, hook_name, **kwargs)

    def first_sync(self, hook_name: str, **kwargs: Any) -> Any:
        """Like :meth:`first` but for hooks that must answer at once (no Deferreds); errors give None."""
        for impl in self.implementations(hook_name):
            try:
                result = self._call_one(impl, kwargs)
            except Exception:
                log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook=hook_name)
                continue
            if result is not None:
                return result
        return None

    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Fire a notification hook; errors are logged, results and pending Deferreds ignored."""
        for impl in self.implementations(hook_name):
            try:
                result = self._call_one(impl, kwargs)
                if inspect.iscoroutine(result):
                    result = defer.Deferred.fromCoroutine(result)
                if isinstance(result, defer.Deferred):
                    result.addErrback(lambda f, n=impl.plugin_name: log.failure(
                        "plugin {plugin} failed in {hook}", f, plugin=n, hook=hook_name))
            except Exception:
                log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook=hook_name)

    def event(self, category: str, level: str, message: str, **fields: Any) -> None:
        """Emit a diagnostic event (cheap when no plugin listens)."""
        if self.implementations("smtpgw_event"):
            self.notify("smtpgw_event", category=category, level=level, message=message, fields=fields)
