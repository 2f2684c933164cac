"""What the churn benchmark reads from a run: disk loads per adapter polled from /metrics
during the load, the requests that waited for one (cold), the first request of each adapter,
sequences per engine step, the server's histograms between two scrapes (quantiles and the top
bucket, for load times and step stalls) and the median of per-round ratios."""

from __future__ import annotations

import asyncio
import contextlib
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from loadtests.common import metric_sum, scrape
from loadtests.loadgen import LoadConfig, LoadResult, run_load
from loadtests.report import RequestRecord


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


def histogram_mean(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """Mean observation of histogram `name` between two /metrics scrapes (0 without any)."""
    count = metric_sum(after, f"{name}_count") - metric_sum(before, f"{name}_count")
    total = metric_sum(after, f"{name}_sum") - metric_sum(before, f"{name}_sum")
    return total / count if count else 0.0


def seqs_per_step(before: dict[str, float], after: dict[str, float]) -> float:
    """Mean sequences per engine step between two /metrics scrapes (goat_batch_size)."""
    return histogram_mean(before, after, "goat_batch_size")


Buckets = list[tuple[float, float]]  # (upper bound `le`, observations in this bucket alone)


def histogram_delta(before: dict[str, float], after: dict[str, float], name: str) -> Buckets:
    """The observations of histogram `name` (no other labels) between two scrapes, per bucket
    (not cumulative), sorted by bound; the last bound is +Inf."""
    prefix = f'{name}_bucket{{le="'

    def cumulative(samples: dict[str, float]) -> dict[float, float]:
        return {float(k[len(prefix):-2]): v for k, v in samples.items() if k.startswith(prefix)}

    b, a = cumulative(before), cumulative(after)
    out, below = [], 0.0
    for le in sorted(a):
        total = a[le] - b.get(le, 0.0)
        out.append((le, total - below))
        below = total
    return out


def quantile(buckets: Buckets, q: float) -> float | None:
    """The q-quantile (0..1) of bucketed observations, interpolated linearly within its bucket
    as Prometheus' histogram_quantile does; the top finite bound if it falls in +Inf."""
    total = sum(n for _, n in buckets)
    if not total:
        return None
    rank, seen, lower = q * total, 0.0, 0.0
    for le, n in buckets:
        if n and seen + n >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - seen) / n
        seen += n
        lower = le if not math.isinf(le) else lower
    return lower


def top_bucket(buckets: Buckets) -> tuple[float, float] | None:
    """(lower, upper) bounds of the highest bucket with an observation: the maximum lies there."""
    lower, top = 0.0, None
    for le, n in buckets:
        if n:
            top = (lower, le)
        lower = le
    return top


def median_ratio(pairs: Sequence[tuple[float, float]]) -> tuple[float, list[float]]:
    """The median of per-round ratios numerator / denominator, and the ratios."""
    ratios = [a / b for a, b in pairs]
    return statistics.median(ratios), ratios


def pooled(buckets: Sequence[Buckets]) -> Buckets:
    """Observations of several histogram deltas together, per bucket."""
    total: dict[float, float] = {}
    for one in buckets:
        for le, n in one:
            total[le] = total.get(le, 0.0) + n
    return sorted(total.items())
