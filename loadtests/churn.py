"""Adapter churn: many adapters on disk, few resident, Zipf popularity.

goat-serve serves 200 GOAT adapters from disk with `--max-loras 8 --max-cpu-adapters 32`, under a
closed loop whose requests pick adapters by Zipf(1.0). It reports:
- hot-load latency: the TTFT of requests that had to wait for their adapter to be read from
  disk (a disk load of that adapter finished between the request's start and its first token,
  seen by polling /metrics' `goat_adapter_loads_total`), p50 and p99; also the first request of
  each adapter, and the server's own `goat_adapter_load_seconds`;
- throughput relative to the same load over 16 adapters that all stay resident
  (`--max-loras 16`), measured first. Goal: at least 0.8x;
- the ceiling of that ratio: the base model alone at as many clients as 8 slots let run at once
  (the simulated slot bound) against the full number, on one server (fewer sequences per step
  cost more per sequence, whatever the adapters cost).

    .venv/bin/python -m loadtests.churn [--num-adapters 200] [--num-requests 128]
    .venv/bin/python -m loadtests.churn --loads-only 50   # adapter load time alone, p50/p99

A benchmark script, not a test: it takes minutes and all of the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from benchmarks.random_model import write_adapters
from goat_runtime.adapters.binding import base_linear_shapes
from loadtests.churn_metrics import (
    Poll,
    cold_requests,
    first_uses,
    run_polled,
    seqs_per_step,
    slot_bound,
)
from loadtests.common import (
    BASE_NAME,
    CACHE,
    REPO,
    GoatServeConfig,
    ServerProcess,
    add_max_busy_arg,
    cpu_busy,
    format_table,
    goat_serve,
    load_avg,
    machine_summary,
    metric_sum,
    pct,
    scrape,
    wait_for_quiet,
    write_random_smollm,
)
from loadtests.loadgen import LoadConfig, LoadResult, run_load
from loadtests.report import LatencyStats, format_summary
from loadtests.workload import LengthDist

GOAL = 0.8


@dataclass
class ChurnConfig:
    work_dir: Path = CACHE / "bench"
    out_dir: Path = CACHE / "results" / "churn"
    plot_dir: Path | None = REPO / "docs" / "img"
    kind: str = "goat"  # adapter kind on disk: goat or lora
    num_adapters: int = 200
    resident_adapters: int = 16  # the baseline
    max_loras: int = 8
    max_cpu_adapters: int = 32
    zipf_alpha: float = 1.0
    concurrency: int = 32
    num_requests: int = 128
    prompt_len: int = 128
    output_len: int = 64
    poll_s: float = 0.5  # /metrics polling interval
    max_busy: float | None = None
    loads_only: int = 0  # > 0: only time that many adapter loads (measure_loads), no server


@dataclass
class ChurnRun:
    label: str
    result: LoadResult
    polls: list[Poll] = field(default_factory=list)
    load_count: float = 0.0  # server-side adapter loads during the run
    load_seconds_sum: float = 0.0
    cores: float = 0.0  # CPU cores the server used during the run
    seqs_per_step: float = 0.0  # mean sequences per engine step (goat_batch_size)
    slot_bound: float = 0.0  # the same for an engine limited only by its slots (slot_bound)
    others_busy: float = 0.0  # share of the CPUs other jobs used just before it started


@dataclass
class Ceiling:
    """The base model alone (no adapter at all) under the same closed loop, at the number of
    clients the churn run's slots let run at once and at the full number: what an engine whose
    adapters cost nothing would reach, since fewer sequences per step cost more per sequence."""

    clients: tuple[int, int]  # (slot bound rounded, config.concurrency)
    tok_s: tuple[float, float]
    seqs_per_step: tuple[float, float]

    @property
    def ratio(self) -> float:
        return self.tok_s[0] / self.tok_s[1]


def load_config(config: ChurnConfig, url: str, models: list[str], seed: int) -> LoadConfig:
    return LoadConfig(
        models=models, url=url, concurrency=config.concurrency, num_requests=config.num_requests,
        adapter_dist="zipf", zipf_alpha=config.zipf_alpha,
        prompt_len=LengthDist("fixed", config.prompt_len),
        output_len=LengthDist("fixed", config.output_len), ignore_eos=True,
        drain_timeout_s=1800.0, request_timeout_s=1800.0, seed=seed,
    )


def measure(
    config: ChurnConfig, label: str, server: ServerProcess, models: list[str], warm: list[str],
    max_loras: int,
) -> ChurnRun:
    """Start the server, load the `warm` adapters, run the Zipf load with polling, stop."""
    busy = wait_for_quiet(config.max_busy)
    busy = cpu_busy(5.0) if busy is None else busy
    print(f"\n=== {label}: starting (others {busy:.0%} busy, load avg {load_avg()})",
          file=sys.stderr, flush=True)
    server.start()
    try:
        server.wait_healthy(600)
        warmup = LoadConfig(
            models=warm, url=server.url, concurrency=len(warm), num_requests=len(warm),
            adapter_dist="round-robin", prompt_len=LengthDist("fixed", 16),
            output_len=LengthDist("fixed", 2), ignore_eos=True, drain_timeout_s=900.0,
            request_timeout_s=900.0,
        )
        warm_result = asyncio.run(run_load(warmup))
        if warm_result.summary.num_errors:
            raise RuntimeError(f"warm-up failed:\n{format_summary(warm_result.summary)}")
        before = scrape(server.url)
        load = load_config(config, server.url, models, seed=7)
        cpu0 = server.cpu_seconds()
        result, polls = asyncio.run(run_polled(load, server.url, config.poll_s))
        cores = (server.cpu_seconds() - cpu0) / result.elapsed_s
        after = scrape(server.url)
        print(format_summary(result.summary), file=sys.stderr, flush=True)
        run = ChurnRun(label, result, polls, cores=cores, others_busy=busy)
        run.load_count = metric_sum(after, "goat_adapter_load_seconds_count") - metric_sum(
            before, "goat_adapter_load_seconds_count")
        run.load_seconds_sum = metric_sum(after, "goat_adapter_load_seconds_sum") - metric_sum(
            before, "goat_adapter_load_seconds_sum")
        run.seqs_per_step = seqs_per_step(before, after)
        run.slot_bound = slot_bound(len(models), max_loras, config.concurrency, config.zipf_alpha,
                                    config.output_len)
        return run
    finally:
        server.stop()


def measure_ceiling(config: ChurnConfig, server: ServerProcess, clients: tuple[int, int]
                    ) -> Ceiling:
    """Run the base-model load at each number of clients on one server start."""
    busy = wait_for_quiet(config.max_busy)
    busy = cpu_busy(5.0) if busy is None else busy
    print(f"\n=== ceiling: base model at {clients[0]} and {clients[1]} clients (others "
          f"{busy:.0%} busy, load avg {load_avg()})", file=sys.stderr, flush=True)
    server.start()
    try:
        server.wait_healthy(600)
        tok_s, seqs = [], []
        for n in clients:
            load = replace(load_config(config, server.url, [BASE_NAME], seed=7), concurrency=n)
            before = scrape(server.url)
            result = asyncio.run(run_load(load))
            after = scrape(server.url)
            if result.summary.num_errors:
                raise RuntimeError(f"ceiling run failed:\n{format_summary(result.summary)}")
            print(format_summary(result.summary), file=sys.stderr, flush=True)
            seqs.append(seqs_per_step(before, after))
            tok_s.append(result.summary.output_token_throughput)
        return Ceiling(clients, (tok_s[0], tok_s[1]), (seqs[0], seqs[1]))
    finally:
        server.stop()


def ms(stats: LatencyStats, q: int) -> float | None:
    return pct(stats, q)


def report(config: ChurnConfig, baseline: ChurnRun, churn: ChurnRun, ceiling: Ceiling) -> str:
    rows = []
    for run in (baseline, churn):
        s = run.result.summary
        rows.append([
            run.label, f"{s.num_ok}/{s.num_requests}", len(s.requests_by_adapter),
            int(run.load_count), s.request_throughput, s.output_token_throughput,
            pct(s.ttft_ms, 50), pct(s.ttft_ms, 99), pct(s.tpot_ms, 50), pct(s.tpot_ms, 99),
            run.seqs_per_step, run.slot_bound, run.cores, f"{run.others_busy:.0%}",
        ])
    main_table = format_table(
        ["run", "ok", "adapters used", "disk loads", "req/s", "out tok/s", "TTFT p50 ms",
         "TTFT p99", "TPOT p50 ms", "TPOT p99", "seqs/step", "slot bound", "cores used",
         "others busy before"],
        rows,
    )
    records = churn.result.records
    cold = cold_requests(records, churn.polls)
    cold_ids = {r.index for r in cold}
    warm = [r for r in records if r.ok and r.index not in cold_ids and r.ttft_s is not None]
    firsts = first_uses(records)
    groups = [
        ("cold: adapter loaded from disk while waiting", cold),
        ("first request of each adapter", firsts),
        ("warm: adapter already loaded", warm),
    ]
    lat_rows = []
    for name, group in groups:
        stats = LatencyStats.of(r.ttft_s for r in group if r.ttft_s is not None)
        lat_rows.append([name, stats.count, ms(stats, 50), ms(stats, 99), stats.max])
    lat_table = format_table(["requests (churn run)", "n", "TTFT p50 ms", "TTFT p99", "max"],
                             lat_rows)
    mean_load = churn.load_seconds_sum / churn.load_count if churn.load_count else None
    ratio = (churn.result.summary.output_token_throughput
             / baseline.result.summary.output_token_throughput)
    verdict = "met" if ratio >= GOAL else "NOT met"
    return "\n".join([
        f"{config.num_adapters} {config.kind.upper()} adapters on disk (r=8"
        + (", E=8, k=2" if config.kind == "goat" else "") + f"), goat-serve --max-loras "
        f"{config.max_loras} --max-cpu-adapters {config.max_cpu_adapters}; closed loop of "
        f"{config.concurrency} clients, {config.num_requests} requests of {config.prompt_len} "
        f"prompt + {config.output_len} generated tokens, adapters by Zipf({config.zipf_alpha:g}). "
        f"Baseline: the same load over {config.resident_adapters} adapters, all resident "
        f"(--max-loras {config.resident_adapters}, loaded before the run).",
        "",
        main_table,
        "",
        lat_table,
        "",
        f"Server-side adapter load time (goat_adapter_load_seconds, churn run): "
        f"{int(churn.load_count)} loads, mean "
        + (f"{mean_load * 1000:.0f} ms" if mean_load is not None else "-") + ".",
        "",
        f"Throughput, churn / resident: {ratio:.2f}x (goal >= {GOAL:g}x: {verdict}).",
        "",
        f"Ceiling: the base model alone (no adapter, same server) at {ceiling.clients[0]} "
        f"clients (the slot bound, rounded) makes {ceiling.tok_s[0]:.1f} tok/s "
        f"({ceiling.seqs_per_step[0]:.2f} seqs/step), at {ceiling.clients[1]} clients "
        f"{ceiling.tok_s[1]:.1f} tok/s ({ceiling.seqs_per_step[1]:.2f} seqs/step): "
        f"{ceiling.ratio:.2f}x. An engine whose adapters cost nothing, at the slot bound, would "
        f"reach about that ratio; churn reaches {ratio / ceiling.ratio:.2f} of it.",
        "",
        f"'seqs/step': sequences per engine step, from the server's goat_batch_size. 'slot "
        f"bound': the same for an ideal engine limited only by its adapter slots, under this "
        f"closed loop (`slot_bound`, simulated): with {config.max_loras} slots over "
        f"{config.num_adapters} adapters it runs {churn.slot_bound:.1f} of "
        f"{config.concurrency} sequences per step, "
        f"{churn.slot_bound / baseline.slot_bound:.2f}x the resident run's "
        f"{baseline.slot_bound:.1f}.",
    ])


def prepare(config: ChurnConfig) -> tuple[Path, Path, list[str]]:
    model_dir = write_random_smollm(config.work_dir / BASE_NAME)
    names = [f"churn-{i}" for i in range(config.num_adapters)]
    folder = config.work_dir / f"churn-{config.kind}"
    print(f"writing {config.num_adapters} adapters to {folder} (once)", file=sys.stderr,
          flush=True)
    write_adapters(folder, base_linear_shapes(model_dir), names, config.kind, seed=5000)
    return model_dir, folder, names


def run(config: ChurnConfig) -> tuple[ChurnRun, ChurnRun, Ceiling]:
    model_dir, folder, names = prepare(config)
    logs = config.out_dir / "logs"
    hot = names[: config.resident_adapters]
    common = {"served_model_name": BASE_NAME, "max_num_seqs": max(64, config.concurrency)}
    baseline_server = goat_serve(
        GoatServeConfig(model_dir, folder, max_loras=config.resident_adapters,
                        max_cpu_adapters=max(config.max_cpu_adapters, config.resident_adapters),
                        **common),
        logs / "resident.log",
    )
    baseline = measure(config, f"{config.resident_adapters} resident", baseline_server, hot, hot,
                       config.resident_adapters)
    churn_server = goat_serve(
        GoatServeConfig(model_dir, folder, max_loras=config.max_loras,
                        max_cpu_adapters=config.max_cpu_adapters, **common),
        logs / "churn.log",
    )
    churn = measure(config, f"{config.num_adapters} on disk, churn", churn_server, names,
                    [BASE_NAME], config.max_loras)
    ceiling_server = goat_serve(
        GoatServeConfig(model_dir, max_loras=config.max_loras,
                        max_cpu_adapters=config.max_cpu_adapters, **common),
        logs / "ceiling.log",
    )
    clients = (max(1, round(churn.slot_bound)), config.concurrency)
    ceiling = measure_ceiling(config, ceiling_server, clients)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "ceiling.json").write_text(json.dumps(asdict(ceiling)) + "\n")
    for tag, r in (("resident", baseline), ("churn", churn)):
        r.result.write_json(config.out_dir / f"{tag}.json")
        (config.out_dir / f"{tag}-polls.json").write_text(
            json.dumps([asdict(p) for p in r.polls]) + "\n")
        if config.plot_dir is not None:
            config.plot_dir.mkdir(parents=True, exist_ok=True)
            r.result.write_plot(config.plot_dir / f"churn-{tag}.png")
    return baseline, churn, ceiling


def measure_loads(folder: Path, names: Sequence[str], shapes: dict[str, tuple[int, int]],
                  rounds: int = 3) -> LatencyStats:
    """Read-and-check time of each adapter (`format.load_adapter`, what the loader thread runs
    before the static terms) from a warm page cache: every file is read once first."""
    from goat_runtime.adapters.format import load_adapter

    for name in names:
        for path in (folder / name).iterdir():
            path.read_bytes()
    seconds = []
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            load_adapter(folder / name, shapes)
            seconds.append(time.perf_counter() - start)
    return LatencyStats.of(seconds)


def parse_args(argv: Sequence[str] | None = None) -> ChurnConfig:
    d = ChurnConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=d.work_dir)
    p.add_argument("--out-dir", type=Path, default=d.out_dir)
    p.add_argument("--plot-dir", default=str(d.plot_dir), help="'' for no plots")
    p.add_argument("--kind", choices=("goat", "lora"), default=d.kind)
    p.add_argument("--num-adapters", type=int, default=d.num_adapters)
    p.add_argument("--resident-adapters", type=int, default=d.resident_adapters)
    p.add_argument("--max-loras", type=int, default=d.max_loras)
    p.add_argument("--max-cpu-adapters", type=int, default=d.max_cpu_adapters)
    p.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--poll", type=float, default=d.poll_s, help="/metrics poll interval (s)")
    p.add_argument("--loads-only", type=int, default=0, metavar="N",
                   help="only time loading N adapters from a warm page cache (3 rounds)")
    add_max_busy_arg(p)
    a = p.parse_args(argv)
    if a.resident_adapters > a.num_adapters:
        p.error("--resident-adapters must not exceed --num-adapters")
    return ChurnConfig(
        work_dir=a.work_dir, out_dir=a.out_dir, plot_dir=Path(a.plot_dir) if a.plot_dir else None,
        kind=a.kind, num_adapters=a.num_adapters, resident_adapters=a.resident_adapters,
        max_loras=a.max_loras, max_cpu_adapters=a.max_cpu_adapters, zipf_alpha=a.zipf_alpha,
        concurrency=a.concurrency, num_requests=a.num_requests, prompt_len=a.prompt_len,
        output_len=a.output_len, poll_s=a.poll, max_busy=a.max_busy, loads_only=a.loads_only,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    machine = machine_summary()
    print(machine, file=sys.stderr)
    if config.loads_only:
        model_dir = write_random_smollm(config.work_dir / BASE_NAME)
        shapes = base_linear_shapes(model_dir)
        folder = config.work_dir / f"churn-{config.kind}"
        names = [f"churn-{i}" for i in range(config.loads_only)]
        write_adapters(folder, shapes, names, config.kind, seed=5000)
        size = sum(p.stat().st_size for p in (folder / names[0]).iterdir())
        stats = measure_loads(folder, names, shapes)
        print(f"{config.kind} adapter, r=8 E=8 k=2, all projections, {size / 1e6:.1f} MB: load "
              f"p50 {stats.percentiles['p50']:.1f} ms, p99 {stats.percentiles['p99']:.1f} ms "
              f"over {stats.count} loads")
        return 0
    baseline, churn, ceiling = run(config)
    text = report(config, baseline, churn, ceiling)
    print("\n" + text)
    (config.out_dir / "report.md").write_text(f"{text}\n\nMachine:\n\n```\n{machine}\n```\n")
    ok = baseline.result.summary.num_errors == 0 and churn.result.summary.num_errors == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
