"""The last-moment edits before a message is spooled: ``Hooks.before_queue`` (every implementation, in call
order, each waited for, a raising one skipped) and ``MessageData.remove_headers``."""
from __future__ import annotations

from twisted.internet import defer

from mta.model.message import MessageData
from mta.plugin.hookspecs import hookimpl
from mta.plugin.manager import Hooks


class Edit:
    def __init__(self, name: str, later: defer.Deferred | None = None, fail: bool = False) -> None:
        self.name, self.later, self.fail = name, later, fail

    @hookimpl
    def smtpgw_before_queue(self, message):
        if self.fail:
            raise RuntimeError("broken plugin")
        if self.later is None:
            message.prepend_header("X-Edit", self.name)
            return None
        return self.later.addCallback(lambda _: message.prepend_header("X-Edit", self.name))


def test_each_waits_for_every_edit_in_order_and_skips_a_broken_one():
    hooks = Hooks()
    later = defer.Deferred()
    hooks.register(Edit("last"), name="a")
    hooks.register(Edit("broken", fail=True), name="b")
    hooks.register(Edit("slow", later), name="c")
    hooks.register(Edit("first"), name="d")             # registered last: called first
    message = MessageData([b"Subject: x\r\n\r\nbody\r\n"])
    done = hooks.before_queue(None, None, message)
    assert isinstance(done, defer.Deferred) and not done.called
    later.callback(None)
    assert done.called
    assert message.as_bytes().startswith(b"X-Edit: last\r\nX-Edit: slow\r\nX-Edit: first\r\nSubject: x")


def test_each_without_waiting_returns_none():
    hooks = Hooks()
    hooks.register(Edit("only"), name="a")
    message = MessageData([b"\r\nbody\r\n"])
    assert hooks.before_queue(None, None, message) is None
    assert message.as_bytes() == b"X-Edit: only\r\n\r\nbody\r\n"


def test_remove_headers_across_chunks_keeps_the_body_and_size():
    chunks = [b"Authentication-Results: gw.example.test;\r\n", b"  spf=pass\r\nSubject: hi\r\nAuthentication-Res",
              b"ults: other.example; dkim=pass\r\n\r\nAuthentication-Results: gw.example.test; body\r\n"]
    message = MessageData(chunks)
    removed = message.remove_headers(lambda name, value: name.lower() == "authentication-results"
                                     and value.split(";")[0].strip() == "gw.example.test")
    assert removed == 1
    assert message.as_bytes() == (b"Subject: hi\r\nAuthentication-Results: other.example; dkim=pass\r\n\r\n"
                                   b"Authentication-Results: gw.example.test; body\r\n")
    assert message.size == len(message.as_bytes())
    assert message.headers["Subject"] == "hi"
