"""TLS reporting (RFC 8460), end to end on loopback: dnsmasq serves the MX, A, ``_mta-sts`` and
``_smtp._tls`` records; the HTTPS server with a trustme certificate serves sts.test's MTA-STS policy
and takes the POSTed reports for ``https://reports.test/tlsrpt``; an SMTP peer stands for
reports.test's MX and receives the ``mailto:`` report; the MX hosts of sts.test are a peer without
STARTTLS (a failed session under the enforce policy) and one with a right certificate (a success).
The gateway is the real twistd process; ``smtpgw tls-rpt`` is the installed console script."""
from __future__ import annotations

import email
import email.policy
import gzip
import json
import signal
import smtplib
import subprocess
import urllib.request

import pytest
import trustme

from dnsfixture import DNSServer
from gwprocess import GatewayProcess, base_config, wait_until
from httpsfixture import PolicyServer, policy
from peers import DEFAULT_EXTENSIONS
from test_cli_queue import smtpgw_command
from test_mta_sts import config as sts_config, send
from test_protocol_log import parse_w3c
from tlsfixture import server_context
from mta.config import ConfigError, parse_config
from mta.delivery.tls_report import add_session, build_report, empty_period, merge_periods
from mta.delivery.tls_report_send import RecordError, report_addresses
from mta.smtp.client.policy import tls_failure_type

HTTPS = "127.0.0.241"
PLAIN_MX, TLS_MX = "127.0.0.242", "127.0.0.243"
REPORTS_MX = "127.0.0.244"
METRICS = ("127.0.0.240", 9131)
RUA = "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,https://reports.test/tlsrpt"


# -- the pieces --------------------------------------------------------------------------------------

def test_the_tlsrpt_record_gives_its_rua_addresses():
    assert report_addresses(["v=spf1 -all", RUA]) == ["mailto:tlsrpt@reports.test", "https://reports.test/tlsrpt"]
    assert report_addresses(["v=spf1 -all"]) == []
    for bad in ([RUA, RUA], ["v=TLSRPTv1; rua=ftp://x"], ["v=TLSRPTv1;"]):
        with pytest.raises(RecordError):
            report_addresses(bad)


def test_a_report_is_rfc_8460_json_and_counts_add_up_over_workers():
    lines = ["version: STSv1", "mode: enforce", "mx: *.sts.test", "max_age: 86400"]
    a, b = empty_period(0.0), empty_period(10.0)
    add_session(a, "sts.test", "sts", lines, "mx1.sts.test", "success")
    add_session(b, "sts.test", "sts", lines, "mx2.sts.test", "certificate-host-mismatch", receiving_ip="192.0.2.1")
    add_session(b, "sts.test", "sts", lines, "mx2.sts.test", "certificate-host-mismatch", receiving_ip="192.0.2.1")
    a["end"], b["end"] = 86400.0, 86400.0
    period = merge_periods([a, b])
    report = build_report(list(period["policies"].values()), period["begin"], period["end"], "Org",
                          "mailto:x@y.test", "id-1")
    assert report["date-range"] == {"start-datetime": "1970-01-01T00:00:00Z", "end-datetime": "1970-01-02T00:00:00Z"}
    (item,) = report["policies"]
    assert item["policy"] == {"policy-type": "sts", "policy-string": lines, "policy-domain": "sts.test",
                              "mx-host": ["*.sts.test"]}
    assert item["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 2}
    assert item["failure-details"] == [{"result-type": "certificate-host-mismatch", "receiving-mx-hostname":
                                        "mx2.sts.test", "receiving-ip": "192.0.2.1", "failed-session-count": 2}]


def test_handshake_failures_get_their_rfc_8460_result_type():
    assert tls_failure_type("VerificationError(errors=[DNSMismatch(mismatched_id=...)])") == "certificate-host-mismatch"
    assert tls_failure_type("certificate verify failed: certificate has expired") == "certificate-expired"
    assert tls_failure_type("certificate verify failed: unable to get local issuer certificate") == \
        "certificate-not-trusted"
    assert tls_failure_type("connection lost") == "validation-failure"


def test_tls_rpt_is_off_by_default_and_its_keys_are_checked(tmp_path):
    cfg = base_config(tmp_path)
    settings = parse_config(cfg).gateway.tls_rpt
    assert (settings.enabled, settings.organization, settings.contact, settings.interval) == (False, None, None, 86400)
    for key, value in (("interval", "0s"), ("interval", "soon"), ("enabled", "yes"), ("organization", ""),
                       ("contact", "a\nb"), ("bogus", 1)):
        cfg["gateway"]["tls_rpt"] = {key: value}
        with pytest.raises(ConfigError, match=rf"^gateway\.tls_rpt\.{key}: "):
            parse_config(cfg)


# -- end to end --------------------------------------------------------------------------------------

@pytest.fixture
def ca():
    return trustme.CA()


@pytest.fixture
def dns():
    server = DNSServer(listen="127.0.0.245", ttl=0)
    server.add_mx("sts.test", "mx1.sts.test", 10).add_mx("sts.test", "mx2.sts.test", 20)
    server.add_a("mx1.sts.test", PLAIN_MX).add_a("mx2.sts.test", TLS_MX).add_a("mta-sts.sts.test", HTTPS)
    server.add_txt("_mta-sts.sts.test", "v=STSv1; id=1")
    server.add_txt("_smtp._tls.sts.test", RUA)
    server.add_mx("reports.test", "mx.reports.test", 10).add_a("mx.reports.test", REPORTS_MX)
    server.add_a("reports.test", HTTPS)
    yield server.start()
    server.stop()


@pytest.fixture
def https(ca):
    server = PolicyServer(HTTPS, server_context(ca, "mta-sts.sts.test", "reports.test")).start()
    server.set_policy("sts.test", policy("enforce", "*.sts.test"))
    yield server
    server.stop()


@pytest.fixture
def mx(peers, ca):
    """sts.test's MX hosts (mx1 without STARTTLS, mx2 with a right certificate) and reports.test's."""
    plain = peers(PLAIN_MX, extensions=("PIPELINING", "8BITMIME"))
    secure = peers(TLS_MX, tls_context=server_context(ca, "mx2.sts.test"),
                   extensions=(*DEFAULT_EXTENSIONS, "STARTTLS"))
    reports = peers(REPORTS_MX)
    return plain, secure, reports


def config(tmp_path, dns, ca, interval: str = "1d") -> dict:
    cfg = sts_config(tmp_path, dns, ca)
    cfg["gateway"]["tls_rpt"] = {"enabled": True, "organization": "Example Org",
                                 "contact": "mailto:tls-admin@example.test", "interval": interval}
    cfg["gateway"]["metrics"] = {"enabled": True, "listen": f"{METRICS[0]}:{METRICS[1]}"}
    cfg["connectors"][0]["protocol_log"] = {"enabled": True, "directory": str(tmp_path / "w3c"),
                                            "period": "unlimited"}
    return cfg


def tls_rpt(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*smtpgw_command(), "tls-rpt", "-c", str(gw.config_path), *args], env=gw.env(),
                          cwd=str(gw.tmp), capture_output=True, text=True, timeout=120)


def shown(gw: GatewayProcess) -> list[dict]:
    r = tls_rpt(gw, "show", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["policies"]


def one_failure_one_success(rows: list[dict]) -> bool:
    return [(r["policy_domain"], r["policy_type"], r["successful"], r["failed"], r["failures"]) for r in rows] == [
        ("sts.test", "sts", 1, 1, {"starttls-not-supported": 1})]


def mailed_report(peer) -> tuple[email.message.Message, dict]:
    msg = email.message_from_bytes(peer.messages[0].data, policy=email.policy.default)
    part = next(p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip")
    return msg, json.loads(gzip.decompress(part.get_payload(decode=True)))


def assert_report(report: dict) -> None:
    assert report["organization-name"] == "Example Org" and report["contact-info"] == "mailto:tls-admin@example.test"
    assert report["report-id"] and set(report["date-range"]) == {"start-datetime", "end-datetime"}
    (item,) = report["policies"]
    assert item["policy"]["policy-type"] == "sts" and item["policy"]["policy-domain"] == "sts.test"
    assert item["policy"]["mx-host"] == ["*.sts.test"] and "mode: enforce" in item["policy"]["policy-string"]
    assert item["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    (detail,) = item["failure-details"]
    assert detail["result-type"] == "starttls-not-supported" and detail["failed-session-count"] == 1
    assert detail["receiving-mx-hostname"] == "mx1.sts.test" and detail["receiving-ip"] == PLAIN_MX


def test_sessions_are_counted_shown_logged_and_reported_by_mail_and_https(tmp_path, gateway, dns, https, mx, ca):
    plain, secure, reports = mx
    gw = gateway(config(tmp_path, dns, ca))
    send("counted")
    # mx1 offers no STARTTLS: refused under enforce (one failure); mx2 takes it over verified TLS
    assert secure.wait_for(1, timeout=30), gw.log()
    assert not plain.messages and secure.messages[0].tls
    assert wait_until(lambda: "status=sent" in gw.log())

    # smtpgw tls-rpt show, through the control socket
    assert wait_until(lambda: one_failure_one_success(shown(gw)), 10), shown(gw)
    text = tls_rpt(gw, "show").stdout
    assert "sts.test" in text and "starttls-not-supported=1" in text

    # the W3C protocol log's TLS line says tls=
    (log_file,) = (tmp_path / "w3c").rglob("*.log")
    _, rows = parse_w3c(log_file)
    secured = [r for r in rows if r["cs-method"] == "TLS"]
    assert [r["cs-uri-query"] for r in secured] == ["+tls=mta-sts"], rows

    # metrics: policy failures by domain and type
    with urllib.request.urlopen(f"http://{METRICS[0]}:{METRICS[1]}/metrics", timeout=10) as r:
        page = r.read().decode()
    assert ('smtpgw_tls_policy_failures_total{policy_domain="sts.test",policy_type="sts",'
            'result_type="starttls-not-supported"} 1.0') in page
    assert 'smtpgw_tls_policy_sessions_total{policy_domain="sts.test",policy_type="sts",result="success"} 1.0' in page

    # send now: one POST, one mail through our own queue
    sent = tls_rpt(gw, "send", "--json")
    assert sent.returncode == 0, sent.stderr
    results = {r["rua"]: r["result"] for r in json.loads(sent.stdout)}
    assert "https://reports.test/tlsrpt" in results, (sent.stdout, gw.log()[-3000:])
    assert results["https://reports.test/tlsrpt"] == "posted" and results["mailto:tlsrpt@reports.test"].startswith(
        "queued as "), results
    ((host, path, headers, body),) = https.posts
    assert (host, path) == ("reports.test", "/tlsrpt")
    assert headers["Content-Type"] == "application/tlsrpt+gzip"
    assert_report(json.loads(gzip.decompress(body)))

    assert reports.wait_for(1, timeout=30), gw.log()
    assert reports.messages[0].sender == "" and reports.messages[0].recipients == ["tlsrpt@reports.test"]
    msg, report = mailed_report(reports)
    assert msg["TLS-Report-Domain"] == "sts.test" and msg["TLS-Report-Submitter"] == "gw.example.test"
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    assert msg["Subject"].startswith("Report Domain: sts.test Submitter: gw.example.test Report-ID: <")
    part = next(p for p in msg.walk() if p.get_content_type() == "application/tlsrpt+gzip")
    assert part.get_filename().startswith("gw.example.test!sts.test!") and part.get_filename().endswith(".json.gz")
    assert_report(report)
    assert report["report-id"] == json.loads(gzip.decompress(body))["report-id"]

    # the period starts over; the report's own delivery to reports.test was not counted
    assert shown(gw) == []


def test_counts_survive_a_kill_and_a_short_interval_sends_by_itself(tmp_path, gateway, dns, https, mx, ca):
    plain, secure, reports = mx
    cfg = config(tmp_path, dns, ca)
    gw = gateway(cfg)
    send("before the crash")
    assert secure.wait_for(1, timeout=30), gw.log()
    saved = tmp_path / "spool" / "tls-rpt" / "current-0.json"
    assert wait_until(lambda: saved.exists() and '"failure": 1' in saved.read_text(), 10), gw.log()
    gw.kill9()
    assert one_failure_one_success(shown(gw))          # read from the spool: the gateway is down

    cfg["gateway"]["tls_rpt"]["interval"] = "3s"
    again = gateway(cfg)
    assert wait_until(lambda: len(https.posts) == 1, 20), again.log()
    assert_report(json.loads(gzip.decompress(https.posts[0][3])))
    assert reports.wait_for(1, timeout=30), again.log()
    assert_report(mailed_report(reports)[1])
    assert "TLS-RPT: report" in again.log()


def test_tls_rpt_commands_say_when_reporting_is_off(tmp_path, gateway):
    gw = gateway(base_config(tmp_path, listen="127.0.0.240:2525"))
    r = tls_rpt(gw, "show")
    assert r.returncode == 1 and "gateway.tls_rpt.enabled" in r.stderr and "Traceback" not in r.stderr
    gw.proc.send_signal(signal.SIGTERM)


def test_two_workers_count_apart_and_worker_0_reports_for_both(tmp_path, gateway, dns, https, mx, ca):
    from mta.workers import identity as workers

    plain, secure, reports = mx
    cfg = config(tmp_path, dns, ca)
    cfg["gateway"]["workers"] = 2
    gw = gateway(cfg)
    assert wait_until(lambda: "control.sock.1" in gw.log(), 30), gw.log()
    host, port = gw.address
    ids = set()
    for n in range(200):                   # until each worker has taken some (the queue id says which)
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.ehlo("client.test")
            s.mail("a@sender.test")
            s.rcpt("b@sts.test")
            code, text = s.data(f"From: a@sender.test\r\nSubject: w{n}\r\n\r\nhi\r\n")
        assert code == 250
        ids.add(text.decode().rsplit(" ", 1)[-1])
        if {workers.owner_of(x, 2) for x in ids} == {0, 1}:
            break
    assert secure.wait_for(len(ids), timeout=60), gw.log()
    spool = tmp_path / "spool" / "tls-rpt"
    assert wait_until(lambda: all((spool / f"current-{i}.json").exists() for i in (0, 1)), 10)

    def counted() -> list:
        return [(r["successful"], r["failed"]) for r in shown(gw)]

    assert wait_until(lambda: counted() == [(len(ids), len(ids))], 10), (counted(), len(ids))
    sent = tls_rpt(gw, "send", "--json")
    assert sent.returncode == 0, sent.stderr
    assert len(https.posts) == 1
    (item,) = json.loads(gzip.decompress(https.posts[0][3]))["policies"]
    assert item["summary"] == {"total-successful-session-count": len(ids), "total-failure-session-count": len(ids)}
    assert shown(gw) == []


# -- policy fetch failures, report strings, a POST that fails ------------------------------------------

def test_no_policy_found_leaves_out_the_policy_string_and_mx_host():
    period = empty_period(0.0)
    add_session(period, "sts.test", "no-policy-found", [], "", "sts-policy-fetch-error",
                additional_information="HTTP 404")
    (entry,) = period["policies"].values()
    assert entry["policy"] == {"policy-type": "no-policy-found", "policy-domain": "sts.test"}
    assert list(entry["failures"].values()) == [{"result-type": "sts-policy-fetch-error",
                                                 "additional-information": "HTTP 404", "failed-session-count": 1}]


@pytest.mark.parametrize("failure", ["sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"])
def test_a_policy_that_cannot_be_fetched_is_counted_with_its_result_type(tmp_path, gateway, dns, https, mx, ca,
                                                                         failure):
    plain, secure, reports = mx
    if failure == "sts-policy-fetch-error":
        https.set_response("sts.test", 404, "text/plain", "not here\n")
    elif failure == "sts-policy-invalid":
        https.set_response("sts.test", 200, "text/html", "<html>not a policy</html>")
    else:                                   # a certificate from a CA the gateway does not trust
        https.stop()
        https.context = server_context(trustme.CA(), "mta-sts.sts.test")
        https.start()
    gw = gateway(config(tmp_path, dns, ca))
    send("no policy")
    assert plain.wait_for(1, timeout=30), gw.log()          # no policy in force: mx1, as before MTA-STS

    def counted() -> list:
        return [(r["policy_type"], r["failed"], r["failures"]) for r in shown(gw)]

    assert wait_until(lambda: counted() == [("no-policy-found", 1, {failure: 1})], 10), counted()
    sent = tls_rpt(gw, "send", "--json")
    assert sent.returncode == 0, sent.stderr
    if failure == "sts-webpki-invalid":
        return                              # the report host has the untrusted certificate too
    (item,) = json.loads(gzip.decompress(https.posts[0][3]))["policies"]
    assert item["policy"] == {"policy-type": "no-policy-found", "policy-domain": "sts.test"}
    (detail,) = item["failure-details"]
    assert detail["result-type"] == failure and "mta-sts.sts.test" in detail["additional-information"]


def test_a_failed_post_is_sent_again_at_the_next_interval_with_its_counts(tmp_path, gateway, dns, https, mx, ca):
    plain, secure, reports = mx
    gw = gateway(config(tmp_path, dns, ca))
    send("counted")
    assert secure.wait_for(1, timeout=30), gw.log()
    assert wait_until(lambda: one_failure_one_success(shown(gw)), 10), shown(gw)
    https.post_status = 503
    first = {r["rua"]: r for r in json.loads(tls_rpt(gw, "send", "--json").stdout)}
    assert first["https://reports.test/tlsrpt"]["result"] == "failed: HTTP 503"
    report_id = first["https://reports.test/tlsrpt"]["report_id"]
    line = next(x for x in gw.log().splitlines() if "failed: HTTP 503" in x)
    assert line.endswith(f"TLS-RPT: report {report_id} for sts.test (2 sessions) to https://reports.test/tlsrpt "
                         "failed: HTTP 503; sent again at the next interval (attempt 1 of 5)")
    assert list((tmp_path / "spool" / "tls-rpt").glob("retry-*.json"))
    assert reports.wait_for(1, timeout=30), gw.log()         # the mailto: address got it the first time

    https.post_status = 200
    again = json.loads(tls_rpt(gw, "send", "--json").stdout)
    assert [(r["rua"], r["report_id"], r["result"]) for r in again] == [
        ("https://reports.test/tlsrpt", report_id, "posted")]
    assert len(https.posts) == 2
    assert_report(json.loads(gzip.decompress(https.posts[1][3])))       # the same counts, kept
    assert not list((tmp_path / "spool" / "tls-rpt").glob("retry-*.json"))
    assert len(reports.messages) == 1                                   # not mailed twice
