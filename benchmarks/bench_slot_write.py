"""One GOAT adapter's slot write, as the CPU engine makes it before the adapter's first step
(r = 8 split over E = 8 experts, k = 2, on all seven projections, SmolLM2-135M's shapes: 120
fused linears, 210 slices, about 14 MB): into slots never written (their pages are first
touched) and into slots written before (reused once their adapter left the host). Prints the
median of each.

    .venv/bin/python -m benchmarks.bench_slot_write [--writes 24]
"""

import argparse
import statistics
import time

import torch

from benchmarks.bench_routed_lora import NUM_EXPERTS as EXPERTS
from benchmarks.bench_routed_lora import PROJECTIONS, RANK, TOP_K
from benchmarks.random_model import SMOLLM2_135M
from goat_runtime.adapters.format import AdaptedLinear
from goat_runtime.adapters.slots import allocate_slots, write_slot


def fused_linears() -> list[tuple[tuple[int, ...], int]]:
    """(output slices, d_in) of each fused linear of the model: one layer's, every layer."""
    return [(outs, d_in) for _, d_in, outs in PROJECTIONS] * SMOLLM2_135M["num_hidden_layers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=24)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    linears = fused_linears()
    pools = [allocate_slots(args.writes, outs, d_in, value_rows=RANK,
                            max_experts=EXPERTS, zeroed=False)  # as the CPU engine's pool
             for outs, d_in in linears]
    adapters = [[[AdaptedLinear(torch.randn(RANK, d_in, generator=gen),
                                torch.randn(d_out, RANK, generator=gen),
                                torch.randn(EXPERTS, d_in, generator=gen), TOP_K, 2.0)
                  for d_out in outs] for outs, d_in in linears] for _ in range(2)]

    def write(slot: int, adapter: list[list[AdaptedLinear]]) -> float:
        start = time.perf_counter()
        for pool, deltas in zip(pools, adapter, strict=True):
            write_slot(pool, slot, deltas, [None] * len(deltas))
        return time.perf_counter() - start

    fresh = [write(slot, adapters[0]) for slot in range(args.writes)]
    again = [write(slot, adapters[1]) for slot in range(args.writes)]
    nbytes = sum(t[0].nbytes for p in pools for t in (p.shrink, p.router, p.expand))
    print(f"slot write, {len(linears)} fused linears, {nbytes / 1e6:.1f} MB a slot, "
          f"{torch.get_num_threads()} threads: new slot p50 "
          f"{statistics.median(fresh) * 1e3:.1f} ms, reused slot p50 "
          f"{statistics.median(again) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
