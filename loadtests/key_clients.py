"""One load-generator process per API key, for loadtests.fairness: each key's requests are sent
and timed by a client of its own, as each customer's are by theirs. With one event loop
streaming both keys, every light TTFT it measured included its own delay reading the heavy
key's streams (docs/benchmarks.md section 8).

`KeyClients` starts the processes once, one per name (a key, or a key and the server it sends
to); `run` hands each client its phase (`KeyJob`), all starting at one wall-clock instant, and
returns what each client saw (`KeyLoad`).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from types import TracebackType

import httpx
import uvloop

EVENT = b"data: {"  # a completion chunk's server-sent event ("data: [DONE]" is not one)
START_LEAD_S = 0.3  # from handing the jobs out to the phase's start: every client is ready


@dataclass(frozen=True)
class KeyJob:
    """One key's open-loop phase: Poisson arrivals at `rate` requests/s for `duration_s`."""

    url: str
    model: str
    key: str
    secret: str
    rate: float
    prompt_len: int
    output_len: int
    duration_s: float
    seed: int
    start_at: float  # time.time() at which the phase starts


@dataclass
class KeyLoad:
    """What one key's client saw in a phase."""

    ttft_s: list[float] = field(default_factory=list)  # censored at the phase's end
    waiting: int = 0  # of those, requests still without a first token when the phase ended
    tokens: int = 0  # tokens streamed (one event each) within the phase
    errors: int = 0
    cpu_s: float = 0.0  # this client's CPU time during the phase
    # How late its event loop woke from 10 ms sleeps (s): a delay every TTFT it measures has.
    lag_s: list[float] = field(default_factory=list)


async def _one(http: httpx.AsyncClient, job: KeyJob, body: dict, load: KeyLoad,
               end: float) -> None:
    start = time.monotonic()
    first: float | None = None
    tail = b""  # the end of the previous read: an event's start may straddle two
    try:
        async with http.stream("POST", "/v1/completions", json=body,
                               headers={"Authorization": f"Bearer {job.secret}"}) as response:
            if response.status_code != 200:
                load.errors += 1
                return
            # Events counted in the raw bytes, not parsed line by line: this client shares the
            # server's cores, and its own time per event is in every TTFT it sees.
            async for data in response.aiter_raw():
                now = time.monotonic()
                if now > end:
                    break
                seen = tail + data
                events = seen.count(EVENT)
                tail = seen[-(len(EVENT) - 1):]
                if events and first is None:
                    first = now
                    load.ttft_s.append(now - start)
                load.tokens += events  # one token per event (n = 1)
    except httpx.HTTPError:  # refused, reset: an error, not a request that never was
        load.errors += 1
        first = start  # not censored: it is not waiting
    finally:
        if first is None and time.monotonic() >= end:  # still waiting: censored
            load.ttft_s.append(end - start)
            load.waiting += 1


async def loop_lag(end: float, lags: list[float]) -> None:
    """How late this event loop wakes from a 10 ms sleep, until `end`: when the client cannot
    keep up with its streams, its own delay shows here (and in every TTFT)."""
    while time.monotonic() < end:
        before = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - before - 0.01)


async def run_key(job: KeyJob) -> KeyLoad:
    """Send and time one key's requests for the phase; streams still open at its end are
    closed (the server aborts their requests)."""
    load = KeyLoad()
    rng = random.Random(f"{job.seed}:{job.key}")  # the same arrivals for every policy
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=job.url, timeout=None, limits=limits) as http:
        await asyncio.sleep(max(0.0, job.start_at - time.time()))
        cpu0 = time.process_time()
        start = time.monotonic()
        end = start + job.duration_s
        tasks: list[asyncio.Task] = []

        async def sender() -> None:
            next_at = start + rng.expovariate(job.rate)
            while next_at < end:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                body = {"model": job.model,
                        "prompt": [rng.randrange(10, 90) for _ in range(job.prompt_len)],
                        "max_tokens": job.output_len, "ignore_eos": True, "stream": True,
                        "temperature": 0}
                tasks.append(asyncio.create_task(_one(http, job, body, load, end)))
                next_at += rng.expovariate(job.rate)

        await asyncio.gather(loop_lag(end, load.lag_s), sender())
        await asyncio.sleep(max(0.0, end - time.monotonic()))
        for task in tasks:
            task.cancel()  # closes the stream: the server aborts the request
        await asyncio.gather(*tasks, return_exceptions=True)
        load.cpu_s = time.process_time() - cpu0
    return load


def _serve(conn: Connection) -> None:
    """A client process: run each job it is sent (None ends it) and send back its KeyLoad, or
    a RuntimeError describing why it failed."""
    while (job := conn.recv()) is not None:
        try:
            conn.send(uvloop.run(run_key(job)))
        except Exception as exc:  # sent back as text: not every exception pickles
            conn.send(RuntimeError(f"the {job.key} client failed: {exc!r}"))


class KeyClients:
    """One spawned client process per name, for as long as the context lasts."""

    def __init__(self, names: Iterable[str]):
        context = multiprocessing.get_context("spawn")
        self._conns: dict[str, Connection] = {}
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for name in names:
            parent, child = context.Pipe()
            proc = context.Process(target=_serve, args=(child,), name=f"client-{name}",
                                   daemon=True)
            proc.start()
            self._conns[name] = parent
            self._procs.append(proc)

    def run(self, jobs: Mapping[str, KeyJob]) -> dict[str, KeyLoad]:
        """Each job (client name -> job) on its client, all at once; waits for all of them."""
        for name, job in jobs.items():
            self._conns[name].send(job)
        loads: dict[str, KeyLoad] = {}
        for name in jobs:
            result = self._conns[name].recv()
            if isinstance(result, BaseException):
                raise result
            loads[name] = result
        return loads

    def close(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(OSError):  # a client gone has nothing to end
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()

    def __enter__(self) -> KeyClients:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
