"""The console's pure parts: the Queues page's rows and states, sessions and their tokens, the
return path after a form, the charts' scale, the schedule grid's description."""
from __future__ import annotations

from pathlib import Path

from gwprocess import base_config
from mta.config.loader import build
from mta.config.schedules import parse_schedule
from mta.console.charts import nice_ceiling
from mta.console.queues import LOCAL, destinations
from mta.console.sessions import IDLE_TIMEOUT, Sessions, cookie_header
from mta.console.settings_pages import day_ranges, opening, week_slots
from mta.console.web import outcome, safe_back


def row(ident: str, *rcpts: str, **over) -> dict:
    base = {"id": ident, "recipients_pending": list(rcpts), "age": 60.0, "received_at": 1.0, "held": False,
            "why_held": None, "active": False, "last_error": None, "next_attempt": None}
    return {**base, **over}


def test_rows_by_connector_and_domain_with_their_state(tmp_path: Path):
    config = build(base_config(tmp_path), "test")
    rows = destinations(config, [
        row("a", "x@remote.test", "y@remote.test", last_error="451 4.3.0 later", next_attempt=99.0),
        row("b", "z@remote.test", "bob@example.test", held=True, why_held="held by the administrator", age=300.0),
        row("c", "q@waiting.test", why_held="held: connector 'X' schedule, opens at 2026-12-03 08:00 UTC"),
        row("d", "r@etrn.test", why_held="held: connector 'ISP' is remote-triggered; ..."),
        row("e", "s@busy.test", active=True),
        {**row("f"), "corrupt": True, "why_held": "corrupt: unreadable spool file"},
    ])
    got = {(r.connector, r.domain): (len(r.messages), r.recipients, r.state) for r in rows}
    assert got == {
        ("Internet SMTP connector", "remote.test"): (2, 3, "retrying"),
        (LOCAL, "example.test"): (1, 1, "held"),
        ("Internet SMTP connector", "waiting.test"): (1, 1, "waiting for schedule"),
        ("Internet SMTP connector", "etrn.test"): (1, 1, "held for ETRN"),
        ("Internet SMTP connector", "busy.test"): (1, 1, "active"),
        ("corrupt (never attempted again)", ""): (1, 0, "corrupt"),
    }
    remote = next(r for r in rows if r.domain == "remote.test")
    assert remote.why == "451 4.3.0 later" and remote.oldest_age == 300.0 and remote.next_attempt == 99.0
    assert rows[-1].connector.startswith("corrupt")          # the damaged files last


def test_sessions_expire_and_login_replaces_the_session():
    now = [1000.0]
    sessions = Sessions(lambda: now[0])
    anonymous = sessions.new()
    assert sessions.get(anonymous.id) is anonymous and anonymous.user is None
    assert anonymous.token_ok(anonymous.csrf) and not anonymous.token_ok("") and not anonymous.token_ok(None)
    user = sessions.login(anonymous, "admin")
    assert sessions.get(anonymous.id) is None                 # no session fixation
    assert user.id != anonymous.id and user.csrf != anonymous.csrf and not user.token_ok(anonymous.csrf)
    now[0] += IDLE_TIMEOUT + 1
    assert sessions.get(user.id) is None
    assert cookie_header(user, secure=True).endswith(b"; Path=/; HttpOnly; SameSite=Strict; Secure")
    assert b"Max-Age=0" in cookie_header(None, secure=False)


def test_return_paths_stay_on_the_console():
    assert safe_back("/messages?domain=x.test") == "/messages?domain=x.test"
    for bad in ("//evil.test/", "https://evil.test/", "/\\evil.test", "", None, "queues"):
        assert safe_back(bad) == "/queues"


def test_outcome_lines():
    assert outcome("hold", {"ok": True, "results": [{"result": "done"}, {"result": "done"}, {"result": "unchanged"}]}) \
        == "2 done, 1 unchanged"
    assert outcome("delete_ndr", {"ok": True, "results": [{"result": "done", "dsn": "X"}]}) \
        == "1 done; 1 NDR queued to the sender"
    assert outcome("retry", {"ok": False, "error": "worker 1 is not answering"}) == "failed: worker 1 is not answering"


def test_chart_scale():
    assert [nice_ceiling(v) for v in (0, 0.4, 1, 3, 7, 11, 240, 999)] == [1, 1, 1, 5, 10, 20, 250, 1000]


def test_schedule_grid_and_opening():
    weekly = parse_schedule({"mon": ["08:00-18:00"], "sun": ["22:00-24:00"]}, "k")
    slots = week_slots(weekly, 0.0, "UTC")
    assert sum(slots) == 48 and day_ranges(slots, 0) == "08:00-18:00" and day_ranges(slots, 1) == "closed"
    assert day_ranges(slots, 6) == "22:00-24:00"
    monday_9 = 4 * 86400 + 9 * 3600                # 1970-01-05 was a Monday
    assert opening(weekly, monday_9, "UTC") == "open now (closes Mon 1970-01-05 18:00 UTC)"
    assert opening(weekly, monday_9 + 10 * 3600, "UTC") == "closed; opens Sun 1970-01-11 22:00 UTC"
    assert opening(parse_schedule("never", "k"), 0.0, "UTC") == "closed; never opens"


def test_traces_keep_each_messages_steps_and_forget_the_oldest(monkeypatch):
    from mta.maillog import lines
    from mta.ops import trace
    from mta.smtp.reply import Reply

    monkeypatch.setattr(trace, "KEEP_MESSAGES", 3)
    t = trace.Traces(lambda: 100.0)
    t.mail_line(lines.delivery("A", "bob@x.test", "[192.0.2.1]:25", 1.0, (0, 0, 0.5, 0.5),
                               Reply(451, "4.3.0", "try later"), "deferred"), 99.0)
    t.smtpgw_event("routing_engine", "medium", "x.test: connectors Internet", {"id": "A", "domain": "x.test"})
    t.smtpgw_event("smtp_protocol", "medium", "message accepted", {"id": "A"})    # not about the queue's work
    assert [(s["source"], s["text"]) for s in t.steps("A")] == [
        ("mail log", "to=<bob@x.test>, relay=[192.0.2.1]:25, delay=1, delays=0/0/0.5/0.5, dsn=4.3.0, "
                     "status=deferred (451 4.3.0 try later)"),
        ("routing_engine", "x.test: connectors Internet")]
    assert trace.attempts(t.steps("A")) == [{"at": 99.0, "recipient": "bob@x.test", "relay": "[192.0.2.1]:25",
                                             "status": "deferred", "dsn": "4.3.0", "reply": "451 4.3.0 try later",
                                             "tls": None}]
    assert t.wants_event("routing_engine", "medium") and not t.wants_event("smtp_protocol", "maximum")
    for ident in "BCD":
        t.smtpgw_event("queuing_engine", "medium", "message queued", {"id": ident})
    assert t.steps("A") == [] and len(t.steps("D")) == 1


def test_traces_forget_a_message_that_left_the_queue():
    """Nothing shows a message no longer queued: its steps go when it is removed or deleted."""
    from mta.maillog import lines
    from mta.ops import trace

    t = trace.Traces(lambda: 100.0)
    for ident in "ABC":
        t.smtpgw_event("queuing_engine", "medium", "message queued", {"id": ident})
    t.mail_line(lines.removed("A"), 101.0)
    t.smtpgw_event("queuing_engine", "medium", trace.DELETED, {"id": "B"})
    assert t.steps("A") == [] and t.steps("B") == [] and len(t.steps("C")) == 1


def test_login_throttle_counts_per_address_and_forgets_after_the_window():
    from mta.console.throttle import LoginThrottle, client_key

    now = [1000.0]
    t = LoginThrottle(lambda: now[0])
    assert [t.failed("192.0.2.1") for _ in range(5)] == [False, False, False, False, True]
    assert t.retry_after("192.0.2.1") == 300.0 and t.retry_after("192.0.2.2") is None
    now[0] += 299.5
    assert t.retry_after("192.0.2.1") == 1.0
    now[0] += 1
    assert t.retry_after("192.0.2.1") is None
    t.succeeded("192.0.2.1")
    assert t.failed("192.0.2.1") is False
    assert client_key("2001:db8:1:2:3::9") == client_key("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"


def test_why_explains_routing_order_and_the_holds(tmp_path: Path):
    from mta.model.queue_entry import QueueEntry, RecipientState
    from mta.ops.trace import explain

    cfg = base_config(tmp_path)
    cfg["connectors"] += [{"name": "Partner", "address_spaces": [{"domain": "*.partner.test", "cost": 2}]},
                          {"name": "Partner backup", "address_spaces": [{"domain": "*.partner.test", "cost": 7}],
                           "smart_hosts": ["[192.0.2.9]"]}]
    config = build(cfg, "test")
    entry = QueueEntry("Q1", "alice@example.test", [
        RecipientState("a@mx.partner.test", last_error="451 4.7.5 MTA-STS policy of mx.partner.test allows no MX host",
                       next_attempt=500.0, attempts=1),
        RecipientState("b@example.test", status="delivered")], received_at=1.0, extra={"held": True})
    why = explain(config, entry, 100.0, None)
    partner, local = why["routes"]
    assert local == {"domain": "example.test", "recipients": ["b@example.test"], "local": True, "connectors": []}
    assert [(c["name"], c["address_space"], c["cost"]) for c in partner["connectors"]] == [
        ("Partner", "*.partner.test", 2), ("Partner backup", "*.partner.test", 7),
        ("Internet SMTP connector", "*", 1)]
    assert partner["connectors"][1]["why"].endswith("cost 7: tried if those before it cannot deliver")
    assert partner["connectors"][1]["next_hops"] == "smart hosts [192.0.2.9]"
    assert partner["connectors"][0]["next_hops"] == "the domain's MX records"
    assert [(h["kind"], h["until"]) for h in why["holds"]] == [("administrator", None), ("TLS policy", 500.0)]
    assert why["recorded"] is False and why["steps"] == []


def test_login_throttle_counts_checks_in_flight():
    """Tries sent at once: the ones past the limit wait for the checks still running."""
    from mta.console.throttle import LoginThrottle

    t = LoginThrottle(lambda: 0.0)
    assert [t.start("192.0.2.1") for _ in range(6)] == [None] * 5 + [1.0]
    assert [t.finish("192.0.2.1", ok=False) for _ in range(4)] == [False] * 4
    assert t.finish("192.0.2.1", ok=None) is False           # no answer: not counted
    assert t.start("192.0.2.1") is None
    assert t.finish("192.0.2.1", ok=False) is True and t.start("192.0.2.1") == 300.0


def test_cluster_queue_table_links_this_nodes_messages_and_marks_stale_rows():
    from mta.console.cluster_page import queue_table

    listed = {"ok": True, "node": "mx1", "entries": [
        {"node": "mx1", "id": "A1", "sender": "a@x.test", "recipients_pending": ["b@y.test"], "state": "deferred",
         "received_at": 40.0, "last_error": "451 4.3.0 later"},
        {"node": "mx2", "id": "B2", "sender": "", "recipients_pending": ["c@z.test"], "state": "held",
         "received_at": 90.0, "why_held": "held by the administrator", "stale": True}]}
    html = queue_table(listed, 100.0)
    assert '<a href="/message?id=A1">A1</a>' in html and ">B2<" in html and 'href="/message?id=B2"' not in html
    assert "mx2 (stale: the node is gone)" in html and "451 4.3.0 later" in html and "1m" in html
    assert queue_table(None, 0.0) == ""
    assert "cannot be listed: Redis down" in queue_table({"ok": False, "error": "Redis down"}, 0.0)
