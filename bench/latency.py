"""Time from the end of DATA (the final '.') to the 250 reply, under a steady concurrent load.

``sessions`` connections each send messages back to back until ``messages`` have been sent in
total. Every successful transaction contributes one sample. The median and 99th percentile are of
all samples; the throughput seen by this client is reported too, for context only (the throughput
figure of the bench is smtp-source's).
"""
from __future__ import annotations

import asyncio
import time

from smtpclient import Session, SMTPError, make_message
from util import percentile

SENDER = "latency@bench-client.test"
RECIPIENT = "user@remote.test"


async def _worker(host: str, port: int, todo: list[int], message: bytes, samples: list[float],
                  errors: dict[str, int], timeout: float) -> None:
    session = None
    while todo:
        todo.pop()
        try:
            if session is None:
                session = await Session.open(host, port, timeout=timeout)
            samples.append(await session.send_mail(SENDER, RECIPIENT, message, timeout))
        except SMTPError as e:
            errors[f"{e.stage} {e.code}"] = errors.get(f"{e.stage} {e.code}", 0) + 1
            if session is not None:
                session.abort()
            session = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
            if session is not None:
                session.abort()
            session = None
    if session is not None:
        await session.quit()


async def _measure(host: str, port: int, messages: int, sessions: int, size: int, timeout: float) -> dict:
    message = make_message(size, SENDER, RECIPIENT)
    samples: list[float] = []
    errors: dict[str, int] = {}
    todo = list(range(messages))
    t0 = time.perf_counter()
    await asyncio.gather(*(_worker(host, port, todo, message, samples, errors, timeout)
                           for _ in range(sessions)))
    elapsed = time.perf_counter() - t0
    s = sorted(samples)
    ms = lambda v: None if v is None else round(v * 1000, 2)  # noqa: E731
    return {"messages": messages, "sessions": sessions, "size": size, "ok": len(s),
            "errors": errors, "elapsed_s": round(elapsed, 3),
            "client_msgs_per_s": round(len(s) / elapsed, 1) if elapsed else None,
            "p50_ms": ms(percentile(s, 50)), "p90_ms": ms(percentile(s, 90)),
            "p99_ms": ms(percentile(s, 99)), "max_ms": ms(s[-1] if s else None),
            "mean_ms": ms(sum(s) / len(s) if s else None)}


def measure(host: str, port: int, messages: int, sessions: int = 20, size: int = 4096,
            timeout: float = 120, overall_timeout: float = 600) -> dict:
    """Run the latency client to completion (bounded by overall_timeout)."""
    async def bounded() -> dict:
        return await asyncio.wait_for(_measure(host, port, messages, sessions, size, timeout),
                                      overall_timeout)
    return asyncio.run(bounded())
