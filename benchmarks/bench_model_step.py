"""Where a decode step's time goes: paged attention vs the linear layers, on SmolLM2-135M shapes
(hidden 576, 9 heads, 3 KV heads, head_dim 64, 30 layers) with random weights, with the decode
attention's C++ kernel and with the torch path (gather the contexts, one masked SDPA), then with
the C++ kernel and the weights packed for oneDNN (`LlamaForCausalLM.pack_weights`).

    .venv/bin/python -m benchmarks.bench_model_step [--seqs 32] [--context 200] [--dtype bf16]
"""

import argparse
import random
import time
from collections import defaultdict
from collections.abc import Callable

import torch

from benchmarks.random_model import SMOLLM2_135M
from goat_runtime.model import layers
from goat_runtime.model.config import ModelConfig
from goat_runtime.model.context import build_step_context, step_context
from goat_runtime.model.kv_cache import KVCache
from goat_runtime.model.layers import FusedLinear, PagedAttention
from goat_runtime.model.llama import LlamaForCausalLM
from goat_runtime.ops.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_torch,
)

totals: dict[str, float] = defaultdict(float)


def timed(name: str, fn: Callable) -> Callable:
    def wrapper(self, *args):
        start = time.perf_counter()
        out = fn(self, *args)
        totals[name] += time.perf_counter() - start
        return out
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    config = ModelConfig.from_dict(SMOLLM2_135M)
    model = LlamaForCausalLM(config, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():  # unit-scale activations: no denormals
            p.fill_(1.0) if "norm" in name else p.normal_(0, p.shape[-1] ** -0.5)
    rng = random.Random(0)
    lens = [args.context + rng.randint(-20, 20) for _ in range(args.seqs)]
    blocks_per_seq = -(-(max(lens) + 1) // args.block_size)
    model.attach_kv_cache(KVCache(config, args.seqs * blocks_per_seq, args.block_size, dtype))
    order = list(range(args.seqs * blocks_per_seq))
    rng.shuffle(order)  # scattered blocks, as after a while of serving
    tables = [order[i * blocks_per_seq : (i + 1) * blocks_per_seq] for i in range(args.seqs)]
    positions, ctx = build_step_context([1] * args.seqs, lens, tables, [-1] * args.seqs,
                                        args.block_size)
    input_ids = torch.randint(0, config.vocab_size, (args.seqs,))

    def run() -> None:
        with torch.inference_mode(), step_context(ctx):
            model.compute_logits(model(input_ids, positions))

    print(f"{args.seqs} decode sequences, context {min(lens)}..{max(lens)}, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    FusedLinear.forward = timed("linear", FusedLinear.forward)
    PagedAttention.forward = timed("attention", PagedAttention.forward)
    # The decode attention as the CPU runs it, and the torch path other devices run; then the
    # CPU's with the weights packed for oneDNN (model.pack_weights, what the engine does).
    for label, decode_attention, packed in (
            ("C++ decode kernel", paged_decode_attention, False),
            ("torch gather+SDPA", paged_decode_attention_torch, False),
            ("C++, packed weights", paged_decode_attention, True)):
        layers.paged_decode_attention = decode_attention
        if packed:
            model.pack_weights()
        run()
        totals.clear()
        start = time.perf_counter()
        for _ in range(args.steps):
            run()
        step_ms = (time.perf_counter() - start) * 1e3 / args.steps
        attn_ms = totals["attention"] * 1e3 / args.steps
        linear_ms = totals["linear"] * 1e3 / args.steps
        print(f"{label:>19}: step {step_ms:6.2f} ms | attention {attn_ms:6.2f} ms "
              f"({attn_ms / config.num_layers:.3f}/layer) | linears {linear_ms:6.2f} ms | "
              f"other {step_ms - attn_ms - linear_ms:6.2f} ms (norms, rope, lm_head, ...)")


if __name__ == "__main__":
    main()
