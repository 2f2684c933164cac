"""The churn benchmark's report: per round and case, the ratios (median of per-round ratios),
adapter loads, step stalls, first requests and host memory (loadtests/churn.py)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loadtests.churn_metrics import Buckets, first_uses, median_ratio, pooled, quantile, top_bucket
from loadtests.common import format_table, pct
from loadtests.report import LatencyStats

if TYPE_CHECKING:
    from loadtests.churn import CaseRun, ChurnConfig, MemoryRun

MB = 1e6
CASES = ("resident", "preloaded", "churn", "s3")  # loadtests/churn.py's cases, in report order


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _longest(run: CaseRun) -> float | None:
    top = top_bucket(run.step_buckets)
    return None if top is None else top[1]


def round_table(runs: Sequence[CaseRun]) -> str:
    rows = []
    for r in runs:
        s = r.result.summary
        rows.append([
            r.round + 1, r.case, f"{s.num_ok}/{s.num_requests}", len(s.requests_by_adapter),
            int(r.loads), s.output_token_throughput, pct(s.ttft_ms, 50), pct(s.ttft_ms, 99),
            pct(s.tpot_ms, 50), r.seqs_per_step, r.adapters_per_step,
            _ms(quantile(r.step_buckets, 0.5)),
            _ms(_longest(r)), r.rss_bytes / MB, r.cores, f"{r.others_busy:.0%}",
        ])
    return format_table(
        ["round", "case", "ok", "adapters used", "loads", "out tok/s", "TTFT p50 ms", "TTFT p99",
         "TPOT p50 ms", "seqs/step", "adapters/step", "step p50 ms", "longest step <= ms", "RSS MB",
         "cores used", "others busy before"], rows)


def ratio_line(runs: Sequence[CaseRun], case: str, goal: float | None,
               against: str = "resident", why: str = "") -> str | None:
    by_round: dict[int, dict[str, float]] = {}
    for r in runs:
        by_round.setdefault(r.round, {})[r.case] = r.tok_s
    pairs = [(c[case], c[against]) for c in by_round.values() if case in c and against in c]
    if not pairs:
        return None
    median, ratios = median_ratio(pairs)
    rounds = ", ".join(f"{x:.2f}" for x in ratios)
    text = f"Throughput, {case} / {against}{why}: **{median:.2f}x** (median; rounds {rounds})"
    if goal is not None:
        text += f"; goal >= {goal:g}x: {'met' if median >= goal else 'NOT met'}"
    return text + "."


def loads_line(runs: Sequence[CaseRun], case: str) -> str | None:
    mine = [r for r in runs if r.case == case]
    loads = sum(r.loads for r in mine)
    if not loads:
        return None
    buckets = pooled([r.load_buckets for r in mine])
    per_s = [r.loads / r.result.elapsed_s for r in mine]
    return (f"{case}: {int(loads)} loads in {len(mine)} rounds, "
            f"{statistics.median(per_s):.2f} adapters/s during the load (median of rounds; "
            f"demand, not capacity); load time mean "
            f"{sum(r.load_seconds_sum for r in mine) / loads * 1000:.0f} ms, "
            f"{_percentiles(buckets)} (goat_adapter_load_seconds buckets).")


def _percentiles(buckets: Buckets) -> str:
    p50, p99 = quantile(buckets, 0.5), quantile(buckets, 0.99)
    if p50 is None or p99 is None:
        return "no load"
    return f"p50 ~{p50 * 1000:.0f} ms, p99 ~{p99 * 1000:.0f} ms"


def stall_line(runs: Sequence[CaseRun], case: str) -> str | None:
    mine = [r for r in runs if r.case == case and r.step_buckets]
    p50 = quantile(pooled([r.step_buckets for r in mine]), 0.5)
    longest = [x for x in map(_longest, mine) if x is not None]
    if p50 is None or not longest:
        return None
    return (f"{case}: step p50 ~{p50 * 1000:.0f} ms, longest <= {max(longest) * 1000:.0f} ms "
            f"({max(longest) / p50:.1f}x the median)")


def first_request_line(runs: Sequence[CaseRun]) -> str | None:
    parts = []
    for case, where in (("churn", "local disk"), ("s3", "S3, not yet downloaded")):
        seconds = [r.first_request_s for r in runs if r.case == case
                   and r.first_request_s is not None]
        if seconds:
            parts.append(f"{where} {statistics.median(seconds) * 1000:.0f} ms (rounds "
                         + ", ".join(f"{s * 1000:.0f}" for s in seconds) + ")")
        firsts = LatencyStats.of(x.ttft_s for r in runs if r.case == case
                                 for x in first_uses(r.result.records) if x.ttft_s is not None)
        if firsts.count:
            parts.append(f"under the load, {case}'s first request of each adapter: TTFT p50 "
                         f"{pct(firsts, 50):.0f} ms, p99 {pct(firsts, 99):.0f} ms "
                         f"(n = {firsts.count})")
    if not parts:
        return None
    return ("First request of an adapter no request had used (16 prompt tokens, idle server, "
            "TTFT median): " + "; ".join(parts) + ".")


def memory_lines(memory: MemoryRun) -> list[str]:
    n = memory.adapters
    per_rss = (memory.rss - memory.rss_base) / n
    per_host = memory.host_bytes / memory.host_adapters if memory.host_adapters else 0.0
    lines = [
        f"Host memory, {n} adapters resident in one server (`--max-cpu-adapters "
        f"{max(n, 128)}`, one request each, others {memory.others_busy:.0%} busy before): RSS "
        f"{memory.rss_base / MB:.0f} MB with the base alone, {memory.rss / MB:.0f} MB with "
        f"{int(memory.host_adapters)} adapters, {per_rss / MB:.1f} MB per adapter; "
        f"goat_adapter_memory_bytes{{tier=\"host\"}} {memory.host_bytes / MB:.0f} MB, "
        f"{per_host / MB:.1f} MB per adapter.",
    ]
    if n != 1000:
        lines.append(f"For 1,000 adapters, extrapolated from {n}: RSS about "
                     f"{(memory.rss_base + 1000 * per_rss) / 1e9:.1f} GB, host bytes "
                     f"{1000 * per_host / 1e9:.1f} GB.")
    if memory.loads:
        lines.append(f"Loading them, {memory.loads / memory.elapsed_s:.1f} adapters/s (all "
                     f"requested at once: the loader's capacity); load time mean "
                     f"{memory.load_seconds_sum / memory.loads * 1000:.0f} ms, "
                     f"{_percentiles(memory.load_buckets)}.")
    return lines


def report(config: ChurnConfig, runs: Sequence[CaseRun], memory: MemoryRun | None,
           memory_failure: str | None = None) -> str:
    tail = memory_lines(memory) if memory is not None else []
    if memory_failure is not None:
        tail = [f"Host memory, {config.memory_adapters} adapters resident in one server: the "
                f"run failed ({memory_failure})."]
    if not runs:
        return "\n".join(tail) + "\n"
    cases = sorted({r.case for r in runs}, key=CASES.index)
    out = [
        f"{config.num_adapters} {config.kind.upper()} adapters (r=8"
        + (", E=8, k=2" if config.kind == "goat" else "") + ", all projections); goat-serve "
        f"with its defaults but --max-cpu-adapters {config.max_cpu_adapters}; closed loop of "
        f"{config.concurrency} clients, {config.num_requests} requests of {config.prompt_len} "
        f"prompt + {config.output_len} generated tokens, adapters by Zipf({config.zipf_alpha:g}). "
        f"Cases {', '.join(cases)}, interleaved over {config.rounds} rounds (order rotated), "
        f"each on a fresh server. resident: over the {config.resident_adapters} most popular, "
        f"loaded first; preloaded: the churn load with the adapters it uses loaded first; "
        f"churn: over all {config.num_adapters} from local disk, none loaded; "
        f"s3: the same from moto's S3 server on loopback, nothing downloaded.",
        "", round_table(runs), "",
    ]
    lines = [ratio_line(runs, "churn", config.goal),
             ratio_line(runs, "churn", None, "preloaded", " (the loads' own cost)"),
             ratio_line(runs, "preloaded", None, "resident",
                        " (more distinct adapters a step, nothing loaded)"),
             ratio_line(runs, "s3", None),
             *(loads_line(runs, c) for c in cases if c != "resident"),
             "Longest step stall (goat_step_seconds; the longest is a bucket's upper bound, "
             "25 % wide): " + "; ".join(filter(None, (stall_line(runs, c) for c in cases)))
             + ".",
             first_request_line(runs)]
    s3 = [r for r in runs if r.case == "s3"]
    if s3:
        lines.append(f"S3 downloads per round: {', '.join(str(int(r.downloads)) for r in s3)} "
                     f"({statistics.median(r.download_bytes for r in s3) / 1e9:.2f} GB median).")
    for line in lines:
        if line:
            out += [line, ""]
    out += tail
    return "\n".join(out).rstrip() + "\n"
