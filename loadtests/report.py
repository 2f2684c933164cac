"""Per-request measurements and what is reported from them: percentiles, goodput, plots.

The metric definitions follow vLLM's benchmark_serving so goat-serve and vLLM numbers compare:
TTFT is send to first content chunk, TPOT is (e2e - ttft) / (output tokens - 1) per request, ITL
is every gap between content chunks pooled over requests, and goodput counts the requests per
second that succeeded within every SLO given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PERCENTILES: tuple[int, ...] = (50, 90, 99)


@dataclass
class RequestRecord:
    """One request's outcome; times are seconds, `start_s` from the start of the run."""

    index: int
    adapter: str
    prompt_words: int
    max_tokens: int
    start_s: float = 0.0
    # Open loop: when the arrival process wanted it sent; start_s - scheduled_s is client queueing.
    scheduled_s: float | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    tokens_from_usage: bool = False
    chunks: int = 0
    prompt_tokens: int | None = None
    status: int | None = None
    error_kind: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None when there is no second token."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok, "tpot_s": self.tpot_s}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class LatencyStats:
    """Distribution summary of one latency metric, in milliseconds; None fields mean no data."""

    count: int = 0
    mean: float | None = None
    min: float | None = None
    max: float | None = None
    percentiles: dict[str, float] = field(default_factory=dict)  # {"p50": ..., "p90": ...}

    @classmethod
    def of(cls, seconds: Iterable[float]) -> LatencyStats:
        ms = [s * 1000.0 for s in seconds]
        if not ms:
            return cls()
        return cls(
            count=len(ms),
            mean=sum(ms) / len(ms),
            min=min(ms),
            max=max(ms),
            percentiles={f"p{q}": percentile(ms, q) for q in PERCENTILES},
        )


@dataclass
class Summary:
    """Aggregate numbers for a run; throughputs divide by the run's wall time."""

    num_requests: int
    num_ok: int
    num_errors: int
    errors_by_kind: dict[str, int]
    error_examples: dict[str, str]  # the first message seen for each error kind
    requests_by_adapter: dict[str, int]
    elapsed_s: float
    request_throughput: float
    output_token_throughput: float
    total_output_tokens: int
    total_prompt_tokens: int | None
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    goodput: float | None = None  # requests/s meeting every SLO; None without SLOs
    num_good: int | None = None


def meets_slos(record: RequestRecord, slo_ttft_ms: float | None, slo_tpot_ms: float | None) -> bool:
    """Whether a request succeeded within the SLOs; a one-token output has no TPOT to miss."""
    if not record.ok:
        return False
    if slo_ttft_ms is not None and (record.ttft_s is None or record.ttft_s * 1000 > slo_ttft_ms):
        return False
    tpot = record.tpot_s
    return slo_tpot_ms is None or tpot is None or tpot * 1000 <= slo_tpot_ms


def summarize(
    records: Sequence[RequestRecord],
    elapsed_s: float,
    slo_ttft_ms: float | None = None,
    slo_tpot_ms: float | None = None,
) -> Summary:
    """Latency metrics come from successful requests only; errors are counted by kind."""
    ok = [r for r in records if r.ok]
    elapsed = max(elapsed_s, 1e-9)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    out_tokens = sum(r.output_tokens for r in ok)
    good: int | None = None
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        good = sum(meets_slos(r, slo_ttft_ms, slo_tpot_ms) for r in ok)
    failed = [r for r in records if not r.ok]
    errors = Counter(r.error_kind or "unknown" for r in failed)
    examples: dict[str, str] = {}
    for r in failed:
        examples.setdefault(r.error_kind or "unknown", r.error or "")
    return Summary(
        num_requests=len(records),
        num_ok=len(ok),
        num_errors=len(records) - len(ok),
        errors_by_kind=dict(errors.most_common()),
        error_examples=examples,
        # most requested first: with Zipf the popularity order is the interesting one
        requests_by_adapter=dict(
            sorted(Counter(r.adapter for r in records).items(), key=lambda kv: (-kv[1], kv[0]))
        ),
        elapsed_s=elapsed_s,
        request_throughput=len(ok) / elapsed,
        output_token_throughput=out_tokens / elapsed,
        total_output_tokens=out_tokens,
        total_prompt_tokens=sum(prompt_tokens) if prompt_tokens else None,
        ttft_ms=LatencyStats.of(r.ttft_s for r in ok if r.ttft_s is not None),
        tpot_ms=LatencyStats.of(t for r in ok if (t := r.tpot_s) is not None),
        itl_ms=LatencyStats.of(gap for r in ok for gap in r.itl_s),
        e2e_ms=LatencyStats.of(r.e2e_s for r in ok if r.e2e_s is not None),
        slo_ttft_ms=slo_ttft_ms,
        slo_tpot_ms=slo_tpot_ms,
        goodput=None if good is None else good / elapsed,
        num_good=good,
    )


def format_summary(summary: Summary) -> str:
    """A fixed-width text table, like benchmark_serving's, for the terminal."""
    s = summary
    lines = [
        "=" * 60,
        f"{'Requests (ok / errors / total)':<36}{s.num_ok} / {s.num_errors} / {s.num_requests}",
        f"{'Elapsed (s)':<36}{s.elapsed_s:.2f}",
        f"{'Request throughput (req/s)':<36}{s.request_throughput:.2f}",
        f"{'Output token throughput (tok/s)':<36}{s.output_token_throughput:.2f}",
        f"{'Total output tokens':<36}{s.total_output_tokens}",
    ]
    if s.total_prompt_tokens is not None:
        lines.append(f"{'Total prompt tokens (usage)':<36}{s.total_prompt_tokens}")
    if s.goodput is not None:
        slos = ", ".join(
            f"{name} <= {v:g} ms"
            for name, v in (("TTFT", s.slo_ttft_ms), ("TPOT", s.slo_tpot_ms))
            if v is not None
        )
        lines.append(f"{'Goodput (req/s)':<36}{s.goodput:.2f}  ({s.num_good} met {slos})")
    for kind, n in s.errors_by_kind.items():
        example = s.error_examples.get(kind, "")
        example = f"  (e.g. {example[:60]})" if example else ""
        lines.append(f"{'  error ' + kind:<36}{n}{example}")
    header = f"{'(ms)':<10}{'mean':>10}" + "".join(f"{'p' + str(q):>10}" for q in PERCENTILES)
    lines += ["-" * 60, header + f"{'max':>10}"]
    for name, stats in (
        ("TTFT", s.ttft_ms),
        ("TPOT", s.tpot_ms),
        ("ITL", s.itl_ms),
        ("E2E", s.e2e_ms),
    ):
        if stats.count == 0:
            lines.append(f"{name:<10}{'(no data)':>10}")
            continue
        row = f"{name:<10}{stats.mean:>10.2f}"
        row += "".join(f"{stats.percentiles[f'p{q}']:>10.2f}" for q in PERCENTILES)
        lines.append(row + f"{stats.max:>10.2f}")
    lines.append("-" * 60)
    adapters = ", ".join(f"{name}: {n}" for name, n in s.requests_by_adapter.items())
    lines += [f"Requests by adapter: {adapters}", "=" * 60]
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """Make a value strict-JSON safe: infinities and NaN become strings rather than invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def _chunk_times(record: RequestRecord) -> list[float]:
    """When (from the run start) a request's content chunks arrived, rebuilt from ttft + ITLs."""
    if record.ttft_s is None:
        return []
    t = record.start_s + record.ttft_s
    times = [t]
    for gap in record.itl_s:
        t += gap
        times.append(t)
    return times


def throughput_series(
    records: Sequence[RequestRecord], elapsed_s: float, max_buckets: int = 60
) -> tuple[list[float], list[float], list[float]]:
    """(bucket starts, completed ok requests/s, output tokens/s) over the run.

    Tokens are placed at the times their chunks arrived (each chunk weighted by the request's
    tokens per chunk), so the curve shows generation as it happened rather than at completion.
    """
    elapsed_s = max(elapsed_s, 1e-3)
    width = max(
        elapsed_s / max_buckets, min(1.0, elapsed_s / 10)
    )  # <= 1 s buckets once runs are long
    buckets = math.ceil(elapsed_s / width)
    reqs = [0.0] * buckets
    toks = [0.0] * buckets
    for r in records:
        if not r.ok or r.e2e_s is None:
            continue
        reqs[min(int((r.start_s + r.e2e_s) / width), buckets - 1)] += 1 / width
        times = _chunk_times(r)
        per_chunk = r.output_tokens / len(times) if times else 0.0
        for t in times:
            toks[min(int(t / width), buckets - 1)] += per_chunk / width
    return [i * width for i in range(buckets)], reqs, toks


def write_plot(records: Sequence[RequestRecord], summary: Summary, path: str | Path) -> None:
    """Histograms with CDFs of TTFT/TPOT/ITL/E2E, throughput over time and requests per adapter."""
    try:
        from matplotlib.figure import Figure  # a dev extra; only --plot needs it
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install -e '.[dev]'") from exc

    ok = [r for r in records if r.ok]
    metrics = {
        "TTFT (ms)": [r.ttft_s * 1000 for r in ok if r.ttft_s is not None],
        "TPOT (ms)": [t * 1000 for r in ok if (t := r.tpot_s) is not None],
        "ITL (ms)": [g * 1000 for r in ok for g in r.itl_s],
        "E2E latency (ms)": [r.e2e_s * 1000 for r in ok if r.e2e_s is not None],
    }
    fig = Figure(figsize=(16, 9), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    for ax, (name, values) in zip(axes, metrics.items(), strict=False):
        ax.set_title(name)
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.6)
        ax.set_ylabel("requests" if name != "ITL (ms)" else "gaps")
        cdf = ax.twinx()
        ordered = sorted(values)
        cdf.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], color="tab:red")
        cdf.set_ylim(0, 1.02)
        cdf.set_ylabel("CDF")
        for q in PERCENTILES:
            ax.axvline(percentile(values, q), color="gray", linestyle=":", linewidth=1)

    ax = axes[4]
    starts, reqs, toks = throughput_series(records, summary.elapsed_s)
    ax.set_title("Throughput over time")
    ax.step(starts, reqs, where="post", color="tab:blue", label="completed req/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("requests/s", color="tab:blue")
    tok_ax = ax.twinx()
    tok_ax.step(starts, toks, where="post", color="tab:green")
    tok_ax.set_ylabel("output tokens/s", color="tab:green")

    ax = axes[5]
    ax.set_title("Requests by adapter")
    names = list(summary.requests_by_adapter)
    ok_counts = Counter(r.adapter for r in ok)
    err_counts = Counter(r.adapter for r in records if not r.ok)
    xs = range(len(names))
    ax.bar(xs, [ok_counts[n] for n in names], color="tab:blue", label="ok")
    ax.bar(
        xs,
        [err_counts[n] for n in names],
        bottom=[ok_counts[n] for n in names],
        color="tab:red",
        label="error",
    )
    ax.set_xticks(list(xs), names, rotation=60 if len(names) > 6 else 0, fontsize=8)
    ax.legend()
    fig.suptitle(
        f"{summary.num_ok}/{summary.num_requests} ok, {summary.request_throughput:.2f} req/s, "
        f"{summary.output_token_throughput:.1f} tok/s"
    )
    fig.savefig(path, dpi=100)
