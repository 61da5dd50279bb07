"""Many concurrent clients: memory while they sit idle, then whether a burst from all of them gets through.

Phases, for C connections to one target:
1. open C connections (a bounded number of connects in flight, so the listen queue never
   overflows and no SYN waits for a retransmit), read the banner, EHLO; keep them idle;
2. sample the resident memory of the target's processes (per process, summed, and PSS);
3. release all clients at once: each sends one small message and waits for its reply;
4. wait until the sink has received every accepted message.

Client sockets are spread over several 127.0.0.x source addresses so ephemeral ports never run
short, and the client's RLIMIT_NOFILE is raised to fit C.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Callable

import procstat
from smtpclient import Session, SMTPError, make_message
from util import raise_nofile

SENDER = "conns@bench-client.test"
RECIPIENT = "user@remote.test"
SOURCES = [f"127.0.0.{i}" for i in range(70, 80)]


class MemorySampler(threading.Thread):
    """Samples RSS of the target's processes every ``interval`` seconds and keeps the peak."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.peak: procstat.MemSample | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                self.peak = procstat.peak(self.peak, procstat.memory(self.pids(), with_pss=False))
            except Exception:
                pass
            self._halt.wait(self.interval)

    def stop(self) -> procstat.MemSample | None:
        self._halt.set()
        self.join(10)
        return self.peak


def _count(d: dict[str, int], key: str) -> None:
    d[key] = d.get(key, 0) + 1


async def _run(host: str, port: int, count: int, pids: Callable[[], list[int]],
               connect_concurrency: int, timeout: float, settle: float) -> dict:
    gate = asyncio.Semaphore(connect_concurrency)
    go = asyncio.Event()
    message = make_message(512, SENDER, RECIPIENT)
    connect_errors: dict[str, int] = {}
    send_errors: dict[str, int] = {}
    ready = 0
    accepted = 0
    all_ready = asyncio.Event()
    pending = count

    def one_ready_or_failed() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0:
            all_ready.set()

    async def client(i: int) -> None:
        nonlocal ready, accepted
        session = None
        try:
            async with gate:
                session = await Session.open(host, port, source=SOURCES[i % len(SOURCES)], timeout=timeout)
            ready += 1
        except SMTPError as e:
            _count(connect_errors, f"{e.stage} {e.code}")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            _count(connect_errors, type(e).__name__)
        finally:
            one_ready_or_failed()
        if session is None:
            return
        await go.wait()
        try:
            await session.send_mail(SENDER, RECIPIENT, message, timeout)
            accepted += 1
        except SMTPError as e:
            _count(send_errors, f"{e.stage} {e.code}")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            _count(send_errors, type(e).__name__)
        await session.quit()

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(client(i)) for i in range(count)]
    await all_ready.wait()
    t_ready = time.perf_counter() - t0
    await asyncio.sleep(settle)                     # let the server settle into its idle state
    loop = asyncio.get_running_loop()
    idle = await loop.run_in_executor(None, lambda: procstat.memory(pids()))
    sampler = MemorySampler(pids)
    sampler.start()
    t1 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    t_send = time.perf_counter() - t1
    peak = await loop.run_in_executor(None, sampler.stop)
    return {"connections": count, "ready": ready, "connect_errors": connect_errors,
            "connect_s": round(t_ready, 2), "accepted": accepted, "send_errors": send_errors,
            "send_s": round(t_send, 2), "idle_memory": idle.as_dict(),
            "peak_memory_during_send": peak.as_dict() if peak else None}


def run(host: str, port: int, count: int, pids: Callable[[], list[int]], sink_count: Callable[[], int],
        wait_delivered: Callable[[int, float], bool], connect_concurrency: int = 200,
        timeout: float = 120, settle: float = 2.0, overall_timeout: float = 900) -> dict:
    """Run the test against a started target; the sink must be fresh (count 0)."""
    nofile = raise_nofile(count + 1024)
    if nofile < count + 64:
        return {"connections": count, "error": f"RLIMIT_NOFILE is only {nofile}"}

    async def bounded():
        return await asyncio.wait_for(_run(host, port, count, pids, connect_concurrency, timeout, settle),
                                      overall_timeout)
    result = asyncio.run(bounded())
    t = time.perf_counter()
    result["all_delivered"] = wait_delivered(result["accepted"], timeout)
    result["delivered"] = sink_count()
    result["deliver_wait_s"] = round(time.perf_counter() - t, 2)
    result["all_accepted"] = result["accepted"] == count
    result["ok"] = result["all_accepted"] and result["all_delivered"] and result["delivered"] >= count
    return result
