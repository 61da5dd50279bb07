"""What the cluster's queue index (gateway.cluster, mta/cluster/queue_index.py) costs per message.

    python bench/cluster_cost.py                 # 20,000 messages, each queued then gone 1s later
    python bench/cluster_cost.py --fast          # each gone within the same batch (never written)

Starts a private redis-server on 127.0.0.1, then drives a real QueueIndex over a real Cluster link as
the queue manager does: each message is noted when queued, when its attempt starts and when it is
gone. Prints the CPU microseconds per message this process spent (the reactor thread: rows, JSON, the
Redis protocol), measured against the same run with no index, and the Redis commands per message.
Nothing of this runs before a 250: the queue manager only adds the id to a set.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor, task  # noqa: E402

from mta.cluster.node import Cluster  # noqa: E402
from mta.cluster.queue_index import QueueIndex  # noqa: E402
from mta.model.queue_entry import QueueEntry, RecipientState  # noqa: E402

PORT = 6391
BATCH = 200                 # messages per reactor turn (one turn every 10 ms: 20,000 a second)


class Queue:
    """The parts of QueueManager the index uses."""

    def __init__(self) -> None:
        self.watchers: list = []
        self.live: dict[str, QueueEntry] = {}

    def ids(self) -> list[str]:
        return list(self.live)

    def get(self, entry_id: str) -> QueueEntry | None:
        return self.live.get(entry_id)

    def is_active(self, entry_id: str) -> bool:
        return False

    def touched(self, entry_id: str) -> None:
        for w in self.watchers:
            w(entry_id)


def redis_commands() -> int:
    out = subprocess.run(["redis-cli", "-p", str(PORT), "INFO", "stats"], capture_output=True, text=True).stdout
    return int(next(line.split(":")[1] for line in out.splitlines() if line.startswith("total_commands_processed")))


async def drive(queue: Queue, n: int, linger: float) -> float:
    """Queue n messages, each gone ``linger`` seconds later; the CPU seconds it took."""
    start = time.process_time()
    born: list[tuple[float, str]] = []
    for i in range(0, n, BATCH):
        now = reactor.seconds()
        for j in range(i, min(n, i + BATCH)):
            entry_id = f"{j:024x}"
            queue.live[entry_id] = QueueEntry(id=entry_id, sender="alice@example.test",
                                              rcpts=[RecipientState(f"bob{j}@far.example")], received_at=time.time(),
                                              size=4321)
            queue.touched(entry_id)             # queued
            queue.touched(entry_id)             # its attempt starts
            born.append((now, entry_id))
        while born and born[0][0] <= now - linger:
            entry_id = born.pop(0)[1]
            del queue.live[entry_id]
            queue.touched(entry_id)             # gone
        await task.deferLater(reactor, 0.01, lambda: None)
    while born:
        await task.deferLater(reactor, min(0.05, linger), lambda: None)
        while born and born[0][0] <= reactor.seconds() - linger:
            entry_id = born.pop(0)[1]
            del queue.live[entry_id]
            queue.touched(entry_id)
    return time.process_time() - start


async def main(args: argparse.Namespace) -> None:
    config = SimpleNamespace(gateway=SimpleNamespace(
        node_name="bench", hostname="bench.example", cluster=SimpleNamespace(redis=f"redis://127.0.0.1:{PORT}/0")))
    cluster = Cluster(config, reactor, heartbeat=False)
    cluster.start()
    await cluster.call("PING")
    linger = 0.0 if args.fast else 1.0
    bare = await drive(Queue(), args.n, linger)
    queue = Queue()
    index = QueueIndex(cluster, queue)
    index.start()
    before, start = redis_commands(), time.process_time()
    await drive(queue, args.n, linger)
    while index.dirty or index._busy:           # the last batch written
        await task.deferLater(reactor, 0.01, lambda: None)
    with_index = time.process_time() - start
    commands = redis_commands() - before
    index.stop()
    await cluster.stop()
    per = (with_index - bare) / args.n * 1e6
    print(f"{args.n} messages, each gone {'in the same batch' if args.fast else f'{linger:g}s'} after queueing")
    print(f"CPU on the reactor thread for the index: {per:.1f} us per message "
          f"(run with it {with_index:.2f}s, without {bare:.2f}s)")
    print(f"Redis commands: {commands / args.n:.3f} per message ({commands} in all)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="messages (default 20000)")
    parser.add_argument("--fast", action="store_true", help="each message gone before the index writes it")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="cluster-cost-")
    server = subprocess.Popen([shutil.which("redis-server") or "/usr/bin/redis-server", "--bind", "127.0.0.1",
                               "--port", str(PORT), "--save", "", "--appendonly", "no", "--dir", folder],
                              stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        d = defer.Deferred.fromCoroutine(main(args))
        d.addErrback(lambda f: f.printTraceback())
        d.addBoth(lambda _: reactor.stop())
        reactor.run()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)
