"""TLS reporting (RFC 8460): the outcome of every TLS session a destination's policy governs, counted
per policy domain, kept across restarts, and turned into the aggregate JSON report of RFC 8460 4.

What counts a session: delivery calls :meth:`TlsReportCounter.record` once per SMTP transaction over
a route a published policy governs (an MTA-STS policy in ``enforce`` or ``testing`` mode,
:mod:`mta.delivery.tls_policy`; DANE's TLSA records, policy type ``tlsa``), with ``success`` or the
failure's RFC 8460 result type (``starttls-not-supported``, ``certificate-host-mismatch``, ...).
Sessions without a policy are not counted (RFC 8460 reports on policies, not on opportunistic TLS).

Durability: with ``gateway.tls_rpt.enabled`` the counts of the period under way are written to
``<spool>/tls-rpt/current-<worker>.json`` (write, fsync, rename, in a thread, at most once a second),
and loaded again at start. At the end of each period (``interval``, aligned to the Unix epoch, so
``1d`` is the UTC day RFC 8460 asks for) each worker closes its counts into a
``closed-<begin>-<worker>-<n>.json`` file, which worker 0's reporter (:mod:`mta.delivery.tls_report_send`)
sends and removes. Without ``enabled`` nothing is written, and the counts only feed the metrics.

The counts also keep, since the process started, the failures per policy domain, policy type and
result type: the ``smtpgw_tls_policy_failures_total`` series of :mod:`mta.ops.metrics`.
"""
from __future__ import annotations

import glob
import json
import math
import os
import time
from typing import Any, Iterable, Sequence

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mta.spool.files import sync_directory, write_synced

log = Logger(namespace="smtpgw.tls-rpt")

SUCCESS = "success"
RESULT_TYPES = ("starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")
POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
FLUSH_DELAY = 1.0                   # seconds between a count and its write to disk, at most
MAX_FAILURE_DETAILS = 100           # per policy and period: distinct (type, host, ip, text) kept


# -- a period's counts, as plain JSON-able dicts ----------------------------------------------------

def empty_period(begin: float) -> dict[str, Any]:
    """``{"begin", "end", "policies": {key: POLICY}}``; POLICY holds the RFC 8460 ``policy`` object,
    ``success`` and ``failure`` counts and ``failures`` (failure details by their own key)."""
    return {"begin": begin, "end": None, "policies": {}}


def policy_mx_hosts(policy_type: str, policy_string: Sequence[str], mx_host: str) -> list[str]:
    """The policy's ``mx-host`` field: an MTA-STS policy's ``mx:`` patterns, else the MX host."""
    if policy_type == "sts":
        return [line.split(":", 1)[1].strip() for line in policy_string
                if line.split(":", 1)[0].strip().lower() == "mx" and ":" in line]
    return [mx_host] if mx_host else []


def policy_object(policy_domain: str, policy_type: str, policy_string: Sequence[str],
                  mx_hosts: list[str]) -> dict[str, Any]:
    """RFC 8460 4.4's ``policy``: ``no-policy-found`` has no policy string nor MX patterns, so those
    fields are left out rather than sent empty."""
    policy: dict[str, Any] = {"policy-type": policy_type}
    if policy_string:
        policy["policy-string"] = list(policy_string)
    policy["policy-domain"] = policy_domain
    if mx_hosts:
        policy["mx-host"] = mx_hosts
    return policy


def add_session(period: dict[str, Any], policy_domain: str, policy_type: str, policy_string: Sequence[str],
                mx_host: str, result: str, sending_ip: str | None = None, receiving_ip: str | None = None,
                additional_information: str | None = None, count: int = 1) -> None:
    mx_hosts = policy_mx_hosts(policy_type, policy_string, mx_host)
    key = json.dumps([policy_domain, policy_type, list(policy_string), mx_hosts])
    entry = period["policies"].get(key)
    if entry is None:
        entry = period["policies"][key] = {"policy": policy_object(policy_domain, policy_type, policy_string,
                                                                   mx_hosts),
                                           "success": 0, "failure": 0, "failures": {}}
    if result == SUCCESS:
        entry["success"] += count
        return
    entry["failure"] += count
    detail = {"result-type": result, "sending-mta-ip": sending_ip, "receiving-mx-hostname": mx_host or None,
              "receiving-ip": receiving_ip, "additional-information": additional_information}
    detail = {k: v for k, v in detail.items() if v}
    dkey = json.dumps(detail, sort_keys=True)
    found = entry["failures"].get(dkey)
    if found is None:
        if len(entry["failures"]) >= MAX_FAILURE_DETAILS:   # a flood of distinct texts: keep the type
            detail = {"result-type": result}
            dkey = json.dumps(detail, sort_keys=True)
            found = entry["failures"].get(dkey)
        if found is None:
            found = entry["failures"][dkey] = {**detail, "failed-session-count": 0}
    found["failed-session-count"] += count


def merge_periods(periods: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """One period adding up several (workers' files, or files of several periods): the earliest
    begin, the latest end."""
    out: dict[str, Any] = {"begin": None, "end": None, "policies": {}}
    for period in periods:
        begin, end = period.get("begin"), period.get("end")
        if begin is not None:
            out["begin"] = begin if out["begin"] is None else min(out["begin"], begin)
        if end is not None:
            out["end"] = end if out["end"] is None else max(out["end"], end)
        for key, entry in period.get("policies", {}).items():
            mine = out["policies"].setdefault(key, {"policy": entry["policy"], "success": 0, "failure": 0,
                                                    "failures": {}})
            mine["success"] += entry["success"]
            mine["failure"] += entry["failure"]
            for dkey, detail in entry["failures"].items():
                have = mine["failures"].setdefault(dkey, {**detail, "failed-session-count": 0})
                have["failed-session-count"] += detail["failed-session-count"]
    return out


def by_domain(period: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The period's policy entries grouped by policy domain (one report per domain)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in period["policies"].values():
        out.setdefault(entry["policy"]["policy-domain"], []).append(entry)
    return out


def rfc3339(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def build_report(entries: list[dict[str, Any]], begin: float, end: float, organization: str, contact: str,
                 report_id: str) -> dict[str, Any]:
    """The aggregate report of RFC 8460 4 for one policy domain."""
    policies = []
    for entry in entries:
        item: dict[str, Any] = {
            "policy": entry["policy"],
            "summary": {"total-successful-session-count": entry["success"],
                        "total-failure-session-count": entry["failure"]}}
        if entry["failures"]:
            item["failure-details"] = sorted(entry["failures"].values(),
                                             key=lambda d: (-d["failed-session-count"], d["result-type"]))
        policies.append(item)
    return {"organization-name": organization,
            "date-range": {"start-datetime": rfc3339(begin), "end-datetime": rfc3339(end)},
            "contact-info": contact, "report-id": report_id, "policies": policies}


def summary_rows(period: dict[str, Any]) -> list[dict[str, Any]]:
    """``smtpgw tls-rpt show``: one row per policy, with its failures by result type."""
    rows = []
    for entry in period["policies"].values():
        failures: dict[str, int] = {}
        for detail in entry["failures"].values():
            failures[detail["result-type"]] = failures.get(detail["result-type"], 0) + detail["failed-session-count"]
        p = entry["policy"]
        rows.append({"policy_domain": p["policy-domain"], "policy_type": p["policy-type"],
                     "mx_host": p.get("mx-host", []), "successful": entry["success"], "failed": entry["failure"],
                     "failures": failures})
    rows.sort(key=lambda r: (r["policy_domain"], r["policy_type"], r["mx_host"]))
    return rows


# -- the files (blocking: called in threads, or by the CLI on a stopped gateway) ----------------------

def current_path(directory: str, worker: int) -> str:
    return os.path.join(directory, f"current-{worker}.json")


def write_period(path: str, period: dict[str, Any]) -> None:
    """Write-sync-rename, then sync the folder: a crash leaves the old counts or the new."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o750, exist_ok=True)
    write_synced(f"{path}.{os.getpid()}.tmp", path, [json.dumps(period).encode("utf-8")])
    sync_directory(directory)


def read_period(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("policies"), dict):
        return None
    return data


def read_current(directory: str) -> list[dict[str, Any]]:
    """Every worker's counts of the period under way (``smtpgw tls-rpt show`` on a stopped gateway)."""
    found = (read_period(p) for p in sorted(glob.glob(os.path.join(directory, "current-*.json"))))
    return [p for p in found if p is not None]


def read_closed(directory: str) -> list[tuple[str, dict[str, Any] | None]]:
    """The closed periods waiting to be reported: (path, counts; None for an unreadable file)."""
    return [(path, read_period(path)) for path in sorted(glob.glob(os.path.join(directory, "closed-*.json")))]


def retry_path(directory: str, domain: str, unique: str) -> str:
    """Where a report some addresses did not get waits for the next interval."""
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in domain)[:200]
    return os.path.join(directory, f"retry-{safe}-{unique}.json")


def read_retries(directory: str) -> list[tuple[str, dict[str, Any] | None]]:
    """The reports waiting to be sent again (:mod:`mta.delivery.tls_report_send`)."""
    return [(path, read_period(path)) for path in sorted(glob.glob(os.path.join(directory, "retry-*.json")))]


def remove_files(paths: Iterable[str]) -> None:
    directory = None
    for path in paths:
        try:
            os.unlink(path)
            directory = os.path.dirname(path)
        except FileNotFoundError:
            pass
    if directory is not None:
        sync_directory(directory)


# -- the counter ------------------------------------------------------------------------------------

class TlsReportCounter:
    """One per gateway process. :meth:`record` is all delivery (MTA-STS, DANE) needs; it never blocks."""

    def __init__(self, reactor: Any, directory: str | None = None, interval: float = 86400.0,
                 worker: int = 0) -> None:
        """``directory`` None: counts in memory only (``gateway.tls_rpt`` off: metrics only)."""
        self.reactor = reactor
        self.directory = directory
        self.interval = interval
        self.worker = worker
        self.period = empty_period(self._period_start(reactor.seconds()))
        self.failures_total: dict[tuple[str, str, str], int] = {}   # (domain, type, result) since start
        self.sessions_total: dict[tuple[str, str, str], int] = {}   # (domain, type, success|failure)
        self._flush_timer: Any = None
        self._boundary_timer: Any = None
        self._writes: defer.Deferred = defer.succeed(None)         # file writes, one after the other
        self._closed_n = 0
        self.on_close: list[Any] = []       # at each period's end, called with the Deferred of its
                                            # file's writing (worker 0's reporter then sends)

    @property
    def durable(self) -> bool:
        return self.directory is not None

    def _period_start(self, now: float) -> float:
        return math.floor(now / self.interval) * self.interval

    # -- counting ---------------------------------------------------------------------------------

    def record(self, policy_domain: str, policy_type: str, policy_string: Sequence[str], mx_host: str,
               result: str, failure_type: str | None = None, sending_ip: str | None = None,
               receiving_ip: str | None = None, additional_information: str | None = None) -> None:
        """One policy-governed TLS session: ``result`` is ``success`` or ``failure``; a failure's
        ``failure_type`` is one of :data:`RESULT_TYPES` (default ``validation-failure``).

        ``policy_type``: ``sts`` (``policy_string``: the policy file's lines) or ``tlsa``
        (``policy_string``: the TLSA records in presentation form, ``mx_host``: the MX they are for).
        ``mx_host``: the MX host name the session was with; ``receiving_ip`` its address."""
        domain = policy_domain.lower().rstrip(".")
        outcome = SUCCESS if result == SUCCESS else (failure_type or "validation-failure")
        add_session(self.period, domain, policy_type, policy_string, (mx_host or "").lower().rstrip("."),
                    outcome, sending_ip, receiving_ip, additional_information)
        self.period["updated"] = self.reactor.seconds()
        kind = "success" if outcome == SUCCESS else "failure"
        self.sessions_total[(domain, policy_type, kind)] = self.sessions_total.get((domain, policy_type, kind), 0) + 1
        if outcome != SUCCESS:
            key = (domain, policy_type, outcome)
            self.failures_total[key] = self.failures_total.get(key, 0) + 1
        self._dirty()

    def observe(self, outcome: Any) -> None:
        """A DANE-governed session (:class:`mta.delivery.dane.Outcome`: ``policy_domain``,
        ``policy_type``, ``policy_strings``, ``mx_host``, ``result``, ``detail``)."""
        success = outcome.result == SUCCESS
        self.record(outcome.policy_domain, outcome.policy_type, list(outcome.policy_strings), outcome.mx_host,
                    SUCCESS if success else "failure", None if success else outcome.result,
                    additional_information=None if success else (outcome.detail or None))

    def observe_sts_fetch(self, domain: str, result: str, detail: str, in_force: Any) -> None:
        """A failed MTA-STS policy fetch (:attr:`mta.delivery.mta_sts.MtaSts.observers`): one failed
        session of that result type, under the policy still in force (``in_force``, a
        :class:`mta.delivery.sts_policy.Policy`) or as ``no-policy-found`` when none is."""
        if in_force is not None:
            self.record(domain, "sts", in_force.report_strings(), "", "failure", result,
                        additional_information=detail)
        else:
            self.record(domain, "no-policy-found", [], "", "failure", result, additional_information=detail)

    def snapshot(self) -> dict[str, Any]:
        """The period under way (a copy, JSON-able)."""
        return json.loads(json.dumps(self.period))

    # -- keeping the counts ------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Load the counts a previous run left (a period already over is closed at once) and start
        closing periods at their ends. Fires when loaded."""
        if not self.durable:
            return defer.succeed(None)
        d = self._thread(read_period, current_path(self.directory, self.worker))
        d.addCallback(self._loaded)
        d.addErrback(lambda f: log.failure("TLS-RPT: cannot read the saved counts", f))
        d.addCallback(lambda _: self._arm())
        return d

    def _loaded(self, saved: dict[str, Any] | None) -> defer.Deferred | None:
        if saved is None or not saved["policies"]:
            return None
        begin = float(saved.get("begin") or self.period["begin"])
        if self._period_start(begin) < self.period["begin"]:     # it ended while we were stopped
            # (or ``interval`` was shortened): it ends when its period did, or at its last count
            saved["end"] = min(max(self._period_start(begin) + self.interval, float(saved.get("updated") or 0)),
                               self.reactor.seconds())
            log.info("TLS-RPT: counts from {begin} (before the restart) closed for reporting", begin=rfc3339(begin))
            return self._write_closed(saved)
        merged = merge_periods([saved, self.period])
        merged["begin"], merged["end"] = min(begin, self.period["begin"]), None
        self.period = merged
        self._dirty()
        return None

    def _arm(self) -> None:
        if self._boundary_timer is not None and self._boundary_timer.active():
            self._boundary_timer.cancel()
        now = self.reactor.seconds()
        end = self._period_start(now) + self.interval
        self._boundary_timer = self.reactor.callLater(max(0.0, end - now), self._boundary, end)

    def _boundary(self, end: float) -> None:
        self._boundary_timer = None
        written = self.close(end)
        for callback in list(self.on_close):
            callback(written)
        self._arm()

    def close(self, end: float | None = None) -> defer.Deferred:
        """End the period under way now (or at ``end``): its counts go to a closed file for the
        reporter, and a new period starts. Fires once the file is written (None with nothing to close)."""
        if end is None:
            end = self.reactor.seconds()
        period, self.period = self.period, empty_period(end)
        period["end"] = end
        if not self.durable:
            return defer.succeed(None)
        return self._write_closed(period) if period["policies"] else self._queue_write(self._write_current)

    def _write_closed(self, period: dict[str, Any]) -> defer.Deferred:
        self._closed_n += 1
        name = f"closed-{int(period['begin'])}-{self.worker}-{os.getpid()}-{self._closed_n}.json"
        path = os.path.join(self.directory, name)

        def write() -> defer.Deferred:
            d = self._thread(write_period, path, period)
            d.addCallback(lambda _: self._write_current())
            return d

        return self._queue_write(write)

    def _dirty(self) -> None:
        if self.durable and (self._flush_timer is None or not self._flush_timer.active()):
            self._flush_timer = self.reactor.callLater(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        self._queue_write(self._write_current)

    def _write_current(self) -> defer.Deferred:
        return self._thread(write_period, current_path(self.directory, self.worker), self.snapshot())

    def _queue_write(self, write: Any) -> defer.Deferred:
        """Writes run one after the other (a later snapshot never lands before an earlier one)."""
        done: defer.Deferred = defer.Deferred()

        def run(_: Any) -> defer.Deferred:
            d = defer.maybeDeferred(write)
            d.addErrback(lambda f: log.failure("TLS-RPT: cannot write the counts under {dir}", f,
                                               dir=self.directory))
            d.addBoth(lambda r: done.callback(None))
            return d

        self._writes.addCallback(run)
        return done

    def flush(self) -> defer.Deferred:
        """Write the counts now (at shutdown)."""
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        self._flush_timer = None
        return self._queue_write(self._write_current) if self.durable else defer.succeed(None)

    def stop(self) -> defer.Deferred:
        if self._boundary_timer is not None and self._boundary_timer.active():
            self._boundary_timer.cancel()
        self._boundary_timer = None
        return self.flush()

    def _thread(self, f: Any, *args: Any) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)


__all__ = ["RESULT_TYPES", "POLICY_TYPES", "SUCCESS", "TlsReportCounter", "add_session", "build_report",
           "by_domain", "merge_periods", "policy_object", "read_closed", "read_current", "read_retries", "remove_files",
           "retry_path", "rfc3339", "summary_rows", "write_period"]
