"""The side-by-side benchmark's results (one per case and round) and its report: the tables of
throughput and latency per case, and the ratios to the goals, the median of the per-round
ratios."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from benchmarks.floors import format_ratio, median_of_ratios
from loadtests.common import format_table, pct
from loadtests.report import Summary

if TYPE_CHECKING:
    from loadtests.side_by_side import BenchConfig

GOAL_BASE = 0.9  # goat-serve base >= 0.9x vLLM base
GOAL_GOAT = 3.0  # goat-serve with 16 GOAT >= 3x vLLM with 16 LoRA
GOAL_GOAT_BASE = 0.85  # goat-serve with 16 GOAT (default flags) >= 0.85x its base


@dataclass
class Case:
    """One server configuration and the adapters its requests name."""

    key: str  # file-name friendly
    system: str  # "vLLM" or "goat-serve"
    label: str
    models: list[str]
    threads: str = ""


@dataclass
class CaseResult:
    case: Case
    startup_s: float
    threads_note: str
    load_avg: str  # the machine's load averages when the case started
    others_busy: float  # fraction of the CPUs other jobs used just before the case started
    runs: dict[str, Summary] = field(default_factory=dict)  # "closed" / "poisson" -> summary
    cores: dict[str, float] = field(default_factory=dict)  # CPU cores the server used per run
    round: int = 1
    floor_tok_s: float | None = None  # decode floor at this round's bandwidth (goat-serve)


def decode_of_floor(config: BenchConfig, r: CaseResult, mode: str) -> float | None:
    """The closed loop's decode rate (clients / TPOT p50) as a fraction of its floor."""
    s, tpot = r.runs.get(mode), None
    if s is not None and r.floor_tok_s:
        tpot = pct(s.tpot_ms, 50)
    return config.concurrency * 1000.0 / tpot / r.floor_tok_s if tpot else None


def results_table(config: BenchConfig, results: Sequence[CaseResult], mode: str) -> str:
    rows = []
    for r in results:
        s = r.runs.get(mode)
        if s is None:
            continue
        floor = mode == "closed" and r.floor_tok_s
        rows.append([
            r.round, r.case.system, r.case.label, r.case.threads or "-",
            f"{s.num_ok}/{s.num_requests}", s.request_throughput, s.output_token_throughput,
            pct(s.ttft_ms, 50), pct(s.ttft_ms, 90), pct(s.ttft_ms, 99),
            pct(s.tpot_ms, 50), pct(s.tpot_ms, 90), pct(s.tpot_ms, 99), r.cores.get(mode),
            r.floor_tok_s if floor else None, decode_of_floor(config, r, mode) if floor else None,
        ])
    headers = [
        "round", "server", "adapters", "threads", "ok", "req/s", "out tok/s",
        "TTFT p50 ms", "TTFT p90", "TTFT p99", "TPOT p50 ms", "TPOT p90", "TPOT p99",
        "cores used", "decode floor tok/s", "decode of floor",
    ]
    return format_table(headers, rows)


def ratio_table(results: Sequence[CaseResult]) -> str:
    """goat-serve over vLLM, closed-loop throughput: the median of the per-round ratios, with
    each round's (the cases of one round ran minutes apart, rounds one after another)."""
    rounds: dict[int, dict[str, float]] = {}
    for r in results:
        if "closed" in r.runs:
            rounds.setdefault(r.round, {})[r.case.key] = r.runs["closed"].output_token_throughput
    per_round = [rounds[k] for k in sorted(rounds)]
    keys = {r.case.key for r in results}
    pairs = [
        ("goat-base", "vllm-base", GOAL_BASE, "goat-serve base / vLLM base"),
        ("goat-lora16", "vllm-lora16", None, "goat-serve 16 LoRA / vLLM 16 LoRA"),
        ("goat-goat16", "vllm-lora16", GOAL_GOAT, "goat-serve 16 GOAT / vLLM 16 LoRA"),
        ("goat-goat16-unmerged", "vllm-lora16", GOAL_GOAT,
         "goat-serve 16 GOAT --no-merge-static / vLLM 16 LoRA"),
        ("goat-goat16", "goat-base", GOAL_GOAT_BASE, "goat-serve 16 GOAT / goat-serve base"),
        ("goat-lora16", "goat-base", None, "goat-serve 16 LoRA / goat-serve base"),
    ]
    for key in sorted(k for k in keys if k.startswith("goat-vllm-goat16-")):  # --goat-vllm
        pairs += [(key, key.replace("goat-vllm-goat16-", "vllm-lora16-"), None,
                   "goat-serve --engine vllm 16 GOAT / vLLM 16 LoRA"),
                  (key, "goat-goat16", None,
                   "goat-serve --engine vllm 16 GOAT / goat-serve 16 GOAT")]
    rows = []
    for num, den_prefix, goal, label in pairs:
        for den in sorted(k for k in keys if k == den_prefix or k.startswith(den_prefix + "-t")):
            if num not in keys:
                continue
            median, ratios = median_of_ratios(per_round, num, den)
            verdict = "-" if goal is None else (
                f"{'met' if median >= goal else 'NOT met'} (goal >= {goal:g}x)")
            rows.append([label, den, format_ratio(median, ratios), verdict])
    return format_table(["ratio", "denominator", "median (per round)", "goal"], rows)


def report(config: BenchConfig, results: Sequence[CaseResult]) -> str:
    lines = [
        f"SmolLM2-135M shapes, random fp32 weights; {config.num_adapters} adapters per case "
        f"(LoRA r={config.rank}; GOAT r={config.rank}, E={config.num_experts}, "
        f"k={config.top_k}; all seven projections).",
        "",
        f"Closed loop: {config.concurrency} clients, {config.num_requests} requests of "
        f"{config.prompt_len} prompt + {config.output_len} generated tokens (ignore_eos), "
        "adapters round-robin.",
        "",
        results_table(config, results, "closed"),
        "",
    ]
    if config.poisson:
        lines += [
            f"Open loop: Poisson arrivals at {config.poisson_rate:g} req/s for "
            f"{config.poisson_duration_s:g} s, same requests.",
            "",
            results_table(config, results, "poisson"),
            "",
        ]
    lines += [
        f"Ratios of closed-loop throughput, the median over {config.rounds} rounds of the "
        "per-round ratios; decode floor: clients x steps over the bytes the decode steps read "
        "(base weights, each adapter's rows, the KV cache; benchmarks/floors.py) at the "
        "bandwidth a copy loop measured at the start of the round; decode of floor: clients / "
        "TPOT p50 over it.",
        "",
        ratio_table(results),
        "",
        "'cores used': CPU seconds of the server's processes per second of the run (2 cores "
        "here). Per case: start-up to healthy, the share of the CPUs other jobs took just "
        "before it started, the load averages (1, 5, 15 min), and vLLM's threads:",
        "",
    ]
    for r in results:
        note = f"; {r.threads_note}" if r.threads_note else ""
        lines.append(f"- {r.case.system} {r.case.label} ({r.case.threads or 'default'}): "
                     f"started in {r.startup_s:.0f} s; others {r.others_busy:.0%} busy; load "
                     f"{r.load_avg}{note}")
    return "\n".join(lines)
