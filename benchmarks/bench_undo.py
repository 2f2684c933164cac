"""The undo term's cost, step by step: base (or 16 LoRA) requests on a merged and an unmerged
engine over the same store, their decode steps alternated (merged, unmerged, merged, ...), so
the machine's drift hits both alike; prints the median of the per-step-pair throughput ratios.

Uses bench_engine's store (run `python -m benchmarks.bench_engine` once first).

    .venv/bin/python -m benchmarks.bench_undo [--kind base|lora] [--pairs 24]
"""

import argparse
import statistics
import time

import torch

from benchmarks.bench_engine import WORK_DIR
from benchmarks.random_model import NUM_ADAPTERS
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("base", "lora"), default="base")
    parser.add_argument("--pairs", type=int, default=24, help="decode steps timed per engine")
    parser.add_argument("--requests", type=int, default=32)
    args = parser.parse_args()
    common = dict(model_dir=WORK_DIR / "smollm2-135m-random", adapter_dir=WORK_DIR / "store",
                  max_loras=2 * NUM_ADAPTERS, max_cpu_adapters=2 * NUM_ADAPTERS,
                  max_num_seqs=args.requests)
    engines = {"merged": LLMEngine(EngineConfig(**common)),
               "unmerged": LLMEngine(EngineConfig(**common, merge_static=False))}
    names = [None] if args.kind == "base" else [f"lora{i}" for i in range(NUM_ADAPTERS)]
    params = SamplingParams(temperature=0.0, max_tokens=args.pairs + 16, ignore_eos=True)
    for engine in engines.values():
        gen = torch.Generator().manual_seed(1)
        for name in filter(None, names):
            engine.adapters.request_load(name).result()
        for i in range(args.requests):
            prompt = torch.randint(3, engine.vocab_size, (64,), generator=gen).tolist()
            engine.add_request(f"r{i}", prompt, params, names[i % len(names)])
        for _ in range(6):  # the prefill (64 x 32 tokens in 512-token steps) and a decode
            engine.step()
    ratios = []
    for _ in range(args.pairs):
        seconds = {}
        for key, engine in engines.items():
            start = time.perf_counter()
            engine.step()
            seconds[key] = time.perf_counter() - start
        ratios.append(seconds["unmerged"] / seconds["merged"])
    quartiles = statistics.quantiles(ratios, n=4)
    print(f"{args.kind}: decode step throughput, merged / unmerged engine: median "
          f"{statistics.median(ratios):.3f} (quartiles {quartiles[0]:.3f}, {quartiles[2]:.3f}) "
          f"over {args.pairs} alternated step pairs")


if __name__ == "__main__":
    main()
