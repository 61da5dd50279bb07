"""The spool: round trips on both backends, files on disk, corrupt files, and kill -9 at random moments."""
from __future__ import annotations

import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from mta.model.queue_entry import QueueEntry, RecipientState
from mta.spool.store import SLICE, MemorySpool, Spool, SpoolError, encode_message_header

BODY = [b"Received: from a by b\r\n", b"Subject: spool\r\n\r\n", b"line\r\n" * 500]


def make_tempdir(test: unittest.TestCase) -> str:
    """A private folder outside the checkout (trial's mktemp would write under the cwd)."""
    path = tempfile.mkdtemp(prefix="smtpgw-spool-")
    test.addCleanup(shutil.rmtree, path, True)
    return path


def entry(entry_id: str, *addresses: str) -> QueueEntry:
    return QueueEntry(id=entry_id, sender="alice@client.test",
                      rcpts=[RecipientState(a) for a in (addresses or ("bob@far.test",))],
                      received_at=1_700_000_000.0, size=sum(len(c) for c in BODY),
                      extra={"mail_params": {"BODY": "8BITMIME"}})


class RoundTrip:
    """The behaviour both backends share."""

    def make(self):
        raise NotImplementedError

    def setUp(self):
        self.spool = self.make()
        self.spool.open()
        self.addCleanup(self.spool.close)

    @defer.inlineCallbacks
    def test_put_scan_read_update_remove(self):
        e = entry("0001aa", "bob@far.test", "carol@far.test")
        yield self.spool.put(e, BODY)
        [found] = yield self.spool.scan()
        self.assertEqual(found, e)
        self.assertEqual((yield self.spool.read(e.id)), b"".join(BODY))

        e.rcpts[0].status = "delivered"
        e.rcpts[1].attempts, e.rcpts[1].next_attempt, e.rcpts[1].last_error = 1, 1_700_000_600.0, "451 4.4.1 x"
        e.delay_notified = True
        yield self.spool.update(e)
        [found] = yield self.spool.scan()
        self.assertEqual(found, e)
        self.assertEqual((yield self.spool.read(e.id)), b"".join(BODY), "data untouched by updates")

        yield self.spool.remove(e.id)
        self.assertEqual((yield self.spool.scan()), [])

    @defer.inlineCallbacks
    def test_scan_returns_copies_in_arrival_order(self):
        late, early = entry("0002bb"), entry("0003cc")
        late.received_at += 10
        yield self.spool.put(late, BODY)
        yield self.spool.put(early, BODY)
        late.rcpts[0].status = "failed"     # not written: the spool must not see it
        found = yield self.spool.scan()
        self.assertEqual([e.id for e in found], ["0003cc", "0002bb"])
        self.assertEqual(found[1].rcpts[0].status, "pending")

    @defer.inlineCallbacks
    def test_duplicate_id_is_refused(self):
        yield self.spool.put(entry("0004dd"), BODY)
        with self.assertRaises(SpoolError):
            yield self.spool.put(entry("0004dd"), [b"other"])
        self.assertEqual((yield self.spool.read("0004dd")), b"".join(BODY))

    @defer.inlineCallbacks
    def test_unsafe_ids_are_refused(self):
        for bad in ("../evil", ".hidden", "a/b", "x.st", ""):
            with self.assertRaises(SpoolError):
                yield self.spool.put(entry(bad), BODY)

    @defer.inlineCallbacks
    def test_non_json_extra_fails_the_put(self):
        e = entry("0005ee")
        e.extra["obj"] = object()
        with self.assertRaises(TypeError):
            yield self.spool.put(e, BODY)
        self.assertEqual((yield self.spool.scan()), [])


class MemorySpoolTests(RoundTrip, unittest.TestCase):
    def make(self):
        return MemorySpool()


class FileSpoolTests(RoundTrip, unittest.TestCase):
    timeout = 30

    def make(self):
        self.directory = os.path.join(make_tempdir(self), "spool")
        return Spool(self.directory, reactor=reactor)

    def queue_files(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.directory, "queue")))

    @defer.inlineCallbacks
    def test_one_file_per_message_and_a_sidecar_for_state(self):
        e = entry("0101aa")
        yield self.spool.put(e, BODY)
        self.assertEqual(self.queue_files(), ["0101aa"])
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        with open(os.path.join(self.directory, "queue", "0101aa"), "rb") as f:
            header = f.readline()
            self.assertEqual(f.read(), b"".join(BODY))
        self.assertTrue(header.startswith(b"smtpgw-spool 1 {"))
        yield self.spool.update(e)
        self.assertEqual(self.queue_files(), ["0101aa", "0101aa.st"])
        yield self.spool.remove(e.id)
        self.assertEqual(self.queue_files(), [])

    @defer.inlineCallbacks
    def test_a_large_envelope_is_encoded_in_slices_to_the_same_bytes(self):
        addresses = [f"user{i}@far.test" for i in range(SLICE * 3 + 7)]
        e = entry("0102bb", *addresses)
        e.extra["rcpt_params"] = {a: {"NOTIFY": "SUCCESS", "ORCPT": f"rfc822;{a}"} for a in addresses}
        yield self.spool.put(e, BODY)
        with open(os.path.join(self.directory, "queue", "0102bb"), "rb") as f:
            self.assertEqual(f.readline(), encode_message_header(e, sum(map(len, BODY))))
        [found] = yield self.spool.scan()
        self.assertEqual(found, e)

    def test_a_header_past_64_mib_is_read_back(self):
        """Issue 13 F3: 64,000 recipients with long ORCPTs made an 86 MiB header, and the reader's
        64 MiB cap sent the message to corrupt/ after its client had been told 250."""
        e = entry("0103cc")
        e.extra["blob"] = "x" * (65 * 1024 * 1024)
        with open(os.path.join(self.directory, "queue", "0103cc"), "wb") as f:
            f.write(encode_message_header(e, sum(map(len, BODY))) + b"".join(BODY))
        [found] = self.spool.scan_sync(repair=True)
        self.assertEqual(len(found.extra["blob"]), 65 * 1024 * 1024)
        self.assertEqual(os.listdir(os.path.join(self.directory, "corrupt")), [])

    @defer.inlineCallbacks
    def test_concurrent_puts_share_directory_fsyncs(self):
        entries = [entry(f"02{i:04d}") for i in range(200)]
        yield defer.gatherResults([self.spool.put(e, BODY) for e in entries])
        self.assertEqual(len(self.queue_files()), 200)
        self.assertLess(self.spool.dir_syncs, 200)

    def test_open_discards_unfinished_writes(self):
        tmp = os.path.join(self.directory, "tmp", "0301aa.7")
        with open(tmp, "wb") as f:
            f.write(b"smtpgw-spool 1 {half")
        self.spool.open()
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.assertEqual(self.spool.scan_sync(), [])

    @defer.inlineCallbacks
    def test_tools_scan_without_touching_files(self):
        yield self.spool.put(entry("0302aa"), BODY)
        with open(os.path.join(self.directory, "queue", "0303bb"), "wb") as f:
            f.write(b"garbage")
        self.assertEqual([e.id for e in self.spool.scan_sync()], ["0302aa"])
        self.assertEqual(self.queue_files(), ["0302aa", "0303bb"])
        self.assertEqual(os.listdir(os.path.join(self.directory, "corrupt")), [])

    @defer.inlineCallbacks
    def test_corrupt_files_are_moved_aside(self):
        good = entry("0401aa")
        yield self.spool.put(good, BODY)
        yield self.spool.put(entry("0402bb"), BODY)
        yield self.spool.put(entry("0403cc"), BODY)
        q = os.path.join(self.directory, "queue")
        with open(os.path.join(q, "0402bb"), "r+b") as f:          # truncated body
            f.truncate(os.path.getsize(os.path.join(q, "0402bb")) - 10)
        with open(os.path.join(q, "0403cc"), "wb") as f:           # garbage
            f.write(b"\x00\x01 not a spool file\n")
        with open(os.path.join(q, "notanid!"), "wb") as f:         # a stranger
            f.write(b"hello")
        with open(os.path.join(q, "0499zz.st"), "wb") as f:        # state without a message
            f.write(b"smtpgw-state 1 {}\n")
        found = yield self.spool.load()
        self.assertEqual([e.id for e in found.entries], ["0401aa"])
        # the truncated message keeps its envelope (with the reason) beside it, as at run time
        self.assertEqual(sorted(os.listdir(os.path.join(self.directory, "corrupt"))),
                         ["0402bb", "0402bb.st", "0403cc", "0499zz.st", "notanid!"])
        self.assertEqual(self.queue_files(), ["0401aa"])
        damaged = {d.name: (d.reason, d.entry is not None) for d in found.damaged}
        self.assertEqual(damaged["0402bb"][1], True)
        self.assertRegex(damaged["0402bb"][0], r"^message file damaged: file is \d+ bytes, expected \d+ \(truncated\)$")
        self.assertEqual(damaged["0403cc"], ("message file damaged: no spool header", False))
        self.assertEqual(damaged["notanid!"], ("not a queue id: a file the gateway did not write", False))
        self.assertEqual(damaged["0499zz.st"][1], False)
        self.assertTrue(damaged["0499zz.st"][0].startswith("message file missing, and its state file damaged"))
        [listed] = [c for c in self.spool.corrupt_messages_sync() if c.id == "0402bb"]
        self.assertEqual(listed.entry.extra["corrupt"], damaged["0402bb"][0])

    @defer.inlineCallbacks
    def test_a_finished_message_is_told_from_a_lost_one(self):
        """unlink_message leaves <id>.st.done while it works: a crash then is a finished message
        (removed quietly); a bare <id>.st is one whose file was lost (kept, with its envelope)."""
        done, lost = entry("0411aa"), entry("0412bb", "bob@far.test", "carol@far.test")
        for e in (done, lost):
            yield self.spool.put(e, BODY)
            yield self.spool.update(e)
        q = os.path.join(self.directory, "queue")
        os.rename(os.path.join(q, "0411aa.st"), os.path.join(q, "0411aa.st.done"))    # crash mid-removal
        os.unlink(os.path.join(q, "0412bb"))                                           # a careless rm
        found = yield self.spool.load()
        self.assertEqual(found.entries, [])
        self.assertEqual([(d.name, d.reason, d.entry.id) for d in found.damaged],
                         [("0412bb", "message file missing", "0412bb")])
        self.assertEqual(found.notes, ["queue/0411aa: finished just before the gateway stopped; removed"])
        self.assertEqual(self.queue_files(), [])
        self.assertEqual(os.listdir(os.path.join(self.directory, "corrupt")), ["0412bb.st"])

    @defer.inlineCallbacks
    def test_removing_a_deferred_message_leaves_nothing(self):
        e = entry("0413cc")
        yield self.spool.put(e, BODY)
        yield self.spool.update(e)
        self.assertEqual(self.queue_files(), ["0413cc", "0413cc.st"])
        yield self.spool.remove(e.id)
        self.assertEqual(self.queue_files(), [])

    def test_what_the_gateway_never_writes_is_refused_without_blocking(self):
        """A FIFO would block a reading thread forever; a link could point anywhere; a directory."""
        q = os.path.join(self.directory, "queue")
        os.mkfifo(os.path.join(q, "0421aa"))
        os.symlink("/etc/passwd", os.path.join(q, "0422bb"))
        os.mkdir(os.path.join(q, "0423cc"))
        found = self.spool._scan_collect(repair=True)
        self.assertEqual({d.name: d.reason for d in found.damaged},
                         {"0421aa": "message file damaged: a named pipe, not a spool file",
                          "0422bb": "message file damaged: a symbolic link, not a spool file",
                          "0423cc": "message file damaged: a directory, not a spool file"})
        self.assertEqual(sorted(os.listdir(os.path.join(self.directory, "corrupt"))), ["0421aa", "0422bb", "0423cc"])
        self.assertEqual([c.entry for c in self.spool.corrupt_messages_sync()], [None, None, None])

    @defer.inlineCallbacks
    def test_corrupt_state_falls_back_to_the_queued_states(self):
        e = entry("0501aa")
        yield self.spool.put(e, BODY)
        with open(os.path.join(self.directory, "queue", "0501aa.st"), "wb") as f:
            f.write(b"smtpgw-state 1 {broken")
        [found] = yield self.spool.scan()
        self.assertEqual(found, e)
        self.assertEqual(os.listdir(os.path.join(self.directory, "corrupt")), ["0501aa.st"])

    @defer.inlineCallbacks
    def test_read_detects_truncation(self):
        yield self.spool.put(entry("0601aa"), BODY)
        path = os.path.join(self.directory, "queue", "0601aa")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1)
        with self.assertRaises(Exception):
            yield self.spool.read("0601aa")

    @defer.inlineCallbacks
    def test_a_killed_writer_fails_what_it_held_and_the_next_put_restarts_it(self):
        yield self.spool.put(entry("0801aa"), BODY)
        pid = self.spool.writer_pid
        os.kill(pid, signal.SIGSTOP)            # the request below stays unread in its pipe
        held = self.spool.put(entry("0802bb"), BODY)
        os.kill(pid, signal.SIGKILL)
        with self.assertRaises(SpoolError):
            yield held
        yield self.spool.put(entry("0803cc"), BODY)
        self.assertNotEqual(self.spool.writer_pid, pid)
        self.assertEqual(self.queue_files(), ["0801aa", "0803cc"])

    @defer.inlineCallbacks
    def test_the_writer_refuses_a_queue_id_in_use(self):
        yield self.spool.put(entry("0901aa"), BODY)
        with self.assertRaises(SpoolError):
            yield self.spool.put(entry("0901aa"), [b"other\r\n"])
        with open(os.path.join(self.directory, "queue", "0901aa"), "rb") as f:
            f.readline()
            self.assertEqual(f.read(), b"".join(BODY))

    def test_closed_spool_refuses_work(self):
        self.spool.close()
        failures = []
        self.spool.put(entry("0701aa"), BODY).addErrback(failures.append)
        self.assertEqual(len(failures), 1)
        failures[0].trap(SpoolError)


# -- kill -9 ------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from twisted.internet import reactor, defer
    from mta.spool.store import Spool
    from mta.model.queue_entry import QueueEntry, RecipientState

    spool = Spool(sys.argv[1], reactor=reactor)
    spool.open()
    counter = iter(range(10**9))

    def body(i):
        return [b"Subject: %d\\r\\n\\r\\n" % i, (b"%08d" % i) * 512, b"\\r\\n"]

    def one():
        i = next(counter)
        e = QueueEntry(id="m%08d" % i, sender="a@b.test", rcpts=[RecipientState("c@d.test")],
                       received_at=time.time())
        d = spool.put(e, body(i))
        def done(_):
            sys.stdout.write(e.id + "\\n")
            sys.stdout.flush()
            one()
        d.addCallback(done)
        d.addErrback(lambda f: (f.printTraceback(), reactor.stop()))

    def go():
        sys.stdout.write("ready\\n"); sys.stdout.flush()
        for _ in range(20):
            one()
    reactor.callWhenRunning(go)
    reactor.run()
""")


def expected_body(entry_id: str) -> bytes:
    i = int(entry_id[1:])
    return b"Subject: %d\r\n\r\n" % i + (b"%08d" % i) * 512 + b"\r\n"


def run_and_kill(directory: str, script: str, rng: random.Random) -> list[str]:
    """Start the writer, kill -9 it at a random moment, return every id it reported durable."""
    proc = subprocess.Popen([sys.executable, script, directory], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out = b""
    deadline = time.monotonic() + 20
    kill_at = None
    while time.monotonic() < deadline:
        if kill_at is not None and time.monotonic() >= kill_at:
            break
        if sel.select(timeout=0.05):
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
            if kill_at is None and b"ready\n" in out:
                kill_at = time.monotonic() + rng.uniform(0.05, 0.6)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    out += proc.stdout.read()          # what it wrote before dying is still in the pipe
    err = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, err.decode(errors="replace")
    assert kill_at is not None, "writer never became ready: " + err.decode(errors="replace")
    lines = out.split(b"\n")[:-1]       # a last line without its newline was never fully reported
    return [line.decode() for line in lines if line != b"ready"]


def test_kill_9_never_loses_an_acknowledged_put(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    rng = random.Random(os.getpid())
    directory = str(tmp_path / "spool")
    total = 0
    for _ in range(4):
        reported = set(run_and_kill(directory, str(script), rng))
        total += len(reported)
        spool = Spool(directory)
        spool.open()                    # as at restart: unfinished writes are dropped
        found = {e.id: e for e in spool.scan_sync(repair=True)}
        spool.close()
        missing = reported - set(found)
        assert not missing, f"lost {len(missing)} acknowledged messages, e.g. {sorted(missing)[:3]}"
        for entry_id in found:          # acknowledged or not, whatever scan returns is whole
            with open(os.path.join(directory, "queue", entry_id), "rb") as f:
                f.readline()
                assert f.read() == expected_body(entry_id), entry_id
        assert os.listdir(os.path.join(directory, "corrupt")) == []
        # remove what we checked so the next round starts a fresh numbering without clashes
        for entry_id in found:
            os.unlink(os.path.join(directory, "queue", entry_id))
    assert total > 20, "the writer should have stored something before each kill"
