"""Sending TLS reports (RFC 8460): each closed period's counts, one gzipped JSON report per policy
domain, to every ``rua`` of the domain's ``_smtp._tls`` TXT record.

The record (RFC 8460 3) is ``v=TLSRPTv1; rua=mailto:tlsrpt@example.com,https://reports.example.com/tlsrpt``
looked up through the gateway's resolver. For each address:

* ``mailto:`` -- a message through this gateway's own queue (so it is retried like any mail), shaped
  as RFC 8460 5.3 says: ``TLS-Report-Domain``, ``TLS-Report-Submitter``, ``multipart/report;
  report-type="tlsrpt"`` with a short text part and the report as ``application/tlsrpt+gzip``. It is
  sent from the null sender (a bounce of a report goes nowhere, as for DSNs) and carries
  ``TLS-Required: No`` (RFC 8689), so a destination whose TLS is broken still gets the report that
  says so (RFC 8460 5.3), and that delivery is not itself counted.
* ``https:`` -- a POST of the gzipped report with ``Content-Type: application/tlsrpt+gzip`` through
  Twisted's Agent (never blocking), the host resolved through the gateway's resolver and its
  certificate checked against ``gateway.mta_sts.ca_file`` plus the system store. A 2xx is success.

A domain without a usable record gets no report: its counts are dropped with one log line. An
address the report could not reach (a POST answered with an error, no connection, a timeout; a
mail that could not be queued) gets the same report again at the next interval: its counts are
kept in ``<spool>/tls-rpt/retry-*.json`` with the report's id (the receiver can tell a repeat), one
log line says so, and after :data:`MAX_ATTEMPTS` tries the report is given up, with one line too.
Worker 0 sends, for the files of every worker.
"""
from __future__ import annotations

import gzip
import io
import json
import time
import uuid
from email import policy as email_policy
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import unquote

from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from twisted.web.http_headers import Headers

from mta.delivery.nexthops import DNSError
from mta.delivery.sts_fetch import Discard, VerifiedHttpsClient, agent_error
from mta.delivery.tls_report import (build_report, by_domain, merge_periods, read_closed, read_retries, remove_files,
                                     retry_path, write_period)

log = Logger(namespace="smtpgw.tls-rpt")

MEDIA_TYPE = "application/tlsrpt+gzip"
POST_TIMEOUT = 60.0
CONNECT_TIMEOUT = 20.0
WORKERS_GRACE = 5.0         # seconds worker 0 waits after a period ends for the others to close theirs
USER_AGENT = b"smtpgw TLS-RPT"
MAX_ATTEMPTS = 5            # tries of one report at one address, one per interval


class RecordError(ValueError):
    """A ``_smtp._tls`` TXT record that cannot be used; the text says why."""


def report_addresses(records: list[str]) -> list[str]:
    """The ``rua`` URIs of the ``v=TLSRPTv1`` record among ``records``; [] when there is none.

    More than one such record, or one without a usable ``rua``, raises :class:`RecordError`
    (RFC 8460 3: the sender then sends no report)."""
    found = [r for r in records if r.strip().replace(" ", "").lower().startswith("v=tlsrptv1;")
             or r.strip().lower() == "v=tlsrptv1"]
    if not found:
        return []
    if len(found) > 1:
        raise RecordError("more than one v=TLSRPTv1 record")
    fields: dict[str, str] = {}
    for part in found[0].split(";")[1:]:
        name, eq, value = part.partition("=")
        if eq:
            fields.setdefault(name.strip().lower(), value.strip())
    uris = [u.strip() for u in fields.get("rua", "").split(",") if u.strip()]
    usable = [u for u in uris if u.lower().startswith(("mailto:", "https://"))]
    if not usable:
        raise RecordError("no mailto: or https: address in rua")
    return usable


def mailto_address(uri: str) -> str:
    """``mailto:a@b.example?subject=x`` -> ``a@b.example``."""
    return unquote(uri[len("mailto:"):].split("?", 1)[0]).strip()


def report_file_name(submitter: str, domain: str, begin: float, end: float, unique: str) -> str:
    """RFC 8460 5.3's ``sender!policy-domain!begin!end!unique-id.json.gz``."""
    return f"{submitter}!{domain}!{int(begin)}!{int(end)}!{unique}.json.gz"


def report_message(report: dict[str, Any], gz: bytes, file_name: str, submitter: str, sender: str,
                   to: str, when: float) -> bytes:
    """The report as mail (RFC 8460 5.3), CRLF line ends."""
    domain = report["policies"][0]["policy"]["policy-domain"] if report["policies"] else ""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Date"] = format_datetime(datetime.fromtimestamp(when, timezone.utc))
    msg["Subject"] = f"Report Domain: {domain} Submitter: {submitter} Report-ID: <{report['report-id']}>"
    msg["Message-ID"] = make_msgid(domain=submitter)
    msg["TLS-Report-Domain"] = domain
    msg["TLS-Report-Submitter"] = submitter
    msg["TLS-Required"] = "No"
    msg.set_content(f"This is an aggregate TLS report (RFC 8460) from {submitter} for {domain}, "
                    f"{report['date-range']['start-datetime']} to {report['date-range']['end-datetime']}.\n")
    maintype, subtype = MEDIA_TYPE.split("/")
    msg.add_attachment(gz, maintype=maintype, subtype=subtype, filename=file_name)
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; '
                       f'boundary="{msg.get_boundary()}"')
    return msg.as_bytes(policy=email_policy.SMTP)


class ReportPoster(VerifiedHttpsClient):
    """POSTs reports to ``https:`` addresses."""

    def __init__(self, reactor: Any, resolver: Any, ca_file: str | None = None,
                 timeout: float = POST_TIMEOUT, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        super().__init__(reactor, resolver, ca_file, timeout, connect_timeout)

    def post(self, url: str, body: bytes) -> defer.Deferred:
        """Fires with None on a 2xx, else fails with an exception whose text says why."""
        d = defer.Deferred.fromCoroutine(self._post(url, body))
        d.addTimeout(self.timeout, self.reactor)
        return d

    async def _post(self, url: str, body: bytes) -> None:
        headers = Headers({b"Content-Type": [MEDIA_TYPE.encode()], b"User-Agent": [USER_AGENT]})
        try:
            response = await self._agent.request(b"POST", url.encode("ascii"), headers,
                                                 FileBodyProducer(io.BytesIO(body)))
        except defer.CancelledError:
            raise
        except Exception as e:
            raise RuntimeError(agent_error(e)) from None
        response.deliverBody(Discard())
        if not 200 <= response.code < 300:
            raise RuntimeError(f"HTTP {response.code}")


class TlsReporter:
    """Worker 0's: sends the closed periods of every worker (see the module's docstring)."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway
        self.reactor = gateway.reactor
        self.counter = gateway.tls_reports
        config = gateway.config.gateway
        self.directory = config.tls_rpt_directory
        self.poster = ReportPoster(self.reactor, gateway.resolver, config.mta_sts.ca_file)
        self._sending: defer.Deferred = defer.succeed(None)
        self._grace = WORKERS_GRACE if gateway.worker.many else 0.0

    @property
    def settings(self) -> Any:
        return self.gateway.config.gateway.tls_rpt

    @property
    def submitter(self) -> str:
        return self.gateway.config.gateway.hostname

    def start(self) -> None:
        """Send what a previous run closed but did not send; then after each period's end."""
        self.counter.on_close.append(self._closed)
        self.send_closed()

    def _closed(self, written: defer.Deferred) -> None:
        written.addCallback(lambda _: task.deferLater(self.reactor, self._grace, self.send_closed))

    def send_closed(self) -> defer.Deferred:
        """Send every closed period's reports; fires with one result per (domain, address).
        Sends do not overlap: a call during one waits for it."""
        done: defer.Deferred = defer.Deferred()

        def run(_: Any) -> defer.Deferred:
            d = defer.Deferred.fromCoroutine(self._send_closed())
            d.addErrback(lambda f: (log.failure("TLS-RPT: sending reports failed", f), [])[1])
            d.addCallback(lambda results: (done.callback(results), None)[1])
            return d

        self._sending.addCallback(run)
        return done

    def _thread(self, f: Any, *args: Any) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    async def _send_closed(self) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for path, saved in await self._thread(read_retries, self.directory):     # last interval's failures
            results += await self._send_again(path, saved)
        files = await self._thread(read_closed, self.directory)
        if not files:
            return results
        period = merge_periods(p for _, p in files if p is not None)
        for domain, entries in sorted(by_domain(period).items()):
            results += await self._send_domain(domain, entries, period["begin"], period["end"] or time.time())
        await self._thread(remove_files, [path for path, _ in files])
        return results

    async def _send_again(self, path: str, saved: dict[str, Any] | None) -> list[dict[str, Any]]:
        """A report that some addresses did not get last time: to those, with its own id."""
        retry = (saved or {}).get("retry") or {}
        try:
            domain, uris, report_id, unique = retry["domain"], list(retry["uris"]), retry["report_id"], retry["unique"]
            attempts = int(retry["attempts"])
            entries = list(saved["policies"].values())
            begin, end = float(saved["begin"]), float(saved["end"])
        except (KeyError, TypeError, ValueError, AttributeError):
            log.warn("TLS-RPT: {path} is not a report to send again; removed", path=path)
            await self._thread(remove_files, [path])
            return []
        return await self._send_domain(domain, entries, begin, end, (uris, report_id, unique, attempts, path))

    async def _send_domain(self, domain: str, entries: list[dict[str, Any]], begin: float, end: float,
                           again: tuple[list[str], str, str, int, str] | None = None) -> list[dict[str, Any]]:
        sessions = sum(e["success"] + e["failure"] for e in entries)
        if again is not None:
            addresses, report_id, unique, attempts, retry_path = again
        else:
            try:
                addresses = report_addresses(await self.gateway.resolver.txt(f"_smtp._tls.{domain}"))
            except (DNSError, RecordError) as e:
                why = e.reply.text if isinstance(e, DNSError) else str(e)
                log.warn("TLS-RPT: _smtp._tls.{domain}: {why}; the report on {n} sessions is not sent",
                         domain=domain, why=why, n=sessions)
                return [{"domain": domain, "rua": None, "result": f"not sent: {why}"}]
            if not addresses:
                log.info("TLS-RPT: {domain} publishes no _smtp._tls record; the report on {n} sessions is not "
                         "sent", domain=domain, n=sessions)
                return [{"domain": domain, "rua": None, "result": "not sent: no _smtp._tls record"}]
            unique = uuid.uuid4().hex[:12]
            report_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(begin))}.{unique}@{self.submitter}"
            attempts, retry_path = 0, None
        settings = self.settings
        report = build_report(entries, begin, end, settings.organization or self.submitter,
                              settings.contact or self.gateway.config.gateway.postmaster, report_id)
        gz = gzip.compress(json.dumps(report).encode("utf-8"), mtime=0)
        name = report_file_name(self.submitter, domain, begin, end, unique)
        results, failed = [], []
        attempts += 1
        for uri in addresses:
            try:
                if uri.lower().startswith("mailto:"):
                    queued = await self._mail(report, gz, name, mailto_address(uri))
                    result = f"queued as {queued}"
                else:
                    await self.poster.post(uri, gz)
                    result = "posted"
            except Exception as e:
                why = " ".join((str(e) or type(e).__name__).split())       # one line, whatever it said
                result = f"failed: {why}"
                failed.append(uri)
                then = (f"sent again at the next interval (attempt {attempts} of {MAX_ATTEMPTS})"
                        if attempts < MAX_ATTEMPTS else f"given up after {attempts} attempts")
                log.warn("TLS-RPT: report {id} for {domain} ({n} sessions) to {uri} failed: {why}; {then}",
                         id=report_id, domain=domain, n=sessions, uri=uri, why=why, then=then)
            else:
                log.info("TLS-RPT: report {id} for {domain} ({n} sessions) to {uri}: {result}", id=report_id,
                         domain=domain, n=sessions, uri=uri, result=result)
            results.append({"domain": domain, "rua": uri, "report_id": report_id, "result": result})
        await self._keep_for_retry(domain, entries, begin, end, failed if attempts < MAX_ATTEMPTS else [],
                                   report_id, unique, attempts, retry_path)
        return results

    async def _keep_for_retry(self, domain: str, entries: list[dict[str, Any]], begin: float, end: float,
                              uris: list[str], report_id: str, unique: str, attempts: int,
                              old: str | None) -> None:
        """Save the report's counts for the addresses it did not reach (written before the closed
        files are removed: a crash in between sends a report twice, never loses it)."""
        if uris:
            saved = {"begin": begin, "end": end,
                     "policies": {str(i): entry for i, entry in enumerate(entries)},
                     "retry": {"domain": domain, "uris": uris, "report_id": report_id, "unique": unique,
                               "attempts": attempts}}
            await self._thread(write_period, retry_path(self.directory, domain, unique), saved)
        elif old is not None:
            await self._thread(remove_files, [old])

    async def _mail(self, report: dict[str, Any], gz: bytes, name: str, to: str) -> str:
        if "@" not in to or any(c in to for c in "\r\n<> "):
            raise ValueError(f"not a mail address: {to!r}")
        settings = self.settings
        contact = settings.contact or ""
        sender = contact[len("mailto:"):] if contact.lower().startswith("mailto:") else contact
        if "@" not in sender:
            sender = self.gateway.config.gateway.postmaster
        data = report_message(report, gz, name, self.submitter, sender, to, self.reactor.seconds())
        return await self.gateway.queue.inject("", [to], data)


__all__ = ["MAX_ATTEMPTS", "MEDIA_TYPE", "RecordError", "ReportPoster", "TlsReporter", "mailto_address", "report_addresses",
           "report_file_name", "report_message"]
