"""One GOAT adapter's slot write, as the CPU engine makes it before the adapter's first step
(r = 8 split over E = 8 experts, k = 2, on all seven projections, SmolLM2-135M's shapes: 120
fused linears, 210 slices, about 14 MB): into slots never written (their pages are first
touched) and into slots written before (reused once their adapter left the host), from the
slot images the reader process made (slots.write_image: the engine's write) and, beside it,
from the adapter's tensors (slots.write_slot: the images made in the write). Prints the median
of each.

    .venv/bin/python -m benchmarks.bench_slot_write [--writes 24]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.bench_routed_lora import NUM_EXPERTS as EXPERTS
from benchmarks.bench_routed_lora import PROJECTIONS, RANK, TOP_K
from benchmarks.random_model import SMOLLM2_135M
from goat_runtime.adapters.format import AdaptedLinear
from goat_runtime.adapters.slots import allocate_slots, slot_image, write_image, write_slot


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
    images = [[slot_image(deltas, outs, d_in) for deltas, (outs, d_in) in zip(
        adapter, linears, strict=True)] for adapter in adapters]

    def from_images(slot: int, i: int) -> None:
        for pool, image in zip(pools, images[i], strict=True):
            write_image(pool, slot, image)

    def from_tensors(slot: int, i: int) -> None:
        for pool, deltas in zip(pools, adapters[i], strict=True):
            write_slot(pool, slot, deltas, [None] * len(deltas))

    def timed(write: Callable[[int, int], None], slots: range, i: int) -> float:
        seconds = []
        for slot in slots:
            start = time.perf_counter()
            write(slot, i)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds) * 1e3

    half = args.writes // 2  # each way writes its own fresh half of the pool, then reuses it
    results = {}
    for what, write, slots in (("from images", from_images, range(half)),
                               ("from tensors", from_tensors, range(half, 2 * half))):
        results[what] = (timed(write, slots, 0), timed(write, slots, 1))
    nbytes = sum(t[0].nbytes for p in pools for t in (p.shrink, p.router, p.expand))
    print(f"slot write, {len(linears)} fused linears, {nbytes / 1e6:.1f} MB a slot, "
          f"{torch.get_num_threads()} threads, p50 of {half} writes each:")
    for what, (fresh, again) in results.items():
        print(f"  {what:12}: new slot {fresh:.1f} ms, reused slot {again:.1f} ms")


if __name__ == "__main__":
    main()
