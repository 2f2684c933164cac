"""Adapter churn: many adapters on disk, Zipf popularity, against a few resident ones.

One goat-serve configuration, the server's defaults but `--max-cpu-adapters 128`, over a store
of 500 GOAT adapters (r = 8, E = 8, k = 2, all seven projections, SmolLM2-135M shapes), under a
closed loop of 32 clients whose requests pick adapters by Zipf(1.0). Cases, interleaved round by
round (each on a fresh server, so every round starts with no adapter loaded):
- resident: the same load over the 16 most popular adapters, all loaded before it starts;
- preloaded: the churn load with the adapters it will use (the same requests: one seed) loaded
  before it starts: against resident, what more distinct adapters a step cost (their values
  read each step); against it, churn's cost of loading;
- churn: over all 500, none loaded: every first use loads from local disk;
- s3: the churn load with `--adapter-dir s3://...`, a moto S3 server on loopback holding the
  adapters and an empty download cache.
It reports throughput churn / resident (median of the per-round ratios; goal >= 0.9x), churn /
preloaded, preloaded / resident and s3 / resident, distinct adapters per step, adapter loads
per second and their latency (`goat_adapter_load_seconds`), the longest engine step against
the median (`goat_step_seconds`: the stall loads cause), the first request of an adapter not
yet loaded (local) or not yet downloaded (S3) on an idle server, and, in a separate run, host
memory with 1,000 adapters resident (RSS and `goat_adapter_memory_bytes`).

    .venv/bin/python -m loadtests.churn                        # the issue's figures
    .venv/bin/python -m loadtests.churn --num-adapters 100 --num-requests 64 --memory-adapters 200
    .venv/bin/python -m loadtests.churn --loads-only 50   # adapter load time alone, p50/p99

A benchmark script, not a test: it takes many minutes and all of the machine's cores, and
25 MB of disk per adapter (twice that with the S3 case's copy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.random_model import write_adapters
from goat_runtime.adapters.binding import base_linears, linear_shapes, slice_groups
from goat_runtime.adapters.format import load_adapter
from goat_runtime.adapters.reader import AdapterReader
from goat_runtime.model.layers import FusedLinear
from loadtests.churn_metrics import (
    Buckets,
    Poll,
    histogram_delta,
    histogram_mean,
    run_polled,
    seqs_per_step,
)
from loadtests.churn_report import CASES, report
from loadtests.churn_s3 import S3Store, start_s3
from loadtests.common import (
    BASE_NAME,
    CACHE,
    REPO,
    GoatServeConfig,
    ServerProcess,
    add_max_busy_arg,
    cpu_busy,
    goat_serve,
    load_avg,
    machine_summary,
    metric_sum,
    proc_sample,
    scrape,
    wait_for_quiet,
    write_random_smollm,
)
from loadtests.loadgen import LoadConfig, LoadResult, run_load
from loadtests.report import LatencyStats, format_summary
from loadtests.workload import LengthDist

GOAL = 0.9


@dataclass
class ChurnConfig:
    work_dir: Path = CACHE / "bench"
    out_dir: Path = CACHE / "results" / "churn"
    plot_dir: Path | None = REPO / "docs" / "img"
    kind: str = "goat"  # adapter kind on disk: goat or lora
    num_adapters: int = 500
    resident_adapters: int = 16  # the baseline
    max_cpu_adapters: int = 128
    zipf_alpha: float = 1.0
    concurrency: int = 32
    num_requests: int = 128
    prompt_len: int = 128
    output_len: int = 64
    rounds: int = 3
    s3: bool = True
    memory_adapters: int = 1000  # adapters resident in the memory run; 0: no memory run
    # /metrics polling interval (loads over time, for the plots). Not shorter: a scrape of a
    # server with 72 adapters' series is 641 KB, 64 ms of the server's GIL (14 adapters: 11 ms)
    # and the load generator's parsing, on the same cores. Polled every 0.5 s, the 72-adapter
    # servers used 1.38-1.45 cores against the resident's 1.54-1.56; every 5 s, 1.58-1.63
    # against 1.60-1.62 (docs/benchmarks.md section 2).
    poll_s: float = 5.0
    busy_sample_s: float = 5.0  # how long to watch other jobs' CPU use before each case
    max_busy: float | None = None
    loads_only: int = 0  # > 0: only time that many adapter loads (measure_loads), no server
    goal: float = GOAL  # churn / resident throughput


@dataclass
class CaseRun:
    """One case of one round: the load's result and what the server's metrics said of it."""

    case: str
    round: int
    result: LoadResult
    polls: list[Poll] = field(default_factory=list)
    loads: float = 0.0  # adapter loads during the load
    load_seconds_sum: float = 0.0
    load_buckets: Buckets = field(default_factory=list)  # goat_adapter_load_seconds
    step_buckets: Buckets = field(default_factory=list)  # goat_step_seconds
    seqs_per_step: float = 0.0
    adapters_per_step: float = 0.0  # distinct adapters per step (goat_batch_adapters' mean)
    downloads: float = 0.0
    download_bytes: float = 0.0
    rss_bytes: int = 0  # the server's RSS after the load
    host_bytes: float = 0.0  # goat_adapter_memory_bytes{tier="host"} after the load
    host_adapters: float = 0.0
    first_request_s: float | None = None  # TTFT of an unused adapter's request, idle server
    cores: float = 0.0  # CPU cores the server used during the load
    others_busy: float = 0.0  # share of the CPUs other jobs used just before it started

    @property
    def tok_s(self) -> float:
        return self.result.summary.output_token_throughput


@dataclass
class MemoryRun:
    """`adapters` adapters loaded into one server, one tiny request each."""

    adapters: int
    rss_base: int  # RSS with the base model only (after one request)
    rss: int  # RSS with every adapter resident
    host_bytes: float  # goat_adapter_memory_bytes{tier="host"}
    host_adapters: float
    loads: float
    load_seconds_sum: float
    load_buckets: Buckets
    elapsed_s: float  # from the first request to the last answer
    others_busy: float


def load_config(config: ChurnConfig, url: str, models: list[str]) -> LoadConfig:
    return LoadConfig(
        models=models, url=url, concurrency=config.concurrency, num_requests=config.num_requests,
        adapter_dist="zipf", zipf_alpha=config.zipf_alpha,
        prompt_len=LengthDist("fixed", config.prompt_len),
        output_len=LengthDist("fixed", config.output_len), ignore_eos=True,
        drain_timeout_s=1800.0, request_timeout_s=1800.0, seed=7,
    )


def tiny_requests(url: str, models: list[str], concurrency: int) -> LoadResult:
    """One short request per model (round robin): loads adapters, warms the base. Raises if
    any fails."""
    result = asyncio.run(run_load(LoadConfig(
        models=models, url=url, concurrency=min(concurrency, len(models)),
        num_requests=len(models), adapter_dist="round-robin", prompt_len=LengthDist("fixed", 16),
        output_len=LengthDist("fixed", 2), ignore_eos=True, drain_timeout_s=1800.0,
        request_timeout_s=1800.0)))
    if result.summary.num_errors:
        raise RuntimeError(f"requests failed:\n{format_summary(result.summary)}")
    return result


def others_busy(config: ChurnConfig, label: str) -> float:
    busy = wait_for_quiet(config.max_busy)
    busy = cpu_busy(config.busy_sample_s) if busy is None else busy
    print(f"\n=== {label}: starting (others {busy:.0%} busy, load avg {load_avg()})",
          file=sys.stderr, flush=True)
    return busy


def measure_case(config: ChurnConfig, case: str, rnd: int, server: ServerProcess,
                 models: list[str], warm: list[str], unused: Sequence[str]) -> CaseRun:
    """Start the server, warm it (`warm`: adapters to load, or the base), run the Zipf load
    with polling, read its metrics, then time one request of the first of `unused` the load
    did not touch (none if `unused` is empty); stop the server."""
    busy = others_busy(config, f"round {rnd + 1}, {case}")
    server.start()
    try:
        server.wait_healthy(600)
        tiny_requests(server.url, warm, min(len(warm), config.concurrency))
        before = scrape(server.url)
        cpu0 = server.cpu_seconds()
        result, polls = asyncio.run(run_polled(load_config(config, server.url, models),
                                               server.url, config.poll_s))
        cores = (server.cpu_seconds() - cpu0) / result.elapsed_s
        after = scrape(server.url)
        print(format_summary(result.summary), file=sys.stderr, flush=True)
        run = CaseRun(case, rnd, result, polls, cores=cores, others_busy=busy)

        def delta(name: str, **labels: str) -> float:
            return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

        run.loads = delta("goat_adapter_load_seconds_count")
        run.load_seconds_sum = delta("goat_adapter_load_seconds_sum")
        run.load_buckets = histogram_delta(before, after, "goat_adapter_load_seconds")
        run.step_buckets = histogram_delta(before, after, "goat_step_seconds")
        run.seqs_per_step = seqs_per_step(before, after)
        run.adapters_per_step = histogram_mean(before, after, "goat_batch_adapters")
        run.downloads = delta("goat_adapter_downloads_total")
        run.download_bytes = delta("goat_adapter_download_bytes_total")
        run.host_bytes = metric_sum(after, "goat_adapter_memory_bytes", tier="host")
        run.host_adapters = metric_sum(after, "goat_adapter_memory_adapters", tier="host")
        assert server.proc is not None
        run.rss_bytes = proc_sample(server.proc.pid).rss_bytes
        fresh = [m for m in unused if m not in result.summary.requests_by_adapter]
        if fresh:
            first = tiny_requests(server.url, fresh[:1], 1).records[0]
            run.first_request_s = first.ttft_s
        return run
    finally:
        server.stop()


def run_case(config: ChurnConfig, case: str, rnd: int, model_dir: Path, folder: Path,
             names: list[str], store: S3Store | None) -> CaseRun:
    pool = names[: config.num_adapters]
    hot = pool[: config.resident_adapters]
    cache = config.work_dir / "s3-cache"  # emptied for each S3 case: nothing downloaded yet
    source: Path | str = folder
    extra: list[str] = []
    if case == "s3":
        assert store is not None
        source, extra = store.url, ["--adapter-cache-dir", str(cache)]
    server = goat_serve(GoatServeConfig(
        model_dir, source, served_model_name=BASE_NAME, max_loras=8,  # the server's default
        max_cpu_adapters=config.max_cpu_adapters, extra_args=extra),
        config.out_dir / "logs" / f"{case}-{rnd + 1}.log")
    if case == "s3":
        server.env.update(store.env)  # type: ignore[union-attr]
    if case == "resident":
        models, warm, unused = hot, hot, []
    elif case == "preloaded":
        models, warm, unused = pool, used_adapters(load_config(config, server.url, pool)), []
    else:
        models, warm, unused = pool, [BASE_NAME], pool[::-1]
    shutil.rmtree(cache, ignore_errors=True)
    try:
        return measure_case(config, case, rnd, server, models, warm, unused)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def used_adapters(load: LoadConfig) -> list[str]:
    """The adapters `load` will use: its requests are drawn from one seed."""
    workload = load.workload()
    return sorted({workload.next_spec().adapter for _ in range(load.num_requests or 0)})


def measure_memory(config: ChurnConfig, model_dir: Path, folder: Path,
                   names: list[str]) -> MemoryRun:
    """Load `memory_adapters` adapters into one server (one tiny request each, as many clients
    as the load) with room for all of them; RSS and host bytes before and after."""
    n = config.memory_adapters
    busy = others_busy(config, f"memory: {n} adapters resident")
    server = goat_serve(GoatServeConfig(
        model_dir, folder, served_model_name=BASE_NAME, max_loras=8,
        max_cpu_adapters=max(n, config.max_cpu_adapters)), config.out_dir / "logs" / "memory.log")
    server.start()
    try:
        server.wait_healthy(600)
        assert server.proc is not None
        tiny_requests(server.url, [BASE_NAME], 1)
        rss_base = proc_sample(server.proc.pid).rss_bytes
        before = scrape(server.url)
        start = time.perf_counter()
        tiny_requests(server.url, names[:n], config.concurrency)
        elapsed = time.perf_counter() - start
        after = scrape(server.url)
        return MemoryRun(
            n, rss_base, proc_sample(server.proc.pid).rss_bytes,
            metric_sum(after, "goat_adapter_memory_bytes", tier="host"),
            metric_sum(after, "goat_adapter_memory_adapters", tier="host"),
            metric_sum(after, "goat_adapter_load_seconds_count")
            - metric_sum(before, "goat_adapter_load_seconds_count"),
            metric_sum(after, "goat_adapter_load_seconds_sum")
            - metric_sum(before, "goat_adapter_load_seconds_sum"),
            histogram_delta(before, after, "goat_adapter_load_seconds"), elapsed, busy)
    finally:
        server.stop()


def prepare(config: ChurnConfig) -> tuple[Path, list[str]]:
    model_dir = write_random_smollm(config.work_dir / BASE_NAME)
    count = max(config.num_adapters, config.memory_adapters)
    names = [f"churn-{i}" for i in range(count)]
    folder = config.work_dir / f"churn-{config.kind}"
    print(f"writing {count} adapters to {folder} (once)", file=sys.stderr, flush=True)
    write_adapters(folder, linear_shapes(base_linears(model_dir)), names, config.kind, seed=5000)
    return model_dir, names


def store_folder(config: ChurnConfig, count: int) -> Path:
    """A folder holding exactly the first `count` adapters (links into the written ones): a
    server's store is what it lists and scans at start-up."""
    pool = config.work_dir / f"churn-{config.kind}"
    folder = config.work_dir / f"churn-{config.kind}-{count}"
    folder.mkdir(exist_ok=True)
    for i in range(count):
        link = folder / f"churn-{i}"
        if not link.exists():
            link.symlink_to(pool / link.name, target_is_directory=True)
    return folder


def run(config: ChurnConfig) -> tuple[list[CaseRun], MemoryRun | None, str | None]:
    """Every round runs each case once, the order rotated by one per round; then the memory
    run. Writes each case's JSON as it ends (and plots of the first round) under out_dir; a
    memory run that fails (a machine too small for it) is reported, not lost with the rest."""
    model_dir, names = prepare(config)
    folder = store_folder(config, config.num_adapters)
    cases = [c for c in CASES if c != "s3" or config.s3]
    store = start_s3(folder, names[: config.num_adapters], config.out_dir / "logs" / "moto.log") \
        if config.s3 and config.rounds else None
    config.out_dir.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for rnd in range(config.rounds):
            k = rnd % len(cases)
            for case in cases[k:] + cases[:k]:
                runs.append(run_case(config, case, rnd, model_dir, folder, names, store))
                save_case(config, runs[-1])
    finally:
        if store is not None:
            store.stop()
    memory, failure = None, None
    if config.memory_adapters:
        try:
            memory = measure_memory(config, model_dir,
                                    store_folder(config, config.memory_adapters), names)
        except RuntimeError as exc:
            failure = str(exc).splitlines()[0]
            print(f"memory run failed: {exc}", file=sys.stderr)
    if memory is not None:
        (config.out_dir / "memory.json").write_text(json.dumps(asdict(memory)) + "\n")
    return runs, memory, failure


def save_case(config: ChurnConfig, r: CaseRun) -> None:
    tag = f"{r.case}-{r.round + 1}"
    r.result.write_json(config.out_dir / f"{tag}.json")
    (config.out_dir / f"{tag}-polls.json").write_text(
        json.dumps([asdict(p) for p in r.polls]) + "\n")
    if config.plot_dir is not None and r.round == 0:
        config.plot_dir.mkdir(parents=True, exist_ok=True)
        r.result.write_plot(config.plot_dir / f"churn-{r.case}.png")


def measure_loads(folder: Path, names: Sequence[str], linears: Sequence[FusedLinear],
                  rounds: int = 3, reader: AdapterReader | None = None) -> LatencyStats:
    """Read-and-check time of each adapter from a warm page cache (every file is read once
    first): `format.load_adapter` in this process, or with `reader` what the adapter manager's
    loader thread waits for (the read in the reader process, laid out in slot images, and the
    values' way back)."""
    shapes, groups = linear_shapes(linears), slice_groups(linears)
    for name in names:
        for path in (folder / name).iterdir():
            path.read_bytes()
    if reader is not None:
        reader.read(folder / names[0], shapes, name=names[0], max_rank=64,
                    groups=groups)  # started
    seconds = []
    for _ in range(rounds):
        for name in names:
            start = time.perf_counter()
            if reader is None:
                load_adapter(folder / name, shapes)
            else:
                reader.read(folder / name, shapes, name=name, max_rank=64, groups=groups)
            seconds.append(time.perf_counter() - start)
    return LatencyStats.of(seconds)


def print_loads(config: ChurnConfig) -> None:
    """--loads-only: load times of the benchmark's adapters as the reference saves them (fp32,
    experts twice) and of the same adapters in bf16 with their experts once (the size a trained
    GOAT checkpoint trimmed of the twins has), in this process and through the reader."""
    linears = base_linears(write_random_smollm(config.work_dir / BASE_NAME))
    shapes = linear_shapes(linears)
    names = [f"churn-{i}" for i in range(config.loads_only)]
    formats = {"fp32, experts twice (reference)": (f"churn-{config.kind}", {}),
               "bf16, experts once": (f"churn-{config.kind}-bf16",
                                      {"dtype": torch.bfloat16, "twin_copies": False})}
    reader = AdapterReader()
    try:
        for what, (sub, options) in formats.items():
            folder = config.work_dir / sub
            write_adapters(folder, shapes, names, config.kind, seed=5000, **options)
            size = sum(p.stat().st_size for p in (folder / names[0]).iterdir())
            for where, via in (("in process", None), ("reader process", reader)):
                stats = measure_loads(folder, names, linears, reader=via)
                print(f"{config.kind} adapter, r=8 E=8 k=2, all projections, {what}, "
                      f"{size / 1e6:.1f} MB, {where}: load p50 "
                      f"{stats.percentiles['p50']:.1f} ms, p99 "
                      f"{stats.percentiles['p99']:.1f} ms over {stats.count} loads")
    finally:
        reader.shutdown()


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
    p.add_argument("--max-cpu-adapters", type=int, default=d.max_cpu_adapters)
    p.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="0: the memory run alone")
    p.add_argument("--s3", action=argparse.BooleanOptionalAction, default=d.s3,
                   help="the S3 case (moto on loopback)")
    p.add_argument("--memory-adapters", type=int, default=d.memory_adapters, metavar="N",
                   help="load N adapters into one server and read its memory; 0: skip")
    p.add_argument("--poll", type=float, default=d.poll_s, help="/metrics poll interval (s)")
    p.add_argument("--loads-only", type=int, default=0, metavar="N",
                   help="only time loading N adapters from a warm page cache (3 rounds)")
    add_max_busy_arg(p)
    a = p.parse_args(argv)
    if not 0 < a.resident_adapters <= a.num_adapters:
        p.error("--resident-adapters must be in 1..--num-adapters")
    if a.rounds < 0 or a.num_requests < 1 or a.concurrency < 1 or a.memory_adapters < 0:
        p.error("--num-requests and --concurrency must be >= 1, --rounds and "
                "--memory-adapters >= 0")
    if a.rounds == 0 and a.memory_adapters == 0:
        p.error("--rounds 0 runs the memory run alone: give --memory-adapters N")
    return ChurnConfig(
        work_dir=a.work_dir, out_dir=a.out_dir, plot_dir=Path(a.plot_dir) if a.plot_dir else None,
        kind=a.kind, num_adapters=a.num_adapters, resident_adapters=a.resident_adapters,
        max_cpu_adapters=a.max_cpu_adapters, zipf_alpha=a.zipf_alpha,
        concurrency=a.concurrency, num_requests=a.num_requests, prompt_len=a.prompt_len,
        output_len=a.output_len, rounds=a.rounds, s3=a.s3, memory_adapters=a.memory_adapters,
        poll_s=a.poll, max_busy=a.max_busy, loads_only=a.loads_only,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    machine = machine_summary()
    print(machine, file=sys.stderr)
    if config.loads_only:
        print_loads(config)
        return 0
    runs, memory, memory_failure = run(config)
    text = report(config, runs, memory, memory_failure)
    print("\n" + text)
    (config.out_dir / "report.md").write_text(f"{text}\n\nMachine:\n\n```\n{machine}\n```\n")
    ok = all(r.result.summary.num_errors == 0 for r in runs) and memory_failure is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
