"""Adapter loads beside a running batch: does the batch stall while adapters load?

An in-process engine (SmolLM2-135M's shapes, random weights, CPU) decodes a batch of sequences
on a few resident adapters, step after step; then 50 other adapters are requested at once and
load on the adapter manager's loader thread while the batch keeps decoding. It prints the
engine's step times without loads and during them (p50, max), the longest stall (the longest
step during loads minus the p50 without), loads per second, and the time of one load measured
two ways on an idle engine: reading and checking the adapter (`format.load_adapter`) and the
whole way to servable (the loader thread's load with its static terms, then the slot write of
the adapter's first step).

    .venv/bin/python -m loadtests.load_stall [--loads 50] [--batch 8]

A benchmark script, not a test: it takes about a minute and all of the machine's cores.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.random_model import write_adapters, write_random_model
from goat_runtime.adapters.binding import base_linears, linear_shapes
from loadtests.churn import measure_loads
from loadtests.common import CACHE, machine_summary, write_random_smollm
from loadtests.report import LatencyStats


@dataclass
class StallConfig:
    work_dir: Path = CACHE / "bench"
    loads: int = 50  # adapters loaded while the batch decodes
    batch: int = 8  # sequences decoding (on `resident` adapters)
    resident: int = 4
    quiet_steps: int = 30  # steps timed before the loads
    model_config: Mapping[str, Any] | None = None  # None: SmolLM2-135M (tests pass a tiny one)
    static_cache_dir: Path | None = None  # None: the server's default (shared with its runs)
    rank: int = 8
    num_experts: int = 8


@dataclass
class StallResult:
    quiet: list[float]  # step seconds without loads
    loading: list[float]  # step seconds while loads were in flight
    loads_per_s: float
    load: LatencyStats  # format.load_adapter alone, idle engine
    servable: LatencyStats  # the loader thread's load + the first step's slot write, idle engine

    @property
    def stall(self) -> float:
        """The longest step during loads minus the p50 step without, seconds."""
        return max(self.loading) - statistics.median(self.quiet)


def run(config: StallConfig) -> StallResult:
    from goat_runtime.engine.config import EngineConfig
    from goat_runtime.engine.engine import LLMEngine
    from goat_runtime.engine.sampling import SamplingParams

    if config.model_config is None:
        model_dir = write_random_smollm(config.work_dir / "smollm2-135m-random")
    else:
        model_dir = config.work_dir / "model"
        if not (model_dir / "tokenizer.json").is_file():
            write_random_model(model_dir, config.model_config)
    linears = base_linears(model_dir)
    shapes = linear_shapes(linears)
    # loadtests.churn's adapters (the same names, seeds and shapes: one copy on disk)
    folder = config.work_dir / "churn-goat"
    names = [f"churn-{i}" for i in range(config.resident + config.loads + 5)]
    write_adapters(folder, shapes, names, "goat", rank=config.rank,
                   num_experts=config.num_experts, seed=5000)
    resident, loaded, idle = (names[:config.resident],
                              names[config.resident:config.resident + config.loads],
                              names[config.resident + config.loads:])
    for name in names:  # a warm page cache, as the goal says
        for path in (folder / name).iterdir():
            path.read_bytes()
    engine = LLMEngine(EngineConfig(
        model_dir=model_dir, adapter_dir=folder, device="cpu", dtype="float32",
        max_cpu_adapters=len(names), static_cache_dir=config.static_cache_dir,
        max_num_seqs=config.batch))
    gc.collect()
    gc.freeze()  # as the server does after start-up (server/cli.py serve)
    try:
        servable = measure_servable(engine, idle)
        params = SamplingParams(max_tokens=engine.max_model_len - 4, temperature=0.0,
                                ignore_eos=True)
        for i in range(config.batch):
            engine.add_request(f"r{i}", [5 + i, 6, 7, 8], params, resident[i % len(resident)])
        while len(engine.scheduler.running) < config.batch:
            engine.step()  # loads the batch's adapters
        for _ in range(3):  # the prefills (4-token prompts) and the first decodes
            engine.step()
        quiet = [_timed_step(engine) for _ in range(config.quiet_steps)]
        start = time.perf_counter()
        futures = [engine.adapters.request_load(name) for name in loaded]
        loading = []
        while not all(f.done() for f in futures):
            if len(engine.scheduler.running) < config.batch:
                raise RuntimeError("the batch finished before the loads: a longer context "
                                   "or fewer loads")
            loading.append(_timed_step(engine))
        seconds = time.perf_counter() - start
        for future in futures:
            future.result()
    finally:
        engine.adapters.shutdown()
        gc.unfreeze()
    return StallResult(quiet, loading, len(loaded) / seconds,
                       measure_loads(folder, idle, linears, rounds=1), servable)


def measure_servable(engine: Any, names: Sequence[str]) -> LatencyStats:
    """Per adapter, from asking for it to servable on an idle engine: the loader thread reads
    and checks it and makes its static terms, then the step that first uses it writes it into
    its slot (what `bind` does before the forward)."""
    seconds = []
    for name in names:
        start = time.perf_counter()
        engine.adapters.request_load(name).result()
        engine.adapters.bind([name])
        seconds.append(time.perf_counter() - start)
    return LatencyStats.of(seconds)


def _timed_step(engine: Any) -> float:
    start = time.perf_counter()
    engine.step()
    return time.perf_counter() - start


def report(config: StallConfig, result: StallResult) -> str:
    def ms(values: Sequence[float]) -> str:
        return f"p50 {statistics.median(values) * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms"

    return "\n".join([
        f"{config.batch} sequences decoding; {config.loads} GOAT adapters (r={config.rank}, "
        f"E={config.num_experts}) loading beside them",
        f"steps without loads ({len(result.quiet)}): {ms(result.quiet)}",
        f"steps during loads ({len(result.loading)}): {ms(result.loading)}",
        f"longest stall: {result.stall * 1e3:.1f} ms (longest step during loads - p50 without)",
        f"loads per second beside the batch: {result.loads_per_s:.1f}",
        f"one load on an idle engine, format.load_adapter: p50 "
        f"{result.load.percentiles['p50']:.1f} ms, max {result.load.max:.1f} ms",
        f"one load on an idle engine, to servable (+ static terms, slot write): p50 "
        f"{result.servable.percentiles['p50']:.1f} ms, max {result.servable.max:.1f} ms",
    ])


def parse_args(argv: Sequence[str] | None = None) -> StallConfig:
    d = StallConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=d.work_dir)
    p.add_argument("--loads", type=int, default=d.loads)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--quiet-steps", type=int, default=d.quiet_steps)
    a = p.parse_args(argv)
    if a.loads < 1 or a.batch < 1 or a.quiet_steps < 1:
        p.error("--loads, --batch and --quiet-steps must be positive")
    return StallConfig(work_dir=a.work_dir, loads=a.loads, batch=a.batch,
                       quiet_steps=a.quiet_steps)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    print(machine_summary(), file=sys.stderr)
    print(report(config, run(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
