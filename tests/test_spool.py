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

import pytest
from twisted.internet import defer, reactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mta.model.queue_entry import QueueEntry, RecipientState
from mta.spool import files as spool_files
from mta.spool.store import CRC_PROBLEM, SLICE, MemorySpool, Spool, SpoolError, encode_message_header
from mta.spool.writer import BATCH, ERROR, OK, OP_NEW, OP_REPLACE, ReplyReader, _Writer, encode_request

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
            self.assertEqual(f.readline(), encode_message_header(e, sum(map(len, BODY)), spool_files.checksum(BODY)))
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
    def test_concurrent_writes_share_directory_fsyncs(self):
        """New messages on ext4/xfs/btrfs need none (one commit each); state files always take one,
        shared by the writes that finished before it started."""
        entries = [entry(f"02{i:04d}") for i in range(200)]
        yield defer.gatherResults([self.spool.put(e, BODY) for e in entries])
        self.assertEqual(len(self.queue_files()), 200)
        one_commit = spool_files.one_commit_fs(os.path.join(self.directory, "queue"))
        after_puts = self.spool.dir_syncs
        self.assertEqual(after_puts == 0, one_commit)
        self.assertLess(after_puts, 200)
        yield defer.gatherResults([self.spool.update(e) for e in entries])
        self.assertEqual(len(self.queue_files()), 400)
        self.assertTrue(0 < self.spool.dir_syncs - after_puts < 200)

    @defer.inlineCallbacks
    def test_a_write_torn_by_a_power_cut_is_set_aside_and_the_rest_queued(self):
        """One commit a message lets a power cut during its fsync leave the name on disk before all
        of its data (mta/spool/files.py): nothing at all, a prefix, or blocks never written. That
        message was never acknowledged; the scan moves it to corrupt/ with one line and queues the rest."""
        for i in range(4):
            yield self.spool.put(entry(f"0431a{i}"), BODY)
        q = os.path.join(self.directory, "queue")
        empty, prefix, hole = (os.path.join(q, f"0431a{i}") for i in (1, 2, 3))
        with open(empty, "r+b") as f:               # the name committed, no data block yet
            f.truncate(0)
        with open(prefix, "r+b") as f:              # the first blocks only
            f.truncate(len(f.readline()) + 100)
        with open(hole, "r+b") as f:                # the right length, a block in the middle never written
            f.seek(os.path.getsize(hole) - 1500)
            f.write(b"\0" * 512)
        logged: list[str] = []
        observer = lambda event: logged.append(formatEvent(event))
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        found = yield self.spool.scan()
        self.assertEqual([e.id for e in found], ["0431a0"])
        self.assertEqual((yield self.spool.read("0431a0")), b"".join(BODY))
        self.assertEqual(self.queue_files(), ["0431a0"])
        self.assertEqual(sorted(os.listdir(os.path.join(self.directory, "corrupt"))),
                         ["0431a1", "0431a2", "0431a2.st", "0431a3", "0431a3.st"])
        lines = [line for line in logged if "0431a" in line]
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("queue/0431a1: message file damaged: no spool header; moved to corrupt/", lines[0])
        self.assertRegex(lines[1], r"queue/0431a2: message file damaged: file is \d+ bytes, expected \d+ "
                                   r"\(truncated\); moved to corrupt/")
        self.assertIn(f"queue/0431a3: message file damaged: {CRC_PROBLEM}; moved to corrupt/", lines[2])

    @defer.inlineCallbacks
    def test_a_torn_body_is_never_read_back(self):
        yield self.spool.put(entry("0432aa"), BODY)
        path = os.path.join(self.directory, "queue", "0432aa")
        with open(path, "r+b") as f:
            f.seek(-100, os.SEEK_END)
            f.write(b"\0" * 50)
        with self.assertRaisesRegex(Exception, "does not match its checksum"):
            yield self.spool.read("0432aa")

    def test_a_message_from_before_the_checksum_is_read_by_its_length(self):
        e = entry("0433aa")
        with open(os.path.join(self.directory, "queue", "0433aa"), "wb") as f:
            f.write(encode_message_header(e, sum(map(len, BODY))) + b"".join(BODY))
        self.assertEqual(self.spool.scan_sync(repair=True), [e])
        self.assertEqual(Spool._read_body(os.path.join(self.directory, "queue", "0433aa")), b"".join(BODY))

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


# -- the writer's two ways to make a new message durable (mta/spool/files.py) -----------------------


def _serve(tmp_path, one_commit: bool, requests: list[list[bytes]]) -> list[tuple[int, int, str]]:
    """Run the writer's loop in this process on a pair of pipes, whatever filesystem the test runs on."""
    import threading
    queue_dir = tmp_path / "queue"
    queue_dir.mkdir()
    (tmp_path / "tmp").mkdir()
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    writer = _Writer(str(queue_dir), rep_w, one_commit=one_commit)
    thread = threading.Thread(target=writer.run, args=(req_r,), daemon=True)
    thread.start()
    for request in requests:
        os.write(req_w, b"".join(request))
    os.close(req_w)                     # the writer finishes what it was sent, then returns
    thread.join(20)
    assert not thread.is_alive()
    os.close(rep_w)
    data = b""
    while chunk := os.read(rep_r, 65536):
        data += chunk
    os.close(rep_r)
    os.close(req_r)
    return ReplyReader().feed(data)


@pytest.mark.parametrize("one_commit", [True, False])
def test_both_ways_store_whole_messages_and_refuse_an_id_in_use(tmp_path, one_commit):
    requests = [encode_request(OP_NEW, n, str(tmp_path / "tmp" / f"m{n}.1"), str(tmp_path / "queue" / f"m{n}"),
                               [b"message %d\r\n" % n] * 100) for n in range(30)]
    requests.append(encode_request(OP_NEW, 99, str(tmp_path / "tmp" / "m0.2"), str(tmp_path / "queue" / "m0"),
                                   [b"other\r\n"]))
    requests.append(encode_request(OP_REPLACE, 100, str(tmp_path / "tmp" / "m1.st.3"),
                                   str(tmp_path / "queue" / "m1.st"), [b"state\n"]))
    replies = _serve(tmp_path, one_commit, requests)
    kinds = {tag: kind for kind, tag, _ in replies}
    assert sorted(kinds) == [*range(30), 99, 100]
    assert kinds[99] == ERROR and "queue id already in use: m0" in dict((t, x) for _, t, x in replies)[99]
    assert all(kinds[n] in (OK, BATCH) for n in [*range(30), 100])
    new_batches = sum(kinds[n] == BATCH for n in range(30))
    assert (new_batches == 0) if one_commit else (new_batches >= 1)     # directory fsyncs only the old way
    assert kinds[100] == BATCH or not one_commit        # a state file: always the directory's fsync
    for n in range(30):
        assert (tmp_path / "queue" / f"m{n}").read_bytes() == b"message %d\r\n" % n * 100
    assert (tmp_path / "queue" / "m1.st").read_bytes() == b"state\n"
    assert os.listdir(tmp_path / "tmp") == []


def test_the_filesystem_decides_the_way(tmp_path):
    table = tmp_path / "mountinfo"
    table.write_text(
        "22 1 254:0 / / rw,relatime - ext2 /dev/vda rw\n"
        "23 22 254:1 / /var/spool rw,relatime - ext4 /dev/vdb rw\n"
        "24 23 0:40 / /var/spool/on\\040tmpfs rw - tmpfs tmpfs rw\n"
        "25 22 254:2 / /srv rw - xfs /dev/vdc rw\n"
        "26 22 254:3 / /srv rw - overlay overlay rw\n")
    assert spool_files.mount_type("/var/spool/smtpgw/queue", str(table)) == "ext4"
    assert spool_files.mount_type("/var/spool/on tmpfs/queue", str(table)) == "tmpfs"
    assert spool_files.mount_type("/var/spoolish", str(table)) == "ext2"
    assert spool_files.mount_type("/srv/q", str(table)) == "overlay"        # the later mount on a point wins
    assert spool_files.mount_type("/x", str(tmp_path / "none")) is None
    assert spool_files.ONE_COMMIT_TYPES >= {"ext4", "xfs", "btrfs"}
    assert not {"ext2", "tmpfs", "overlay", "nfs"} & spool_files.ONE_COMMIT_TYPES
