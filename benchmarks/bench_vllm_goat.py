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
    ~/.cache/goat-serve/vllm-venv/bin/python benchmarks/bench_vllm_goat.py [--requests 32]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "float32",
}
NUM_ADAPTERS = 16
CASES = {"lora": 8, "goat": 32, "goat-merged": 16}  # case -> --max-lora-rank
RESULT = "BENCH_RESULT "  # vLLM logs to stdout too: the child's answer is the line with this


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """The adaptable Linears' shapes of a config, from the model built on the meta device."""
    from goat_runtime.adapters.binding import linear_shapes as model_linear_shapes
    from goat_runtime.model import LlamaForCausalLM, ModelConfig

    model = LlamaForCausalLM(ModelConfig.from_dict(config), device="meta")
    return model_linear_shapes(model.fused_linears())


def prepare(root: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from goat_runtime.adapters.writer import random_adapter

    model_dir = root / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(SMOLLM2_135M))
    gen = torch.Generator().manual_seed(0)
    shapes = linear_shapes(SMOLLM2_135M)
    h = SMOLLM2_135M["hidden_size"]
    tensors = {"model.embed_tokens.weight": torch.randn(SMOLLM2_135M["vocab_size"], h,
                                                        generator=gen) * 0.02,
               "model.norm.weight": torch.ones(h)}
    for n in range(SMOLLM2_135M["num_hidden_layers"]):
        tensors[f"model.layers.{n}.input_layernorm.weight"] = torch.ones(h)
        tensors[f"model.layers.{n}.post_attention_layernorm.weight"] = torch.ones(h)
    for module, shape in shapes.items():
        tensors[f"{module}.weight"] = torch.randn(shape, generator=gen) * 0.02
    save_file(tensors, str(model_dir / "model.safetensors"))
    for i in range(NUM_ADAPTERS):
        random_adapter(root / "goat" / f"goat{i}", shapes, kind="goat", rank=8,
                       num_experts=8, top_k=2, seed=i)
        random_adapter(root / "lora" / f"lora{i}", shapes, kind="lora", rank=8, seed=100 + i)


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
                cmd = [sys.executable, __file__, "--case", case, "--root", str(root),
                       "--requests", str(args.requests), "--prompt", str(args.prompt),
                       "--output", str(args.output), "--repeats", str(args.repeats),
                       "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
                out = subprocess.run(cmd, capture_output=True, text=True,
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
