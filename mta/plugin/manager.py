"""Loading plugins, checking them against the hook contract, and firing hooks.

Every hook of :mod:`mta.plugin.hookspecs` is fired through one typed method of :class:`Hooks`
(``hooks.rcpt_to(...)``, ``hooks.queued(...)``, ``hooks.ehlo_keywords(...)``), and each method goes
through the one helper for its kind:

* verdict (``_verdict``): asked one implementation at a time, in pluggy's call order, waiting for a
  Deferred or coroutine before asking the next (pluggy alone would take the first pending Deferred
  as the answer). The first answer other than None wins; an answer of a type the hook does not allow,
  or an exception, is logged and becomes ``451 4.3.0`` -- unless the exception carries a ``reply``
  (a DNS error, a refused host), which is then the answer. Returns the answer itself when every
  implementation answered at once (the common case, kept free of Deferreds), else a Deferred.
* notification (``_notify``): every implementation is called; results are ignored, errors logged
  (``event``, the diagnostic events, does the same inline: several of them come per message).
* collect (``_collect``): every implementation is asked; all answers are returned.
* edit (``_edit``): every implementation is called in call order, each Deferred or coroutine waited
  for before the next; results are ignored, errors logged and skipped.

Each implementation is called with the arguments it names, listed once per hook (``_callers``); an answer
of None or a plain value is taken without asking whether it is a coroutine or a Deferred: the hooks
fire about twenty times per relayed message.

After loading, a function named ``smtpgw_...`` that is no hook (a misspelt ``smtpgw_rcpt``) is a
:class:`PluginError` naming the function and its file; ``check_plugins`` turns it into the
configuration error that stops ``twistd smtpgw`` and ``smtpgw check-config``.
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import CoroutineType, ModuleType
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Protocol, Sequence

import pluggy
from twisted.internet import defer
from twisted.logger import Logger

from mta.config import Config, ConfigError, Connector, LocalHook
from mta.maillog import MailLog
from mta.model.envelope import Envelope, Session
from mta.model.message import MessageData
from mta.model.nexthop import Hop, Outcome
from mta.model.queue_entry import QueueEntry
from mta.model.window import Go, Hold
from mta.plugin import hookspecs
from mta.smtp import replies as R
from mta.smtp.reply import Reply

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

log = Logger(namespace="smtpgw.hooks")

ENTRY_POINT_GROUP = "smtpgw.plugins"
PREFIX = "smtpgw_"
HOOK_NAMES = tuple(name for name in vars(hookspecs) if name.startswith(PREFIX))
PLUGIN_ERROR = R.INTERNAL_ERROR


class PluginError(Exception):
    """A plugin named in the configuration cannot be used; ``key`` is the configuration key naming it."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class Services(Protocol):
    """What ``smtpgw_configure`` hands plugins as ``services``: the running gateway
    (``mta.app.gateway.Gateway``, which sits above this package and provides these)."""

    config: Config
    reactor: Any                # twisted's reactor: seconds(), callLater()...
    hooks: "Hooks"              # hooks.event(category, level, message, **fields) logs through diag_logging
    mail_log: MailLog           # the core's mail log (its format follows diag_logging's)
    spool: Any                  # mta.spool.store.Spool
    queue: Any                  # mta.queue.manager.QueueManager
    resolver: Any               # mta.delivery.nexthops.Resolver
    client: Any                 # mta.smtp.client.pool.SMTPClientPool
    cluster: Any                # mta.cluster.node.Cluster (gateway.cluster), or None on a single machine


def available_plugins() -> dict[str, Any]:
    """Installed plugins by name (entry points of the ``smtpgw.plugins`` group), not yet imported."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


_local_modules: dict[str, ModuleType] = {}


def load_local_module(path: str) -> ModuleType:
    """Import a site's hook module from a file path, under a private module name; once per process,
    so the startup check (``check_plugins``) and the gateway share one import."""
    p = Path(path).resolve()
    module = _local_modules.get(str(p))
    if module is not None:
        return module
    name = f"smtpgw_local_{p.stem}_{abs(hash(str(p))):x}"
    spec = importlib.util.spec_from_file_location(name, p)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    _local_modules[str(p)] = module
    return module


def local_name(path: str) -> str:
    """The plugin name a local hook file is registered under (``smtpgw check-config`` shows it)."""
    return f"local:{path}"


def _where(function: Any) -> str:
    """``/path/file.py:12``: where a function is defined, for one-line errors."""
    code = getattr(inspect.unwrap(function), "__code__", None)
    if code is None:
        return repr(function)
    return f"{code.co_filename}:{code.co_firstlineno}"


def _suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, HOOK_NAMES, n=1, cutoff=0.6)
    if not close:
        close = [h for h in HOOK_NAMES if h.startswith(name) or name.startswith(h)][:1]
    return f" (did you mean {close[0]}?)" if close else ""


class _PluginManager(pluggy.PluginManager):
    """pluggy's manager, taking every ``smtpgw_*`` function as a hook implementation even without the
    ``@hookimpl`` marker (as pytest does for ``pytest_*``), so a misspelt one is caught, not ignored."""

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if opts is None and name.startswith(PREFIX) and inspect.isroutine(getattr(plugin, name, None)):
            opts = {"wrapper": False, "hookwrapper": False, "optionalhook": False,
                    "tryfirst": False, "trylast": False, "specname": None}
        return opts


class Hooks:
    """The gateway's plugin manager and the one place hooks are fired."""

    def __init__(self) -> None:
        self.pm = _PluginManager("smtpgw")
        self.pm.add_hookspecs(hookspecs)
        self._order: dict[str, list[Any]] = {}      # hook name -> implementations, in call order
        self._calls: dict[str, list[tuple[Any, Any, tuple[str, ...]]]] = {}  # hook name -> _callers()
        self._keys: dict[str, str] = {}             # plugin name -> the configuration key naming it
        self._takes: dict[tuple[str, str], bool] = {}   # (category, level) -> takes_event()

    # -- loading ---------------------------------------------------------------------------------

    def register(self, plugin: object, name: str | None = None) -> None:
        self.pm.register(plugin, name=name)
        self._forget_order()

    def _forget_order(self) -> None:
        self._order.clear()
        self._calls.clear()
        self._takes.clear()

    def load(self, enabled: Iterable[str], local: Iterable[LocalHook | str] = ()) -> None:
        """Register the named built-in/third-party plugins, then the site's local hook files, and
        check every ``smtpgw_*`` function against the hook contract.

        Raises :class:`PluginError` (naming the configuration key) for a plugin that is not installed,
        a file that does not import, or a function that is no hook.
        """
        found = available_plugins()
        for i, name in enumerate(enabled):
            key = f"plugins.enabled[{i}]"
            if name not in found:
                raise PluginError(key, f"unknown plugin {name!r} (installed: {', '.join(sorted(found)) or 'none'})")
            plugin = found[name].load()
            if isinstance(plugin, type):
                plugin = plugin()     # a plugin class gets one instance per gateway
            self._register_checked(plugin, name, key)
        for i, hook in enumerate(local):
            path = hook.path if isinstance(hook, LocalHook) else hook
            key = f"plugins.local[{i}]"
            try:
                module = load_local_module(path)
            except Exception as e:
                raise PluginError(key, f"{path} does not import: {type(e).__name__}: {e}") from None
            self._register_checked(module, local_name(path), key)
        self._forget_order()
        self.check()

    def _register_checked(self, plugin: object, name: str, key: str) -> None:
        self._keys[name] = key
        try:
            self.pm.register(plugin, name=name)
        except pluggy.PluginValidationError as e:   # an argument the hook does not have...
            raise PluginError(key, f"{getattr(plugin, '__file__', name)}: {e}") from None

    def check(self) -> None:
        """No ``smtpgw_*`` function without a hook of that name (``pm.check_pending``), reported as
        one line naming the function, its file and line, and the hook it was probably meant to be."""
        for name in HOOK_NAMES:                 # make sure every known hook has its caller
            getattr(self.pm.hook, name)
        for name, caller in vars(self.pm.hook).items():
            if name.startswith("_") or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                key = self._keys.get(impl.plugin_name, f"plugin {impl.plugin_name}")
                raise PluginError(key, f"{name}() at {_where(impl.function)} is not an smtpgw hook"
                                       f"{_suggestion(name)}")
        self.pm.check_pending()

    def plugin(self, name: str) -> Any:
        """The plugin object registered as ``name`` (``etrn_dequeue``, ``local:<path>``), or None."""
        return self.pm.get_plugin(name)

    def plugin_names(self) -> list[str]:
        """Every registered plugin's name, in registration order (``smtpgw check-config`` lists them)."""
        return [name for name, _ in self.pm.list_name_plugin()]

    def implementations(self, hook_name: str) -> list[Any]:
        """Implementations in call order (pluggy keeps them in reverse); asked several times for
        every message, so kept until the next registration (register through ``Hooks``, not ``pm``)."""
        order = self._order.get(hook_name)
        if order is None:
            order = self._order[hook_name] = list(reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))
        return order

    def _callers(self, hook_name: str) -> list[tuple[Any, Any, tuple[str, ...]]]:
        """``(implementation, function, argument names)`` in call order, made once per hook (until
        the next registration): an implementation is called as ``function(*map(kwargs.__getitem__,
        names))`` (pluggy lets it take any subset of the hook's arguments), one Python call each
        rather than three (``_call_one`` and its argument list)."""
        calls = self._calls.get(hook_name)
        if calls is None:
            calls = self._calls[hook_name] = [(impl, impl.function, tuple(impl.argnames))
                                              for impl in self.implementations(hook_name)]
        return calls

    @staticmethod
    def settings_for(plugin_name: str, config: Config) -> Mapping[str, Any]:
        """A plugin's own section: ``plugins.<name>``, or a local hook's ``settings``."""
        if plugin_name in config.plugins.settings:
            return config.plugins.settings[plugin_name] or {}
        for hook in config.plugins.local:
            if local_name(hook.path) == plugin_name:
                return hook.settings
        return {}

    # -- the three kinds of hook -------------------------------------------------------------------

    @staticmethod
    def _call_one(impl: Any, kwargs: Mapping[str, Any]) -> Any:
        return impl.function(*[kwargs[name] for name in impl.argnames])

    def _verdict(self, hook_name: str, accepts: tuple[type, ...], **kwargs: Any) -> Any:
        """The first non-None answer, at once or as a Deferred; checked against ``accepts``."""
        calls = self._calls.get(hook_name)
        if calls is None:
            calls = self._callers(hook_name)
        if not calls:                   # only the core answers (most hooks, most of the time)
            return None
        result = self._first_from(calls, 0, hook_name, kwargs)
        if result is None:
            return None
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._checked, hook_name, accepts)
        return self._checked(result, hook_name, accepts)

    @staticmethod
    def _checked(answer: Any, hook_name: str, accepts: tuple[type, ...]) -> Any:
        if answer is None or isinstance(answer, accepts):
            return answer
        log.error("{hook} answered {answer!r}, which it may not (expected {types})", hook=hook_name,
                  answer=answer, types=" or ".join(t.__name__ for t in accepts))
        return PLUGIN_ERROR

    def _first_from(self, calls: list[tuple[Any, Any, tuple[str, ...]]], index: int, hook_name: str,
                    kwargs: dict[str, Any]) -> Any:
        for impl, function, names in calls[index:] if index else calls:
            index += 1
            try:
                result = function(*map(kwargs.__getitem__, names))
            except Exception as e:
                return self._error_reply(e, impl.plugin_name, hook_name)
            if result is None:
                continue
            if type(result) is CoroutineType:
                result = defer.Deferred.fromCoroutine(result)
            elif not isinstance(result, defer.Deferred):
                return result

            def resume(value: Any, i: int = index) -> Any:
                if value is not None:
                    return value
                return self._first_from(calls, i, hook_name, kwargs)

            def failed(f: Any, name: str = impl.plugin_name) -> Reply:
                return self._error_reply(f.value, name, hook_name, f)

            return result.addCallbacks(resume, failed)
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

    def _notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call every implementation; errors are logged, results and pending Deferreds ignored."""
        calls = self._calls.get(hook_name)
        if calls is None:
            calls = self._callers(hook_name)
        for impl, function, names in calls:
            try:
                result = function(*map(kwargs.__getitem__, names))
                if result is not None:
                    self._watch(result, impl.plugin_name, hook_name)
            except Exception:
                log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook=hook_name)

    @staticmethod
    def _watch(result: Any, plugin: str, hook_name: str) -> None:
        """A notification's Deferred or coroutine: run on, its failure logged."""
        if type(result) is CoroutineType:
            result = defer.Deferred.fromCoroutine(result)
        if isinstance(result, defer.Deferred):
            result.addErrback(lambda f: log.failure("plugin {plugin} failed in {hook}", f, plugin=plugin,
                                                    hook=hook_name))

    def _edit(self, hook_name: str, **kwargs: Any) -> Deferred[None] | None:
        """Call every implementation in order, waiting for each Deferred or coroutine before the next;
        an exception is logged and skipped. None when all finished at once, else a Deferred."""
        return self._edit_from(self._callers(hook_name), 0, hook_name, kwargs)

    def _edit_from(self, calls: list[tuple[Any, Any, tuple[str, ...]]], index: int, hook_name: str,
                   kwargs: dict[str, Any]) -> Deferred[None] | None:
        while index < len(calls):
            impl, function, names = calls[index]
            index += 1
            try:
                result = function(*map(kwargs.__getitem__, names))
            except Exception:
                log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook=hook_name)
                continue
            if result is None:
                continue
            if type(result) is CoroutineType:
                result = defer.Deferred.fromCoroutine(result)
            if isinstance(result, defer.Deferred):
                def failed(f: Any, name: str = impl.plugin_name) -> None:
                    log.failure("plugin {plugin} failed in {hook}", f, plugin=name, hook=hook_name)

                result.addErrback(failed)
                return result.addCallback(lambda _, i=index: self._edit_from(calls, i, hook_name, kwargs))
        return None

    def _collect(self, hook_name: str, **kwargs: Any) -> list[Any]:
        """Every implementation's answer other than None, in call order (answers must come at once);
        one that raises is logged and left out."""
        answers = []
        for impl, function, names in self._callers(hook_name):
            try:
                result = function(*map(kwargs.__getitem__, names))
            except Exception:
                log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook=hook_name)
                continue
            if result is not None:
                answers.append(result)
        return answers

    # -- configuration -------------------------------------------------------------------------------

    def configure(self, config: Config, services: Services) -> None:
        """``smtpgw_configure``, each plugin with its own ``settings``. Unlike other notifications an
        exception propagates: a plugin that cannot set itself up stops the gateway from starting."""
        for impl in self.implementations("smtpgw_configure"):
            self._call_one(impl, {"config": config, "services": services,
                                  "settings": self.settings_for(impl.plugin_name, config)})
        self._takes.clear()             # the listeners' levels are set now

    def reload(self, config: Config) -> None:
        """``smtpgw_reload`` (SIGHUP), each plugin with its section of the new file."""
        for impl in self.implementations("smtpgw_reload"):
            try:
                self._call_one(impl, {"config": config, "settings": self.settings_for(impl.plugin_name, config)})
            except Exception:
                log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook="smtpgw_reload")
        self._takes.clear()             # the listeners' levels may have changed

    # -- the SMTP session: verdicts (a Reply, None, or a Deferred of either) -----------------------------

    def connect(self, session: Session) -> Reply | Deferred[Reply | None] | None:
        return self._verdict("smtpgw_connect", (Reply,), session=session)

    def helo(self, session: Session, name: str) -> Reply | Deferred[Reply | None] | None:
        return self._verdict("smtpgw_helo", (Reply,), session=session, name=name)

    def auth(self, session: Session, mechanism: str, username: str) -> Reply | Deferred[Reply | None] | None:
        return self._verdict("smtpgw_auth", (Reply,), session=session, mechanism=mechanism, username=username)

    def mail_from(self, session: Session, envelope: Envelope, sender: str,
                  params: Mapping[str, str | None]) -> Reply | Deferred[Reply | None] | None:
        return self._verdict("smtpgw_mail_from", (Reply,), session=session, envelope=envelope, sender=sender,
                             params=params)

    def rcpt_to(self, session: Session, envelope: Envelope, recipient: str,
                params: Mapping[str, str | None]) -> Reply | Deferred[Reply | None] | None:
        return self._verdict("smtpgw_rcpt_to", (Reply,), session=session, envelope=envelope,
                             recipient=recipient, params=params)

    def data(self, session: Session, envelope: Envelope,
             message: MessageData) -> Reply | Deferred[Reply | None] | None:
        return self._verdict("smtpgw_data", (Reply,), session=session, envelope=envelope, message=message)

    def command(self, session: Session, verb: str, argument: str) -> Reply | Deferred[Reply | None] | None:
        return self._verdict("smtpgw_command", (Reply,), session=session, verb=verb, argument=argument)

    def before_queue(self, session: Session | None, envelope: Envelope,
                     message: MessageData) -> Deferred[None] | None:
        """``smtpgw_before_queue``: the plugins' last edits; None when there is nothing to wait for."""
        return self._edit("smtpgw_before_queue", session=session, envelope=envelope, message=message)

    def queued(self, envelope: Envelope) -> None:
        self._notify("smtpgw_queued", envelope=envelope)

    def ehlo_keywords(self, session: Session) -> list[str]:
        """Every plugin's extra keywords, in call order."""
        keywords: list[str] = []
        for answer in self._collect("smtpgw_ehlo_keywords", session=session):
            keywords.extend(k for k in answer if isinstance(k, str))
        return keywords

    # -- routing and delivery: verdicts ---------------------------------------------------------------

    def route(self, envelope: QueueEntry, recipient: str, connectors: Sequence[Connector]
              ) -> Sequence[Connector] | Reply | Deferred[Sequence[Connector] | Reply | None] | None:
        return self._verdict("smtpgw_route", (list, tuple, Reply), envelope=envelope, recipient=recipient,
                             connectors=connectors)

    def next_hops(self, envelope: QueueEntry, domain: str, connector: Connector | None
                  ) -> Sequence[Hop] | Reply | Deferred[Sequence[Hop] | Reply | None] | None:
        return self._verdict("smtpgw_next_hops", (list, tuple, Reply), envelope=envelope, domain=domain,
                             connector=connector)

    def delivery_window(self, connector: Connector | None, envelope: QueueEntry, domain: str = ""
                        ) -> Hold | Go | Reply | Deferred[Hold | Go | Reply | None] | None:
        return self._verdict("smtpgw_delivery_window", (Hold, Go, Reply), connector=connector,
                             envelope=envelope, domain=domain)

    # -- delivery outcomes: notifications ------------------------------------------------------------

    _OUTCOME_HOOKS = {Outcome.DELIVERED: "smtpgw_delivered", Outcome.DEFERRED: "smtpgw_deferred",
                      Outcome.FAILED: "smtpgw_bounced"}

    def recipient_outcome(self, outcome: Outcome, envelope: QueueEntry, recipient: str, reply: Reply) -> None:
        """``smtpgw_delivered``, ``smtpgw_deferred`` or ``smtpgw_bounced`` as ``outcome`` says (a held
        recipient is not an outcome: nothing is fired)."""
        hook = self._OUTCOME_HOOKS.get(outcome)
        if hook is not None:
            self._notify(hook, envelope=envelope, recipient=recipient, reply=reply)

    # -- diagnostics ----------------------------------------------------------------------------------

    def listening(self) -> bool:
        """Whether any plugin takes diagnostic events (cheap: ask before building one)."""
        return bool(self.implementations("smtpgw_event"))

    def wants_event(self, category: str, level: str) -> bool:
        """Whether any listener writes events of ``category`` at ``level``: a listener may say with a
        ``wants_event(category, level)`` method on its plugin object; one without it takes everything."""
        for impl in self.implementations("smtpgw_event"):
            wants = getattr(impl.plugin, "wants_event", None)
            if wants is None or wants(category, level):
                return True
        return False

    def takes_event(self, category: str, level: str) -> bool:
        """Whether any listener does something with an event of ``category`` at ``level``: a listener
        may say with a ``takes_event(category, level)`` method on its plugin object (False: its
        ``smtpgw_event`` would do nothing with it); one without it takes everything. Decided once per
        (category, level) after each registration, configuration and reload."""
        takes = self._takes.get((category, level))
        if takes is None:
            takes = False
            for impl in self.implementations("smtpgw_event"):
                says = getattr(impl.plugin, "takes_event", None)
                if says is None or says(category, level):
                    takes = True
                    break
            self._takes[(category, level)] = takes
        return takes

    def event(self, category: str, level: str, message: str, **fields: Any) -> None:
        """Emit a diagnostic event (cheap when no plugin listens): each listener called directly,
        as ``_notify`` would (a few events a message reach the queue trace at least). An event that
        no listener takes (``takes_event``; the smtp_protocol events when only the queue traces
        listen) goes nowhere: every listener would have done nothing with it."""
        takes = self._takes.get((category, level))
        if not takes and (takes is not None or not self.takes_event(category, level)):
            return
        calls = self._calls.get("smtpgw_event")
        if calls is None:
            calls = self._callers("smtpgw_event")
        if not calls:
            return
        kwargs = {"category": category, "level": level, "message": message, "fields": fields}
        for impl, function, names in calls:
            try:
                result = function(*map(kwargs.__getitem__, names))
                if result is not None:
                    self._watch(result, impl.plugin_name, "smtpgw_event")
            except Exception:
                log.failure("plugin {plugin} failed in {hook}", plugin=impl.plugin_name, hook="smtpgw_event")


def check_plugins(config: Config) -> None:
    """Load the enabled plugins and the local hook files as the gateway will, before anything listens
    (``twistd smtpgw`` and ``smtpgw check-config``): a file that does not import or a function named
    like a hook that is none is a :class:`ConfigError` naming the key, the function and the file. A
    plugin object with a ``check_config(config)`` method is then asked to open what its section names,
    raising ConfigError naming the key as the core does for its own files."""
    try:
        hooks = Hooks()
        hooks.load(config.plugins.enabled, config.plugins.local)
    except PluginError as e:
        raise ConfigError(e.key, e.problem) from None
    for _, plugin in hooks.pm.list_name_plugin():
        check = getattr(plugin, "check_config", None)
        if check is not None:       # a plugin opens the files its section names (dkim_sign: its keys)
            check(config)
