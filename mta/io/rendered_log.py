"""Log events whose text is final when they are made: the mail log's lines and the workers' relayed
output, several per message.

Through ``Logger.info`` each such line cost tens of microseconds, nearly all of it in
``twisted.logger``'s formatting rather than in building the line: the level check, parsing the
format string for fields, and, in the file observer, the time stamp (two ``datetime`` objects, a
time-zone lookup and ``strftime`` per event) and the ``[namespace#level]`` system. ``emit`` hands
the observers an ordinary event (``log_format`` is the text with its braces doubled, so any observer
renders the same line) that also carries the text itself (``log_text``); ``install`` teaches the
twistd file observers to write such an event as ``stamp [namespace#level] text`` directly, with the
stamp rendered by the observer's own formatter once per second. The bytes written are the ones
Twisted writes; every other event takes Twisted's way unchanged. When that file observer is all the
publisher has (twistd's ``--logfile``, or a worker's stdout), ``emit`` hands it the line itself,
without making the event or passing through the publisher: about 20 Python calls a line, four lines
a message and worker 0 writing the other workers' lines again. Any other observer (syslog, one added
later) brings back the ordinary event for every observer.

Given the reactor, ``install`` also makes those observers write at most every ``FLUSH_DELAY``
seconds instead of once per line: the file observer flushes its file after every event, and the
file is line-buffered or unbuffered, which made one ``write`` system call per line (four a message,
and a worker's lines are written to its pipe and again by worker 0). Lines now leave together in
one write a moment later (and at shutdown); a process killed with ``kill -9`` loses the lines of
its last ``FLUSH_DELAY``. (A flush at the end of each reactor
turn, ``callLater(0)``, would cost an extra turn of the loop each time.)
"""
from __future__ import annotations

import time
from typing import Any, Callable

from twisted.logger import FileLogObserver, LogLevel, Logger, globalLogPublisher

TEXT = "log_text"       # the event's final text, when it has one
BATCHED = "log_batched"  # True: the line may wait up to FLUSH_DELAY to be written with others
FLUSH_DELAY = 0.05      # seconds a line may wait in the file's buffer (DelayedFlushFile)


def escaped(text: str) -> str:
    """``text`` as a format string that renders as itself."""
    if "{" in text or "}" in text:
        return text.replace("{", "{{").replace("}", "}}")
    return text


def emit(logger: Logger, text: str, batched: bool = False, **fields: Any) -> None:
    """``logger.info(text)`` for a finished line, with ``fields`` in the event for other observers.
    ``batched``: the line may wait (:class:`DelayedFlushFile`), as the mail log's lines do; any other
    line is written at once, with whatever waited before it."""
    route = _direct.get(logger.observer)
    if route is not None and route.publisher._observers == route.observers:
        when = time.time()
        rendered = route.rendered
        stamp = rendered._stamp if int(when) == rendered._second else rendered.stamp(when)
        if stamp is not None:
            if "\n" in text:
                text = text.replace("\n", "\n\t")
            route.file.add(f"{stamp} [{logger.namespace}#info] {text}\n", batched)
            return
    if batched:
        fields[BATCHED] = True
    fields.update(log_logger=logger, log_level=LogLevel.info, log_namespace=logger.namespace,
                  log_source=logger.source, log_format=escaped(text), log_time=time.time())
    fields[TEXT] = text
    logger.observer(fields)


class RenderedFormat:
    """A file observer's ``formatEvent`` that writes events with a final text itself and leaves
    the rest to the observer's own formatter (``original``)."""

    def __init__(self, original: Callable[[dict], str | None]) -> None:
        self.original = original
        self._second = -1
        self._stamp = ""
        self.batched = False            # whether the event formatted last may wait to be written

    def stamp(self, when: float) -> str | None:
        """The observer's own time stamp for ``when``, rendered once per second."""
        second = int(when)
        if second != self._second:
            line = self.original({"log_time": float(second), "log_format": "-", "log_system": "-"})
            if not line or not line.endswith(" [-] -\n"):
                return None
            self._second, self._stamp = second, line[:-len(" [-] -\n")]
        return self._stamp

    def __call__(self, event: dict) -> str | None:
        text = event.get(TEXT)
        self.batched = BATCHED in event
        if text is None or "log_system" in event or "log_failure" in event:
            return self.original(event)
        stamp = self.stamp(event["log_time"])
        if stamp is None:
            return self.original(event)
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        return f"{stamp} [{event['log_namespace']}#{event['log_level'].name}] {text}\n"


def _whole_seconds(format_event: Callable[[dict], str | None]) -> bool:
    """Whether the observer's stamp changes only with the second (so one per second is exact)."""
    probe = {"log_format": "-", "log_system": "-"}
    return format_event({**probe, "log_time": 1.0e9}) == format_event({**probe, "log_time": 1.0e9 + 0.999})


class DelayedFlushFile:
    """A file observer's file that keeps what it is given for up to ``FLUSH_DELAY`` seconds and then
    writes it in one go.

    Waiting to flush is not enough by itself: twistd's ``--logfile`` file is line-buffered and its
    stdout (a worker's, relayed by worker 0; ``-n`` without ``--logfile``) is unbuffered when
    PYTHONUNBUFFERED is set, so every line was a ``write`` system call anyway (``strace -c``: four a
    message in each worker, and worker 0 read worker 1's lines in as many reads). The lines are
    kept here instead, and written at once while the reactor is not running (before it starts,
    after shutdown) or when more than ``MAX_BUFFERED`` characters wait. Only lines logged as
    ``batched`` wait (``batched()`` says whether the line just written was one: the mail log's);
    any other line is written at once, with those before it, as before.
    """

    MAX_BUFFERED = 64 * 1024

    def __init__(self, file: Any, reactor: Any, batched: Callable[[], bool] = lambda: True) -> None:
        self.file = file
        self.reactor = reactor
        self.batched = batched
        self._pending = False
        self._parts: list[str] = []
        self._size = 0
        reactor.addSystemEventTrigger("after", "shutdown", self.flush_now)

    def write(self, data: Any) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size > self.MAX_BUFFERED or not getattr(self.reactor, "running", True):
            self.flush_now()

    def add(self, data: str, batched: bool) -> None:
        """``write`` then ``flush`` of a line whose batching is known (``emit``'s direct way)."""
        self._parts.append(data)
        self._size += len(data)
        if not batched or self._size > self.MAX_BUFFERED or not getattr(self.reactor, "running", True):
            self.flush_now()
        elif not self._pending:
            self._pending = True
            self.reactor.callLater(FLUSH_DELAY, self.flush_now)

    def flush(self) -> None:
        if not self.batched():
            self.flush_now()
        elif not self._pending:
            self._pending = True
            self.reactor.callLater(FLUSH_DELAY, self.flush_now)

    def flush_now(self) -> None:
        self._pending = False
        parts, self._parts, self._size = self._parts, [], 0
        try:
            if parts:
                self.file.write(parts[0] if len(parts) == 1 else "".join(parts))
            self.file.flush()
        except (OSError, ValueError):       # the log file closed at exit, or broken: nothing more to do
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class _Route:
    """A publisher whose only observer is a file observer writing rendered events through a
    :class:`DelayedFlushFile`: ``observers`` is that list as it was, compared at each ``emit``."""

    __slots__ = ("publisher", "observers", "rendered", "file")

    def __init__(self, publisher: Any, observer: FileLogObserver) -> None:
        self.publisher, self.observers = publisher, [observer]
        self.rendered, self.file = observer.formatEvent, observer._outFile


_direct: dict[Any, _Route] = {}       # publisher -> its direct route (install)


def install(publisher: Any = globalLogPublisher, reactor: Any = None) -> int:
    """Give the file observers of ``publisher`` the fast way for rendered events (run once logging
    has begun: twistd adds its observer after ``makeService``), and with ``reactor`` a flush every
    ``FLUSH_DELAY`` at most (:class:`DelayedFlushFile`). Returns how many it changed."""
    changed = 0
    for observer in list(getattr(publisher, "_observers", ())):
        if isinstance(observer, FileLogObserver) and not isinstance(observer.formatEvent, RenderedFormat):
            if _whole_seconds(observer.formatEvent):
                rendered = observer.formatEvent = RenderedFormat(observer.formatEvent)
                if reactor is not None and not isinstance(observer._outFile, DelayedFlushFile):
                    observer._outFile = DelayedFlushFile(observer._outFile, reactor, lambda: rendered.batched)
                changed += 1
    observers = list(getattr(publisher, "_observers", ()))
    if (len(observers) == 1 and isinstance(observers[0], FileLogObserver)
            and isinstance(observers[0].formatEvent, RenderedFormat)
            and isinstance(observers[0]._outFile, DelayedFlushFile)):
        _direct[publisher] = _Route(publisher, observers[0])
    return changed
