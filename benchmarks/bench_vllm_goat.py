"""vLLM throughput with 16 GOAT adapters against 16 LoRA adapters of the same total rank, on
SmolLM2-135M's shapes with random weights, through the goat vLLM plugin (CPU build here).

Goal (the vLLM issue): GOAT at least 0.9x LoRA. Both engines get the same workload: N requests
of P random prompt tokens and O generated tokens (greedy, ignore_eos), all submitted at once,
cycling over the adapters; timed from submission to the last token, after a warm-up that loads
every adapter. GOAT: r = 8, E = 8, k = 2, all seven projections, static components as extra rows
(E + r + r = 24 rows: --max-lora-rank 32), or merged into the base weights (the adapters share
one init signature: GOAT_VLLM_MERGE_STATIC, E + r = 16 rows: --max-lora-rank 16). LoRA: r = 8
(--max-lora-rank 8). Each case runs in its own process (one engine per process) and times the
workload `--repeats` times; the rounds alternate the cases, and the best run of each case
counts.

Run with the vLLM environment's interpreter (tests/vllm/conftest.py builds it):
    ~/.cache/goat-serve/vllm-venv/bin/python -m benchmarks.bench_vllm_goat [--requests 32]

from the repository root (the child processes run the same module from there).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.random_model import (
    NUM_ADAPTERS,
    SMOLLM2_135M,
    write_goat_and_lora,
    write_random_model,
)
from goat_runtime.adapters.binding import base_linear_shapes

REPO = Path(__file__).resolve().parents[1]  # the children's working directory
CASES = {"lora": 8, "goat": 32, "goat-merged": 16}  # case -> --max-lora-rank
RESULT = "BENCH_RESULT "  # vLLM logs to stdout too: the child's answer is the line with this


def prepare(root: Path) -> None:
    model_dir = root / "model"
    write_random_model(model_dir)
    write_goat_and_lora(root / "goat", root / "lora", base_linear_shapes(model_dir))


def run_case(root: Path, case: str, args) -> float:
    """Generated tokens per second of one engine serving NUM_ADAPTERS adapters of `case`."""
    kind = case.removesuffix("-merged")
    if case.endswith("-merged"):  # read by the plugin in every vLLM process
        os.environ["GOAT_VLLM_MERGE_STATIC"] = str(root / kind)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(model=str(root / "model"), dtype="float32", skip_tokenizer_init=True,
              enforce_eager=True, enable_lora=True, max_loras=NUM_ADAPTERS,
              max_lora_rank=CASES[case], max_num_seqs=args.requests,
              max_model_len=args.prompt + args.output + 8,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory_bytes=1 << 30, enable_prefix_caching=False, seed=0)
    adapters = [LoRARequest(f"{kind}{i}", i + 1, str(root / kind / f"{kind}{i}"))
                for i in range(NUM_ADAPTERS)]
    gen = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, SMOLLM2_135M["vocab_size"],
                                                  (args.prompt,), generator=gen).tolist()}
               for _ in range(args.requests)]
    loras = [adapters[i % NUM_ADAPTERS] for i in range(args.requests)]
    warm = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:NUM_ADAPTERS], warm, lora_request=adapters, use_tqdm=False)
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True,
                            detokenize=False)
    best = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        elapsed = time.perf_counter() - start
        generated = sum(len(o.outputs[0].token_ids) for o in outs)
        if generated != args.requests * args.output:
            raise RuntimeError(f"generated {generated} tokens, expected "
                               f"{args.requests * args.output}")
        best = max(best, generated / elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--output", type=int, default=128)  # the engine benchmark's workload
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per case")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per engine (prefix caching off: the same work each)")
    parser.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # one engine, in a child process
        os.environ.setdefault("VLLM_PLUGINS", "goat")
        print(RESULT + json.dumps({"tok_s": run_case(args.root, args.case, args)}), flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root)
        print(f"vLLM + goat plugin, SmolLM2-135M shapes, random weights, fp32: {args.requests} "
              f"requests x ({args.prompt} prompt + {args.output} generated) tokens, "
              f"{NUM_ADAPTERS} adapters, greedy, ignore_eos; load average "
              f"{os.getloadavg()[0]:.2f} at start", flush=True)
        # Rounds alternate the cases, each engine in a fresh process; the best round of each
        # case counts, so a burst of other jobs' load in one round does not decide the ratio.
        results: dict[str, float] = {}
        for round_ in range(1, args.rounds + 1):
            for case in CASES:
                cmd = [sys.executable, "-m", "benchmarks.bench_vllm_goat", "--case", case,
                       "--root", str(root),
                       "--requests", str(args.requests), "--prompt", str(args.prompt),
                       "--output", str(args.output), "--repeats", str(args.repeats),
                       "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                     env={**os.environ, "VLLM_PLUGINS": "goat"})
                if out.returncode != 0:
                    raise SystemExit(f"{case} case failed:\n{out.stderr[-6000:]}")
                line = next(x for x in out.stdout.splitlines() if x.startswith(RESULT))
                tok_s = json.loads(line.removeprefix(RESULT))["tok_s"]
                results[case] = max(results.get(case, 0.0), tok_s)
                print(f"round {round_}: 16 {case:<11} (max_lora_rank {CASES[case]:>2}) "
                      f"{tok_s:8.1f} tok/s (load average {os.getloadavg()[0]:.2f})", flush=True)
        print("best: " + ", ".join(f"16 {k} {v:.1f} tok/s" for k, v in results.items()),
              flush=True)
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average (1, 5, 15 min): {load} on {os.cpu_count()} cores", flush=True)
        for case in ("goat", "goat-merged"):
            ratio = results[case] / results["lora"]
            print(f"{case} / lora = {ratio:.3f}x (goal >= 0.9x): "
                  f"{'met' if ratio >= 0.9 else 'NOT met'}")


if __name__ == "__main__":
    main()
