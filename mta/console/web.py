"""The console over HTTP(S): login, sessions, the pages, the actions, the static files.

One leaf resource answers every path, so the routing is one table and every response gets the same
security headers (a Content-Security-Policy that allows only the console's own script and
stylesheet, no framing, no caching of pages). Pages are built in the reactor thread from the control
interface's answers; the one slow step, checking a password (scrypt), runs in a thread.

Every action is a POST carrying the session's CSRF token; a POST without it, or with another
session's, is refused 403 before anything is looked at. Every action is logged with the user's name.
An action naming a ``node`` (the Cluster page) is sent as the control request ``cluster_command``, the
one ``smtpgw queue hold NODE:ID`` sends, to the node that holds the message.
"""
from __future__ import annotations

import ipaddress
import json
import os
from typing import Any, Awaitable, Callable
from urllib.parse import urlencode, urlsplit

from twisted.application import internet, service
from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from mta.cluster.commands import DEFAULT_TIMEOUT as NODE_TIMEOUT
from mta.config import Config, ConfigError
from mta.console import cluster_page, dashboard, diagnostics, html, queue_pages, settings_pages
from mta.console.history import History, Reader
from mta.console.html import ACTIONS, esc
from mta.console.queues import destinations, in_domain
from mta.console.sessions import COOKIE, Session, Sessions, cookie_header
from mta.console.throttle import LoginThrottle
from mta.plugin.hookspecs import hookimpl
from mta.smtp.server.tls import ServerTLS, TLSFileError, server_context
from mta.smtp.server.users import UsersFileChecker, UsersFileError, read_users, thread_runner

log = Logger(namespace="smtpgw.console")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
STATIC_TYPES = {".css": b"text/css; charset=utf-8", ".js": b"text/javascript; charset=utf-8",
                ".svg": b"image/svg+xml"}
SECURITY_HEADERS = {
    b"Content-Security-Policy": b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
    b"Referrer-Policy": b"same-origin",
}
OP_NAMES = dict(ACTIONS)
MAX_FIELD = 4096


class Reply(Exception):
    """Stop and answer with ``status`` and a short page saying ``text``."""

    def __init__(self, status: int, title: str, text: str) -> None:
        super().__init__(text)
        self.status, self.title, self.text = status, title, text


def load_static() -> dict[str, tuple[bytes, bytes]]:
    """``/static/NAME`` -> (content type, bytes), read once at start-up."""
    files = {}
    for name in sorted(os.listdir(STATIC)):
        ext = os.path.splitext(name)[1]
        if ext in STATIC_TYPES:
            with open(os.path.join(STATIC, name), "rb") as f:
                files[f"/static/{name}"] = (STATIC_TYPES[ext], f.read())
    return files


def safe_back(value: str | None, default: str = "/queues") -> str:
    """A local path to return to after a form (never another site: ``//host`` and schemes refused)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return default
    parts = urlsplit(value)
    return value if not parts.scheme and not parts.netloc else default


def outcome(op: str, answer: dict[str, Any]) -> str:
    """``2 done, 1 unchanged`` from an action's results, or the control interface's error."""
    if not answer.get("ok"):
        return f"failed: {answer.get('error')}"
    counts: dict[str, int] = {}
    for r in answer.get("results") or []:
        counts[r.get("result", "?")] = counts.get(r.get("result", "?"), 0) + 1
    text = ", ".join(f"{n} {result}" for result, n in counts.items()) or "no message matched"
    if op == "delete_ndr":
        reports = sum(1 for r in answer.get("results") or [] if r.get("dsn"))
        text += f"; {reports} NDR{'s' if reports != 1 else ''} queued to the sender"
    return text


class Console:
    """One console: its sessions, the users file, and the control interface it acts through
    (:class:`mta.ops.control.QueueControl`, or :class:`mta.ops.fanout.FanOutControl` with several
    workers: the objects behind ``smtpgw queue``)."""

    def __init__(self, gateway: Any, control: Any, *, secure: bool = False,
                 checker: Any = None, history: History | None = None,
                 recorder: diagnostics.Recorder | None = None) -> None:
        self.gateway = gateway
        self.control = control
        self.history = history
        self.recorder = recorder
        self.reactor = gateway.reactor
        self.secure = secure
        self.sessions = Sessions(self.reactor.seconds)
        self.throttle = LoginThrottle(self.reactor.seconds)
        self._fixed_checker = checker
        self._checker: tuple[str, Any] | None = None       # (users file, its checker)
        self.tls: ServerTLS | None = None                   # set by console_service under TLS
        self.static = load_static()
        self.routes: dict[tuple[bytes, str], Callable[[Any, Session | None], Awaitable[bytes]]] = {
            (b"GET", "/"): self.home,
            (b"GET", "/login"): self.login_form,
            (b"POST", "/login"): self.login,
            (b"POST", "/logout"): self.logout,
            (b"GET", "/dashboard"): self.dashboard,
            (b"GET", "/dashboard.json"): self.dashboard_json,
            (b"GET", "/connectors"): self.connectors,
            (b"GET", "/virtual-servers"): self.virtual_servers,
            (b"GET", "/diagnostics"): self.diagnostics,
            (b"GET", "/diagnostics.json"): self.diagnostics_json,
            (b"GET", "/cluster"): self.cluster,
            (b"GET", "/cluster.json"): self.cluster_json,
            (b"GET", "/queues"): self.queues,
            (b"GET", "/messages"): self.messages,
            (b"GET", "/message"): self.message,
            (b"POST", "/action"): self.action,
        }
        self.public = {"/login"}

    # -- plumbing -------------------------------------------------------------------------------

    @property
    def checker(self) -> Any:
        """The password checker for ``gateway.console.users`` as it is now: a SIGHUP that names
        another file takes effect at the next login (the file itself is read again when it changes)."""
        if self._fixed_checker is not None:
            return self._fixed_checker
        path = self.config.gateway.console.users
        if self._checker is None or self._checker[0] != path:
            self._checker = (path, UsersFileChecker(path, thread_runner(self.reactor)))
        return self._checker[1]

    @property
    def config(self) -> Config:
        """The configuration the gateway runs on now (SIGHUP replaces it: the pages follow)."""
        return self.gateway.config

    @property
    def hostname(self) -> str:
        return self.config.gateway.hostname

    def now(self) -> float:
        return self.reactor.seconds()

    @staticmethod
    def arg(request: Any, name: str) -> str | None:
        values = request.args.get(name.encode("ascii")) or []
        if not values:
            return None
        return values[0][:MAX_FIELD].decode("utf-8", "replace")

    @staticmethod
    def args(request: Any, name: str) -> list[str]:
        return [v[:MAX_FIELD].decode("utf-8", "replace") for v in request.args.get(name.encode("ascii")) or []]

    @staticmethod
    def client(request: Any) -> str:
        peer = request.getClientAddress()
        return getattr(peer, "host", str(peer))

    def redirect(self, request: Any, where: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"Location", where.encode("utf-8"))
        return b""

    def render_page(self, request: Any, session: Session | None, title: str, body: str,
                    current: str = "", scripts: tuple[str, ...] = ()) -> bytes:
        notices = []
        if session is not None and session.user is not None:
            notices, session.notices = session.notices, []
        return html.page(title, body, user=session.user if session else None,
                         csrf=session.csrf if session else "", hostname=self.hostname, current=current,
                         notices=notices, scripts=scripts, nav=self.nav())

    def nav(self) -> list[tuple[str, str]]:
        """The pages: Cluster only when this gateway is one of several (``gateway.cluster.redis``)."""
        return html.NAV + ([html.CLUSTER_NAV] if self.config.gateway.cluster.redis else [])

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control interface's answer, exactly as ``smtpgw queue`` would get it."""
        return await self.control.handle(request)

    async def serve(self, request: Any) -> bytes:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        path = request.path.decode("utf-8", "replace")
        if request.method in (b"GET", b"HEAD") and path in self.static:
            kind, data = self.static[path]
            request.setHeader(b"Content-Type", kind)
            request.setHeader(b"Cache-Control", b"no-cache")
            return data
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        session = self.sessions.get(request.getCookie(COOKIE.encode("ascii")))
        handler = self.routes.get((b"GET" if request.method == b"HEAD" else request.method, path))
        try:
            if handler is None:
                if any(p == path for _, p in self.routes):
                    raise Reply(405, "Method not allowed", "This page does not take that method.")
                raise Reply(404, "Not found", "There is no such page.")
            if request.method == b"POST" and (session is None or not session.token_ok(self.arg(request, "csrf"))):
                raise Reply(403, "Forbidden", "This form's security token is missing or out of date: "
                                              "reload the page and try again.")
            if path not in self.public and (session is None or session.user is None):
                if request.method == b"POST":
                    raise Reply(403, "Forbidden", "Log in first.")
                target = path + (("?" + request.uri.decode("utf-8", "replace").partition("?")[2])
                                 if b"?" in request.uri else "")
                return self.redirect(request, "/login?" + urlencode({"next": target}))
            return await handler(request, session)
        except Reply as r:
            request.setResponseCode(r.status)
            if r.status == 403:
                log.warn("console: refused {method} {path} from {client}: {why}", method=request.method.decode(),
                         path=path, client=self.client(request), why=r.text)
            return self.render_page(request, session, r.title, f'<p class="error">{esc(r.text)}</p>'
                                    '<p><a href="/queues">Back to the queues</a></p>')

    # -- login -----------------------------------------------------------------------------------

    def _login_page(self, request: Any, session: Session, error: str = "") -> bytes:
        target = safe_back(self.arg(request, "next"))
        alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
        body = (f'{alert}<form method="post" action="/login" class="login">{html.csrf_field(session.csrf)}'
                f'<input type="hidden" name="next" value="{esc(target)}">'
                '<p><label for="user">User name</label>'
                '<input id="user" name="user" autocomplete="username" required autofocus></p>'
                '<p><label for="password">Password</label>'
                '<input id="password" name="password" type="password" autocomplete="current-password" required></p>'
                '<p><button type="submit">Log in</button></p></form>')
        return html.page("Log in", body, user=None, csrf="", hostname=self.hostname)

    async def login_form(self, request: Any, session: Session | None) -> bytes:
        if session is not None and session.user is not None:
            return self.redirect(request, safe_back(self.arg(request, "next")))
        if session is None:
            session = self.sessions.new()
            request.setHeader(b"Set-Cookie", cookie_header(session, self.secure))
        return self._login_page(request, session)

    async def login(self, request: Any, session: Session | None) -> bytes:
        assert session is not None                       # serve() checked the token
        user, password = self.arg(request, "user") or "", self.arg(request, "password") or ""
        client = self.client(request)
        wait = self.throttle.start(client)
        if wait is not None:
            log.warn("console: login refused for {user!r} from {client}: too many wrong passwords, "
                     "{wait:.0f}s to wait", user=user, client=client, wait=wait)
            request.setResponseCode(429)
            request.setHeader(b"Retry-After", str(int(wait + 0.999)).encode("ascii"))
            return self._login_page(request, session, f"Too many wrong passwords from your address: try again "
                                                      f"in {int(wait + 0.999)} seconds.")
        try:
            name = await self.checker.requestAvatarId(UsernamePassword(user.encode("utf-8"), password.encode("utf-8")))
        except cred_error.UnauthorizedLogin:
            log.warn("console: login refused for {user!r} from {client}: wrong user name or password",
                     user=user, client=client)
            if self.throttle.finish(client, ok=False):
                log.warn("console: {client} may not log in for {window:.0f}s: {limit} wrong passwords in "
                         "{window:.0f}s", client=client, limit=self.throttle.limit, window=self.throttle.window)
            request.setResponseCode(401)
            return self._login_page(request, session, "Wrong user name or password.")
        except UsersFileError as e:
            self.throttle.finish(client, ok=None)
            log.error("console: cannot check a login: {e}", e=e)
            request.setResponseCode(503)
            return self._login_page(request, session, "The users file cannot be read; see the gateway's log.")
        except Exception:
            self.throttle.finish(client, ok=None)
            raise
        self.throttle.finish(client, ok=True)
        fresh = self.sessions.login(session, name)
        request.setHeader(b"Set-Cookie", cookie_header(fresh, self.secure))
        log.info("console: {user} logged in from {client}", user=name, client=client)
        return self.redirect(request, safe_back(self.arg(request, "next")))

    async def logout(self, request: Any, session: Session | None) -> bytes:
        assert session is not None
        log.info("console: {user} logged out", user=session.user)
        self.sessions.end(session)
        request.setHeader(b"Set-Cookie", cookie_header(None, self.secure))
        return self.redirect(request, "/login")

    # -- the dashboard ---------------------------------------------------------------------------

    def _hours(self, request: Any) -> int:
        try:
            hours = int(self.arg(request, "hours") or 3)
        except ValueError:
            hours = 3
        return hours if hours in dashboard.PERIODS else 3

    async def _points(self, hours: int) -> list[Any]:
        if self.history is None:
            raise Reply(503, "No figures", "The dashboard's figures are not being collected.")
        return await self.history.series(hours)

    async def dashboard(self, request: Any, session: Session) -> bytes:
        hours = self._hours(request)
        body = dashboard.dashboard_body(await self._points(hours), self.now(), hours)
        return self.render_page(request, session, "Dashboard", body, "/dashboard")

    async def dashboard_json(self, request: Any, session: Session) -> bytes:
        hours = self._hours(request)
        return self.send_json(request, dashboard.dashboard_json(await self._points(hours), self.now(), hours))

    def send_json(self, request: Any, doc: dict[str, Any]) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    # -- connectors, virtual servers, diagnostics (read-only) -------------------------------------

    async def connectors(self, request: Any, session: Session) -> bytes:
        body = settings_pages.connectors_body(self.config.connectors, self.now())
        return self.render_page(request, session, "Connectors", body, "/connectors")

    async def virtual_servers(self, request: Any, session: Session) -> bytes:
        active = {}
        if self.history is not None:
            active = (await self.history.read()).active
        body = settings_pages.virtual_servers_body(self.config.virtual_servers, active)
        return self.render_page(request, session, "Virtual servers", body, "/virtual-servers")

    def _events(self, request: Any) -> tuple[str, str, str]:
        category = self.arg(request, "category") or ""
        level = self.arg(request, "level") or "maximum"
        if level not in diagnostics.LEVELS:
            level = "maximum"
        table = diagnostics.events_table(self.recorder, category or None, level)
        return category, level, table

    async def diagnostics(self, request: Any, session: Session) -> bytes:
        category, level, events = self._events(request)
        body = diagnostics.diagnostics_body(self.recorder, category, level, events, self.now())
        return self.render_page(request, session, "Diagnostics", body, "/diagnostics")

    async def diagnostics_json(self, request: Any, session: Session) -> bytes:
        _, _, events = self._events(request)
        return self.send_json(request, {"updated": dashboard.updated(self.now()), "charts": {"events": events}})

    # -- the cluster -----------------------------------------------------------------------------

    async def _cluster(self) -> dict[str, Any]:
        if not self.config.gateway.cluster.redis:
            raise Reply(404, "Not in a cluster", "This gateway is not in a cluster: gateway.cluster.redis is not set.")
        return await self.ask({"op": "cluster"})

    async def _cluster_queue(self) -> dict[str, Any] | None:
        """``smtpgw queue list --cluster``'s answer; None where the control interface has no such view."""
        listed = await self.ask({"op": "cluster_list"})
        if not listed.get("ok") and str(listed.get("error", "")).startswith("unknown op"):
            return None
        return listed

    async def cluster(self, request: Any, session: Session) -> bytes:
        answer = await self._cluster()
        body = cluster_page.cluster_body(answer, self.config.gateway.cluster.redis, self.now(),
                                         await self._cluster_queue(), session.csrf)
        return self.render_page(request, session, "Cluster", body, "/cluster")

    async def cluster_json(self, request: Any, session: Session) -> bytes:
        answer = await self._cluster()
        listed = await self._cluster_queue()
        charts = {"nodes": cluster_page.nodes_table(answer)}
        if listed is not None:
            charts["queue"] = cluster_page.queue_table(listed, self.now(), session.csrf)
        return self.send_json(request, {"updated": dashboard.updated(self.now()), "charts": charts,
                                        "nodes": answer.get("nodes") or [], "ok": bool(answer.get("ok")),
                                        "entries": (listed or {}).get("entries") or []})

    # -- the Queue Viewer ------------------------------------------------------------------------

    async def home(self, request: Any, session: Session | None) -> bytes:
        return self.redirect(request, html.NAV[0][0])

    async def _entries(self) -> list[dict[str, Any]]:
        answer = await self.ask({"op": "list"})
        if not answer.get("ok"):
            raise Reply(503, "Queue unavailable", f"The queue cannot be listed: {answer.get('error')}")
        return answer["entries"]

    async def queues(self, request: Any, session: Session) -> bytes:
        rows = destinations(self.config, await self._entries())
        body = queue_pages.queues_body(rows, self.now(), session.csrf)
        return self.render_page(request, session, "Queues", body, "/queues")

    async def messages(self, request: Any, session: Session) -> bytes:
        entries = await self._entries()
        domain = self.arg(request, "domain")
        if domain:
            entries = [e for e in entries if in_domain(e, domain)]
            title = f"Queued for {domain}"
        elif self.arg(request, "corrupt"):
            entries = [e for e in entries if e.get("corrupt")]
            title = "Damaged spool files"
        else:
            title = "Every queued message"
        back = request.uri.decode("utf-8", "replace")
        body = queue_pages.messages_body(entries, self.now(), session.csrf, safe_back(back), domain)
        return self.render_page(request, session, title, body, "/queues")

    async def message(self, request: Any, session: Session) -> bytes:
        ident = self.arg(request, "id") or ""
        answer = await self.ask({"op": "show", "id": ident})
        if not answer.get("ok"):
            raise Reply(404, "No such message", f"{answer.get('error')} (it may have been delivered or deleted).")
        body = None
        if self.arg(request, "body"):
            raw = await self.ask({"op": "cat", "id": ident})
            if raw.get("ok"):
                body = queue_pages.decode_message(raw)
            log.info("console: {user}: read the message {id}", user=session.user, id=ident)
        page = queue_pages.message_body(answer["entry"], self.now(), session.csrf, body)
        return self.render_page(request, session, f"Message {ident}", page, "/queues")

    @staticmethod
    def queue_request(op: str, ids: list[str]) -> dict[str, Any]:
        """The control request for an action on messages named by id (delete with an NDR is
        ``delete`` with ``dsn``), as ``smtpgw queue`` sends it."""
        if op in ("delete", "delete_ndr"):
            return {"op": "delete", "ids": ids, "dsn": op == "delete_ndr"}
        return {"op": op, "ids": ids}

    async def action(self, request: Any, session: Session) -> bytes:
        op = self.arg(request, "op") or ""
        back = safe_back(self.arg(request, "back"))
        if op not in OP_NAMES:
            raise Reply(400, "Bad request", f"Unknown action {op!r}.")
        ids = [i for i in self.args(request, "id") if i]
        domain = (self.arg(request, "domain") or "").strip()
        if not ids and not domain:
            session.notices.append("Select at least one message first.")
            return self.redirect(request, back)
        node = (self.arg(request, "node") or "").strip()
        target = f"ids={','.join(ids)}" if ids else f"domain={domain}"
        if node:
            if not ids:
                raise Reply(400, "Bad request", "An action on another node's queue names its messages.")
            target = "ids=" + ",".join(f"{node}:{i}" for i in ids)
            answer = await self.ask({"op": "cluster_command", "node": node, "timeout": NODE_TIMEOUT,
                                     "request": self.queue_request(op, ids)})
        elif op in ("delete", "delete_ndr"):
            if not ids:
                ids = [e["id"] for e in await self._entries() if in_domain(e, domain) and not e.get("corrupt")]
            answer = await self.ask(self.queue_request(op, ids)) if ids else {"ok": True, "results": []}
        else:
            answer = await self.ask({"op": op, "ids": ids} if ids else {"op": op, "domain": domain})
        result = outcome(op, answer)
        log.info("console: {user}: {op} {target}: {result}", user=session.user, op=op, target=target, result=result)
        session.notices.append(f"{OP_NAMES[op]}: {result}.")
        if op in ("delete", "delete_ndr") and back.startswith("/message?") and not node:
            back = "/queues"                     # its page is gone with it
        return self.redirect(request, back)


class ConsoleReload:
    """SIGHUP (``smtpgw_reload``): the console's certificate and key read again -- renewed files at
    the same paths, or the new paths the reload applied; a problem is logged and the old ones kept.
    (The users file needs nothing here: :attr:`Console.checker` follows the configuration.)"""

    def __init__(self, console: Console) -> None:
        self.console = console

    @hookimpl
    def smtpgw_reload(self, config: Config) -> None:
        tls = self.console.tls
        if tls is not None:
            settings = config.gateway.console.tls
            if settings.certificate and settings.key:
                tls.certificate, tls.key = settings.certificate, settings.key
            tls.reload(self.console.reactor)


class ConsoleResource(Resource):
    """Every path, answered by :meth:`Console.serve`."""

    isLeaf = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def render(self, request: Any) -> int:
        finished = request.notifyFinish()
        finished.addErrback(lambda _: None)          # the browser went away: nothing to write to

        def write(body: bytes) -> None:
            if not finished.called:
                if request.method != b"HEAD":
                    request.write(body)
                request.finish()

        def failed(failure: Any) -> None:
            log.failure("console: {path} failed", failure, path=request.path)
            if not finished.called:
                request.setResponseCode(500)
                request.write(b"internal error: see the gateway's log\n")
                request.finish()

        defer.Deferred.fromCoroutine(self.console.serve(request)).addCallbacks(write, failed)
        return NOT_DONE_YET


class ConsoleSite(Site):
    """No access log (pages poll; actions are logged with the user's name instead); says where it
    listens once it does."""

    noisy = False
    displayTracebacks = False

    def __init__(self, console: Console, url: str) -> None:
        super().__init__(ConsoleResource(console))
        self.url = url

    def log(self, request: Any) -> None:
        pass

    def startFactory(self) -> None:
        super().startFactory()
        log.info("console listening on {url}", url=self.url)


def console_service(gateway: Any, control: Any, reactor: Any, read: Reader | None = None) -> service.Service:
    """The console for ``gateway.console`` (worker 0 only): its listener and, given ``read`` (the
    gateway's figures, :func:`mta.console.history.reader`), the dashboard's sampling."""
    from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint

    settings = gateway.config.gateway.console
    host, port = settings.listen
    tls = settings.tls.certificate is not None
    top = service.MultiService()
    history = None
    if read is not None:
        history = History(read, reactor)
        history.setServiceParent(top)
    console = Console(gateway, control, secure=tls, history=history, recorder=diagnostics.recorder(gateway))
    gateway.hooks.register(ConsoleReload(console), name="console-reload")
    shown = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    site = ConsoleSite(console, f"{'https' if tls else 'http'}://{shown}:{port}/")
    if tls:
        console.tls = ServerTLS(settings.tls.certificate, settings.tls.key, "console")
        endpoint = SSL4ServerEndpoint(reactor, port, console.tls, interface=host)
    elif ipaddress.ip_address(host).version == 6:
        endpoint = TCP6ServerEndpoint(reactor, port, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=host)
    svc = internet.StreamServerEndpointService(endpoint, site)
    svc._raiseSynchronously = True            # a port in use stops startup with a clear error
    svc.setName(f"console {host}:{port}")
    svc.setServiceParent(top)
    top.console = console
    return top


def check_console_files(config: Config) -> None:
    """At start-up: the console's users file parses and its certificate and key load (else a
    config error naming the key, before anything listens)."""
    settings = config.gateway.console
    if not settings.enabled:
        return
    try:
        read_users(settings.users)
    except UsersFileError as e:
        raise ConfigError("gateway.console.users", str(e)) from None
    if settings.tls.certificate and settings.tls.key:
        try:
            server_context(settings.tls.certificate, settings.tls.key)
        except TLSFileError as e:
            raise ConfigError(f"gateway.console.tls.{e.which}", e.problem) from None
