"""What one mail log line costs on the reactor thread, through a twistd-style file observer.

    python bench/maillog_cost.py            # the gateway's way (rendered once)
    python bench/maillog_cost.py --plain    # every line through Twisted's own formatting
    valgrind --tool=callgrind python3.11 bench/maillog_cost.py -n 400   # and -n 2400:
        the difference in instructions / 2,000 is one line's instructions, whatever the machine's load

Writes the four lines a relayed message writes (queued, client, delivery, removed), N in all, to a
temporary file, and prints CPU microseconds per line.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.logger import globalLogBeginner, textFileLogObserver  # noqa: E402

from mta.io import rendered_log  # noqa: E402
from mta.maillog import MailLog, lines  # noqa: E402
from mta.smtp.reply import Reply  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20000, help="lines to write (default 20000)")
    parser.add_argument("--plain", action="store_true", help="without rendered_log.install()")
    args = parser.parse_args()
    with tempfile.TemporaryFile("w") as out:
        globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
        if not args.plain:
            rendered_log.install()
        mail_log, qid = MailLog(), "0123456789ABCDEF"
        four = [lines.queued(qid, "sender@example.test", 4321, 1),
                lines.client(qid, lines.client_name("127.0.0.1")),
                lines.delivery(qid, "rcpt@example.test", "127.0.0.60[127.0.0.60]:2526", 0.5,
                               (0.01, 0.2, 0.1, 0.2), Reply(250, "2.0.0", "Ok"), lines.STATUS_SENT),
                lines.removed(qid)]
        started = time.process_time()
        for _ in range(args.n // 4):
            for line in four:
                mail_log.write(line)
        spent = time.process_time() - started
    print(f"{'plain' if args.plain else 'rendered'}: {spent / args.n * 1e6:.1f} µs of CPU per line")


if __name__ == "__main__":
    main()
