"""Engine throughput with many adapters, beside each configuration's memory floor, in-process and
over HTTP, on SmolLM2-135M's shapes with random weights, fp32, CPU.

One adapter store holds 16 GOAT adapters (r = 8, E = 8, k = 2, all seven projections) and 16
PEFT LoRA adapters (r = 8). Two engines serve it: with default flags (the GOAT signature's
static term merged into the base weights) and with --no-merge-static. Each runs 32 concurrent
requests of 128 prompt + 128 generated tokens (ignore_eos, greedy, all added at once, adapters
round-robin) for the base, the 16 LoRA and the 16 GOAT adapters; a goat-serve server with
default flags on the same store runs the same requests over HTTP (`--no-http` skips it), each
right before or after (alternating between rounds) its in-process twin with default flags. The
configurations run interleaved (round 1: every one, round 2: every one, ...), and each ratio is
the median of the per-round ratios, printed with each round's.

Beside each configuration: generated tokens per second end to end, the decode phase's tokens per
second, and its floor: the bytes its decode steps read (base weights, each distinct adapter's
rows, the KV cache; benchmarks/floors.py) at the memory bandwidth a copy loop measures in the
same run. `linears` is the measured time of one decode step's base GEMMs alone, which bounds
the step from below wherever the CPU, not memory, is the limit.

    .venv/bin/python -m benchmarks.bench_engine [--rounds 3] [--requests 32] [--prompt 128]
        [--output 128] [--no-http] [--server-arg=--engine-process]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.floors import (
    adapter_bytes,
    base_weight_bytes,
    format_ratio,
    measure_bandwidth,
    median_of_ratios,
    step_bytes,
)
from benchmarks.random_model import (
    NUM_ADAPTERS,
    write_goat_and_lora,
    write_random_model,
)
from goat_runtime.adapters.binding import base_linear_shapes
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.model.kv_cache import block_bytes
from goat_runtime.model.layers import fast_linear
from goat_runtime.model.llama import LlamaForCausalLM

WORK_DIR = Path(os.environ.get("GOAT_CACHE_DIR") or Path.home() / ".cache" / "goat-serve") / \
    "bench-engine"
GOAL_FLOOR = 0.85  # decode throughput within 15 % of its floor
GOAL_GOAT = 0.85  # 16 GOAT (default flags) / base
GOAL_UNDO = 0.97  # base on a merged server / base on an unmerged one
GOAL_HTTP = 0.9  # over HTTP / in-process


@dataclass
class RunResult:
    tok_s: float  # generated tokens per second, first add to last token
    decode_tok_s: float  # tokens per second of the steps that only decode
    floor_tok_s: float  # the same steps' tokens over their bytes' time at the bandwidth
    step_mb: float  # mean bytes a decode step reads, MB

    @property
    def of_floor(self) -> float:
        return self.decode_tok_s / self.floor_tok_s


def workload(args, vocab_size: int) -> list[list[int]]:
    """The requests' prompts: random token ids, distinct, the same for every configuration."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab_size, (args.prompt,), generator=gen).tolist()
            for _ in range(args.requests)]


class EngineRun:
    """One engine, and the bytes its decode steps read."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        model = engine.model
        self.weights = base_weight_bytes(model.fused_linears(), model.lm_head)
        self.kv_per_token = block_bytes(model.config, 1, engine.config.torch_dtype)
        self.element = model.lm_head.element_size()
        self._adapter_bytes: dict[str | None, int] = {}

    def rows(self, name: str | None) -> int:
        """The bytes of `name`'s slot (None: the base's undo term, 0 when nothing is merged)."""
        if name not in self._adapter_bytes:
            host = self.engine.adapters.get(name)
            self._adapter_bytes[name] = 0 if host is None else adapter_bytes(
                host.adapter.layers if host.adapter else {}, host.terms, self.element)
        return self._adapter_bytes[name]

    def run(self, prompts: list[list[int]], adapters: list[str | None], output: int,
            bandwidth: float) -> RunResult:
        engine = self.engine
        params = SamplingParams(temperature=0.0, max_tokens=output, ignore_eos=True)
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params, adapters[i % len(adapters)])
        generated = decode_tokens = decode_steps = 0
        decode_s = floor_s = step_total = 0.0
        while engine.has_work():
            running = engine.scheduler.running
            decode_only = (not engine.scheduler.waiting and running
                           and all(s.num_tokens - s.num_computed_tokens == 1 for s in running))
            if decode_only:
                distinct = {s.adapter for s in running}
                step = step_bytes(self.weights, [self.rows(a) for a in distinct],
                                  sum(s.num_tokens for s in running), self.kv_per_token)
                batch = len(running)
            t0 = time.perf_counter()
            outputs = engine.step()
            if decode_only:
                decode_s += time.perf_counter() - t0
                floor_s += step.seconds(bandwidth)
                step_total += step.total
                decode_tokens += batch
                decode_steps += 1
            generated += sum(len(d.token_ids) for out in outputs for d in out.outputs)
        elapsed = time.perf_counter() - start
        if generated != len(prompts) * output:
            raise RuntimeError(f"generated {generated} tokens, expected {len(prompts) * output}")
        if not decode_tokens:
            raise RuntimeError("no step decoded alone: raise --output")
        return RunResult(generated / elapsed, decode_tokens / decode_s, decode_tokens / floor_s,
                         step_total / decode_steps / 1e6)


def linear_seconds(model: LlamaForCausalLM, tokens: int, repeats: int = 5) -> float:
    """The best time of one decode step's base GEMMs alone (every fused Linear and lm_head on
    `tokens` rows), as the engine runs them (packed weights)."""
    best = float("inf")
    xs = {lin.d_in: torch.randn(tokens, lin.d_in) for lin in model.fused_linears()}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for lin in model.fused_linears():
            fast_linear(xs[lin.d_in], lin.weight, lin.bias, lin.packed)
        fast_linear(xs[model.lm_head.shape[1]], model.lm_head, packed=model.lm_head_packed)
        best = min(best, time.perf_counter() - t0)
    return best


async def http_run(url: str, prompts: list[list[int]], adapters: list[str], output: int) -> float:
    """Generated tokens per second over /v1/completions, all requests at once."""
    import httpx

    async def one(client: httpx.AsyncClient, i: int, prompt: list[int]) -> int:
        body = {"model": adapters[i % len(adapters)], "prompt": prompt, "max_tokens": output,
                "temperature": 0.0, "ignore_eos": True}
        response = await client.post(url + "/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=600.0, limits=limits, trust_env=False) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(client, i, p) for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - start
    if sum(counts) != len(prompts) * output:
        raise RuntimeError(f"generated {sum(counts)} tokens over HTTP, expected "
                           f"{len(prompts) * output}")
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--no-http", dest="http", action="store_false",
                        help="skip the HTTP pass (a goat-serve server on the same store)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more flag for the HTTP pass's server (repeatable), e.g. "
                             "--server-arg=--engine-process")
    parser.add_argument("--work-dir", type=Path, default=WORK_DIR,
                        help="model, adapters and static-term cache, written once and reused "
                             f"(default {WORK_DIR})")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    torch.set_num_threads(args.threads)
    bench(args.work_dir, args)


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def bench(root: Path, args) -> None:
    model_dir, store = root / "smollm2-135m-random", root / "store"
    if not (model_dir / "tokenizer.json").is_file():  # written last
        progress(f"writing the random model into {model_dir}")
        write_random_model(model_dir)
    goat, lora = write_goat_and_lora(store, store, base_linear_shapes(model_dir))
    progress("starting the engines (the first run computes the static terms: minutes)")
    common = dict(model_dir=model_dir, adapter_dir=store,  # static terms: the server's cache
                  max_loras=2 * NUM_ADAPTERS, max_cpu_adapters=2 * NUM_ADAPTERS,
                  max_num_seqs=args.requests, kv_cache_memory=1 << 30)  # the server's defaults
    engines = {"default": EngineRun(LLMEngine(EngineConfig(**common))),
               "unmerged": EngineRun(LLMEngine(EngineConfig(**common, merge_static=False)))}
    kinds = {"base": [None], "16 LoRA": lora, "16 GOAT": goat}
    cases = {f"{kind} ({server})": (server, adapters)
             for server in engines for kind, adapters in kinds.items()}
    progress("warming up")
    vocab = engines["default"].engine.vocab_size
    prompts = workload(args, vocab)
    warm = [p[:8] for p in prompts[:2]]
    for server, adapters in cases.values():  # load adapters, compute static terms: a warm server
        for name in adapters:
            if name is not None:
                engines[server].engine.adapters.request_load(name).result()
        engines[server].run(warm * (len(adapters) // 2 + 1), adapters, 4, 1e12)
    server = start_server(root, model_dir, store, args) if args.http else None
    try:
        if server is not None:
            for adapters in kinds.values():
                names = [a or "base" for a in adapters]
                asyncio.run(http_run(server.url, warm * (len(names) // 2 + 1), names, 4))
        print(f"SmolLM2-135M shapes, random weights, fp32, threads={torch.get_num_threads()}: "
              f"{args.requests} requests x ({args.prompt} prompt + {args.output} generated) "
              "tokens, greedy, ignore_eos; store: 16 GOAT + 16 LoRA\n", flush=True)
        rounds, results, bandwidths, linears = [], [], [], []
        for r in range(args.rounds):
            bandwidths.append(measure_bandwidth())
            linears.append(linear_seconds(engines["default"].engine.model, args.requests))
            figures: dict[str, float] = {}
            per: dict[str, RunResult] = {}
            for label, where, adapters in round_order(cases, server is not None, r):
                if where == HTTP:
                    names = [a or "base" for a in adapters]
                    figures[label] = asyncio.run(http_run(server.url, prompts, names,
                                                          args.output))
                    print(f"round {r + 1}: {label:<22} {figures[label]:7.1f} tok/s", flush=True)
                    continue
                result = engines[where].run(prompts, adapters, args.output, bandwidths[-1])
                figures[label], per[label] = result.tok_s, result
                print(f"round {r + 1}: {label:<22} {result.tok_s:7.1f} tok/s, decode "
                      f"{result.decode_tok_s:6.1f} tok/s = {result.of_floor:.3f} of its floor "
                      f"{result.floor_tok_s:6.1f} ({result.step_mb:.0f} MB/step at "
                      f"{bandwidths[-1] / 1e9:.1f} GB/s)", flush=True)
            rounds.append(figures)
            results.append(per)
        report(rounds, results, bandwidths, linears, args, server is not None)
    finally:
        if server is not None:
            server.stop()


HTTP = "HTTP"  # round_order's `where` of a run over HTTP


def round_order(cases: dict[str, tuple[str, list[str | None]]], http: bool,
                round_index: int) -> list[tuple[str, str, list[str | None]]]:
    """One round's runs as (label, where: an engine's name or HTTP, adapters). Each HTTP run
    comes right before or after its in-process twin with default flags, alternating between
    rounds: these machines' speed drifts within a round, and adjacent runs in alternating order
    put the same drift on both sides of their ratio."""
    order = []
    for label, (name, adapters) in cases.items():
        pair = [(label, name, adapters)]
        if http and name == "default":
            pair.append((label.replace("(default)", f"({HTTP})"), HTTP, adapters))
            if round_index % 2:
                pair.reverse()
        order += pair
    return order


def start_server(root: Path, model_dir: Path, store: Path, args):
    """goat-serve with default flags on the same store and engine settings."""
    from loadtests.common import GoatServeConfig, goat_serve

    config = GoatServeConfig(model_dir=model_dir, adapter_dir=store, served_model_name="base",
                             max_loras=2 * NUM_ADAPTERS, max_cpu_adapters=2 * NUM_ADAPTERS,
                             max_num_seqs=args.requests, extra_args=args.server_arg)
    server = goat_serve(config, root / "server.log").start()
    server.wait_healthy()
    return server


def report(rounds, results, bandwidths, linears, args, http: bool) -> None:
    linear_s = min(linears)
    print("\nmemory bandwidth (copy loop, 256 MiB, best per round): "
          + ", ".join(f"{b / 1e9:.2f}" for b in bandwidths) + " GB/s")
    print(f"one decode step's base GEMMs alone at {args.requests} rows (best per round): "
          + ", ".join(f"{s * 1e3:.1f}" for s in linears) + f" ms = at most "
          f"{args.requests / linear_s:.0f} tok/s before attention, adapters and sampling\n")
    print(f"{'configuration':<22} {'tok/s (median)':>14} {'decode tok/s':>12} {'floor':>7} "
          f"{'of floor (per round)':>30}")
    for label in results[0]:
        of = [res[label].of_floor for res in results]
        print(f"{label:<22} {statistics.median(r[label] for r in rounds):14.1f} "
              f"{statistics.median(res[label].decode_tok_s for res in results):12.1f} "
              f"{statistics.median(res[label].floor_tok_s for res in results):7.1f} "
              f"{statistics.median(of):8.3f} (" + ", ".join(f"{x:.3f}" for x in of) + ")"
              + ("" if statistics.median(of) >= GOAL_FLOOR else "  < goal 0.85"))
    print("\nratios, median of per-round ratios (each round's in brackets):")
    ratios = [
        ("16 GOAT (default) / base (unmerged)", "16 GOAT (default)", "base (unmerged)", GOAL_GOAT),
        ("16 GOAT (default) / base (default)", "16 GOAT (default)", "base (default)", None),
        ("16 GOAT (unmerged) / base (unmerged)", "16 GOAT (unmerged)", "base (unmerged)", None),
        ("16 LoRA (default) / base (unmerged)", "16 LoRA (default)", "base (unmerged)", None),
        ("undo: base (default) / base (unmerged)", "base (default)", "base (unmerged)", GOAL_UNDO),
        ("undo: 16 LoRA (default) / (unmerged)", "16 LoRA (default)", "16 LoRA (unmerged)",
         GOAL_UNDO),
        ("merge: 16 GOAT default / unmerged", "16 GOAT (default)", "16 GOAT (unmerged)", None),
    ]
    if http:
        ratios += [(f"HTTP / in-process, {kind}", f"{kind} (HTTP)", f"{kind} (default)",
                    GOAL_HTTP) for kind in ("base", "16 LoRA", "16 GOAT")]
        ratios.append(("HTTP: 16 GOAT / base", "16 GOAT (HTTP)", "base (HTTP)", GOAL_GOAT))
    for text, num, den, goal in ratios:
        median, per_round = median_of_ratios(rounds, num, den)
        verdict = "" if goal is None else (f"  goal >= {goal}: " +
                                           ("met" if median >= goal else "NOT met"))
        print(f"  {text:<40} {format_ratio(median, per_round)}{verdict}")


if __name__ == "__main__":
    main()
