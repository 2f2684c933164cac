"""What the churn benchmark reads from a run: disk loads per adapter polled from /metrics
during the load, the requests that waited for one (cold), the first request of each adapter,
sequences per engine step, and the slot bound an ideal engine would reach."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

from loadtests.common import metric_sum, scrape
from loadtests.loadgen import LoadConfig, LoadResult, run_load
from loadtests.report import RequestRecord
from loadtests.workload import AdapterChooser


@dataclass
class Poll:
    """One /metrics reading: when (seconds since the run's t0) and disk loads per adapter."""

    t: float
    loads: dict[str, float]


def adapter_loads(samples: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    prefix = 'goat_adapter_loads_total{adapter="'
    for key, value in samples.items():
        if key.startswith(prefix):
            out[key[len(prefix) : -2]] = value
    return out


async def run_polled(load: LoadConfig, url: str, poll_s: float) -> tuple[LoadResult, list[Poll]]:
    """Run the load while polling /metrics; poll times share the load's clock (perf_counter)."""
    polls: list[Poll] = []
    t0 = time.perf_counter()
    stop = asyncio.Event()

    async def poller() -> None:
        while not stop.is_set():
            samples = await asyncio.to_thread(scrape, url)
            polls.append(Poll(time.perf_counter() - t0, adapter_loads(samples)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)

    task = asyncio.create_task(poller())
    await asyncio.sleep(0)  # first poll before the first request
    while not polls:
        await asyncio.sleep(0.01)
    run_start = time.perf_counter() - t0
    try:
        result = await run_load(load)
    finally:
        stop.set()
        await task
    samples = await asyncio.to_thread(scrape, url)
    polls.append(Poll(time.perf_counter() - t0, adapter_loads(samples)))
    for poll in polls:  # to the load generator's clock: its t0 is about when run_load started
        poll.t -= run_start
    return result, polls


def cold_requests(records: Sequence[RequestRecord], polls: Sequence[Poll]) -> list[RequestRecord]:
    """Requests during which a disk load of their adapter finished: the load count at the last
    poll before the request started is below the count at the first poll after its first
    token. Poll spacing can add a request that arrived just after another request's load."""
    cold = []
    for r in records:
        if not r.ok or r.ttft_s is None:
            continue
        first_token = r.start_s + r.ttft_s
        before = [p for p in polls if p.t <= r.start_s]
        after = [p for p in polls if p.t >= first_token]
        n0 = before[-1].loads.get(r.adapter, 0.0) if before else 0.0
        n1 = after[0].loads.get(r.adapter, 0.0) if after else polls[-1].loads.get(r.adapter, 0.0)
        if n1 > n0:
            cold.append(r)
    return cold


def first_uses(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """The first request of each adapter (the server starts with none loaded)."""
    seen: set[str] = set()
    out = []
    for r in sorted(records, key=lambda r: r.start_s):
        if r.adapter not in seen:
            seen.add(r.adapter)
            if r.ok:
                out.append(r)
    return out


def slot_bound(num_adapters: int, max_loras: int, concurrency: int, zipf_alpha: float,
               steps_per_request: int, num_requests: int = 20000, seed: int = 0) -> float:
    """Mean sequences per step of an ideal engine whose only limit is its adapter slots, under
    the benchmark's closed loop: every request takes `steps_per_request` steps; each step runs
    every waiting request whose adapter holds a slot, and free slots go to the waiting
    adapters first come, first served (an adapter keeps its slot while it has requests)."""
    chooser = AdapterChooser([str(i) for i in range(num_adapters)], "zipf",
                             random.Random(seed), zipf_alpha)
    waiting = [chooser.choose() for _ in range(concurrency)]
    running: list[list] = []  # [adapter, steps left]
    done = steps = seq_steps = 0
    while done < num_requests:
        held = {a for a, _ in running}
        still = []
        for adapter in waiting:
            if adapter in held or len(held) < max_loras:
                held.add(adapter)
                running.append([adapter, steps_per_request])
            else:
                still.append(adapter)
        waiting = still
        steps += 1
        seq_steps += len(running)
        for seq in running:
            seq[1] -= 1
        finished = sum(1 for seq in running if seq[1] == 0)
        running = [seq for seq in running if seq[1] > 0]
        done += finished
        waiting += [chooser.choose() for _ in range(finished)]
    return seq_steps / steps


def seqs_per_step(before: dict[str, float], after: dict[str, float]) -> float:
    """Mean sequences per engine step between two /metrics scrapes (goat_batch_size)."""
    steps = metric_sum(after, "goat_batch_size_count") - metric_sum(
        before, "goat_batch_size_count")
    seqs = metric_sum(after, "goat_batch_size_sum") - metric_sum(before, "goat_batch_size_sum")
    return seqs / steps if steps else 0.0
