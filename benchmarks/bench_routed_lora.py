"""Micro-benchmark of the CPU routed low-rank op on one SmolLM2-135M decoder layer.

Prints, per batch size T and token layout, the time of the layer's four base projections
(F.linear: fused q/k/v, o, fused gate/up, down), the time the adapters add to them (the four
add_routed_lora calls: 16 distinct GOAT adapters, r = 8, E = 8, top_k = 2, all seven
projections), and their ratio. Base and adapter calls are timed interleaved in one loop, so
machine noise hits both alike; figures are medians.

    python -m benchmarks.bench_routed_lora [--threads 2] [--quick] [--no-reference]
                                           [--weights-dtype bfloat16]

Also printed per configuration: the time to merely read every stacked adapter weight once
(torch.sum over the shrink and expand tensors, timed the same way right after the base
projections). At decode the op is memory bound, so that time is its floor whatever the kernel.
"""

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.random_model import SMOLLM2_135M
from goat_runtime.ops import RoutedLoRAWeights, add_routed_lora
from goat_runtime.ops.reference import add_routed_lora_reference

HIDDEN, INTERMEDIATE = SMOLLM2_135M["hidden_size"], SMOLLM2_135M["intermediate_size"]
KV = HIDDEN // SMOLLM2_135M["num_attention_heads"] * SMOLLM2_135M["num_key_value_heads"]
# (name, d_in, output slices): the fused base linears of one SmolLM2-135M decoder layer.
PROJECTIONS = (
    ("qkv", HIDDEN, (HIDDEN, KV, KV)),
    ("o", HIDDEN, (HIDDEN,)),
    ("gate_up", HIDDEN, (INTERMEDIATE, INTERMEDIATE)),
    ("down", INTERMEDIATE, (HIDDEN,)),
)
NUM_SLOTS, RANK, NUM_EXPERTS, TOP_K = 16, 8, 8, 2


def stacked_adapters(d_in: int, out_sizes: tuple[int, ...], static_rank: int,
                     gen: torch.Generator, dtype: torch.dtype = torch.float32) -> RoutedLoRAWeights:
    """NUM_SLOTS random GOAT adapters for one fused linear, in the op's stacked layout."""
    expert_rank = RANK // NUM_EXPERTS
    rows = NUM_EXPERTS * expert_rank + static_rank
    offsets = [0]
    for size in out_sizes:
        offsets.append(offsets[-1] + size)
    num_slices = len(out_sizes)
    shrink = torch.randn(NUM_SLOTS, num_slices, rows, d_in, generator=gen) / d_in**0.5
    router = torch.randn(NUM_SLOTS, num_slices, NUM_EXPERTS, d_in, generator=gen) / d_in**0.5
    expand = torch.randn(NUM_SLOTS, rows, offsets[-1], generator=gen) / rows**0.5
    meta = torch.tensor([NUM_EXPERTS, TOP_K, expert_rank, rows], dtype=torch.int32)
    meta = meta.expand(NUM_SLOTS, num_slices, 4).contiguous()
    # Routers are float32 whatever the weights' dtype (as the slot manager keeps them).
    return RoutedLoRAWeights(shrink.to(dtype), router, expand.to(dtype), meta, tuple(offsets))


def layouts(num_tokens: int) -> dict[str, torch.Tensor]:
    """Token slot layouts: 'distinct' (token t uses slot t % 16, as in decode) and, for long
    batches, 'segments' (16 contiguous same-slot runs, as in prefill)."""
    out = {"distinct": (torch.arange(num_tokens) % NUM_SLOTS).to(torch.int32)}
    if num_tokens >= 4 * NUM_SLOTS:
        out["segments"] = (torch.arange(num_tokens) * NUM_SLOTS // num_tokens).to(torch.int32)
    return out


def time_layer(num_tokens: int, slots: torch.Tensor, base: list[torch.Tensor],
               adapters: list[RoutedLoRAWeights], reps: int, warmup: int,
               op=add_routed_lora) -> tuple[float, float]:
    """Median seconds of the base projections and of the adapters' added time, interleaved."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(num_tokens, w.shape[1], generator=gen) for w in base]
    base_times, adapter_times = [], []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        ys = [F.linear(x, w) for x, w in zip(xs, base, strict=True)]
        t1 = time.perf_counter()
        for y, x, weights in zip(ys, xs, adapters, strict=True):
            op(y, x, slots, weights)
        t2 = time.perf_counter()
        if i >= warmup:
            base_times.append(t1 - t0)
            adapter_times.append(t2 - t1)
    return statistics.median(base_times), statistics.median(adapter_times)


def time_weight_read(base: list[torch.Tensor], adapters: list[RoutedLoRAWeights], reps: int,
                     num_tokens: int = 32) -> tuple[float, float]:
    """Median seconds of the base projections and of reading every adapter weight once."""
    xs = [torch.randn(num_tokens, w.shape[1]) for w in base]
    tensors = [t for weights in adapters for t in (weights.shrink, weights.router, weights.expand)]
    base_times, read_times = [], []
    for i in range(3 + reps):
        t0 = time.perf_counter()
        for x, w in zip(xs, base, strict=True):
            F.linear(x, w)
        t1 = time.perf_counter()
        for t in tensors:
            t.sum()
        t2 = time.perf_counter()
        if i >= 3:
            base_times.append(t1 - t0)
            read_times.append(t2 - t1)
    return statistics.median(base_times), statistics.median(read_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="few repetitions (seconds)")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference implementation's figure")
    parser.add_argument("--weights-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the stacked adapter weights (activations stay float32)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)

    dtype = getattr(torch, args.weights_dtype)
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(sum(outs), d_in, generator=gen) / d_in**0.5
            for _, d_in, outs in PROJECTIONS]
    configs = {
        "unmerged (static rank 8)": [stacked_adapters(d, outs, RANK, gen, dtype)
                                     for _, d, outs in PROJECTIONS],
        "merged (no static term)": [stacked_adapters(d, outs, 0, gen, dtype)
                                    for _, d, outs in PROJECTIONS],
    }
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before the run: other processes share the CPUs, "
              "the figures (base and adapters alike) may be inflated and noisy")
    reps = {1: 400, 32: 200, 512: 20}
    if args.quick:
        reps = {1: 50, 32: 30, 512: 3}

    print(f"SmolLM2-135M layer, {NUM_SLOTS} adapters, r={RANK} E={NUM_EXPERTS} k={TOP_K}, "
          f"{args.weights_dtype} adapter weights, threads={torch.get_num_threads()}, "
          "median times")
    header = f"{'adapters':<26}{'T':>5}  {'layout':<9}{'base ms':>9}{'adapter ms':>12}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    for name, adapters in configs.items():
        for num_tokens, count in reps.items():
            for layout, slots in layouts(num_tokens).items():
                base_s, adapter_s = time_layer(num_tokens, slots, base, adapters, count,
                                               warmup=max(3, count // 10))
                print(f"{name:<26}{num_tokens:>5}  {layout:<9}{base_s * 1e3:>9.3f}"
                      f"{adapter_s * 1e3:>12.3f}{adapter_s / base_s:>8.3f}")

    print()
    for name, adapters in configs.items():
        nbytes = sum(t.numel() * t.element_size() for a in adapters
                     for t in (a.shrink, a.router, a.expand))
        base_s, read_s = time_weight_read(base, adapters, reps[32])
        print(f"floor, {name}: reading all {nbytes / 2**20:.1f} MiB of adapter weights once "
              f"after the T=32 base: {read_s * 1e3:.3f} ms = {read_s / base_s:.3f} x base "
              f"({base_s * 1e3:.3f} ms)")

    if not args.no_reference:
        adapters = configs["unmerged (static rank 8)"]
        slots = layouts(32)["distinct"]
        base_s, ref_s = time_layer(32, slots, base, adapters, reps=3, warmup=1,
                                   op=add_routed_lora_reference)
        print(f"reference (Python loop), unmerged, T=32 distinct: base {base_s * 1e3:.3f} ms, "
              f"adapters {ref_s * 1e3:.3f} ms, ratio {ref_s / base_s:.3f}")


if __name__ == "__main__":
    main()
