"""The TLS-RPT part of ``smtpgw dns-check DOMAIN``: the domain's ``_smtp._tls`` TXT record (RFC 8460 3)
and the report addresses senders would use, read with the same parser the gateway's own reporter uses
(:func:`mta.delivery.tls_report_send.report_addresses`), so what is shown is what would be sent to."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from mta.delivery.tls_report_send import RecordError, report_addresses

Query = Callable[[str, str], tuple[str, Any]]       # mta.cli.dns.Lookup.query


@dataclass
class TlsRptReport:
    name: str
    records: list[str] = field(default_factory=list)    # the v=TLSRPTv1 TXT records found
    rua: list[str] = field(default_factory=list)        # the usable report addresses
    error: str = ""                                     # why no report would be sent

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "records": self.records, "rua": self.rua, "error": self.error}


def check_tls_rpt(domain: str, query: Query) -> TlsRptReport:
    report = TlsRptReport(f"_smtp._tls.{domain}")
    kind, answer = query(report.name, "TXT")
    if kind == "error":
        report.error = answer
        return report
    texts = [b"".join(r.strings).decode("utf-8", "replace") for r in answer] if kind == "ok" else []
    report.records = [t for t in texts if t.strip().lower().replace(" ", "").startswith("v=tlsrptv1")]
    try:
        report.rua = report_addresses(texts)
    except RecordError as e:
        report.error = str(e)
    return report


def format_tls_rpt(report: TlsRptReport) -> list[str]:
    if not report.records and not report.error:
        return [f"TLS-RPT: none published (no v=TLSRPTv1 TXT record at {report.name}): senders send no reports"]
    lines = [f"TLS-RPT: {report.name} TXT \"{r}\"" for r in report.records] or [f"TLS-RPT: {report.name}"]
    if report.error:
        lines.append(f"  not usable: {report.error}; senders send no reports")
    else:
        lines += [f"  reports go to {uri}" for uri in report.rua]
    return lines


__all__ = ["TlsRptReport", "check_tls_rpt", "format_tls_rpt"]
