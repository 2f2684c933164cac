"""oneDNN (weight packed, as the engine runs it) against torch's default GEMM (F.linear, MKL)
for fp32 linears on the CPU, per weight shape and row count, side by side in one process:
what `layers.ONEDNN_MIN_WEIGHT` and `layers.ONEDNN_MAX_ROWS` are set from.

    python -m benchmarks.bench_linear              # one thread, the engine's CPU shapes
    python -m benchmarks.bench_linear --threads 2

Prints, per shape, microseconds per call (median of --repeats runs) for each row count, and
which of the two `fast_linear` takes for it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from goat_runtime.model.layers import onednn_serves

# The tiny fixture model's linears (hidden 128), sizes around the threshold, SmolLM2-135M's.
SHAPES = ((128, 128), (352, 128), (704, 128), (320, 128), (256, 256), (384, 384), (512, 512),
          (576, 576), (960, 576), (576, 1536), (3072, 576))
ROWS = (1, 4, 16, 32, 64)


def time_us(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(calls // 10 + 1):  # warm-up: oneDNN builds its primitive on the first call
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=300, help="calls per timed run")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        raise SystemExit("this torch has no oneDNN")
    torch.set_num_threads(args.threads)
    print(f"us per call, oneDNN packed / F.linear, {args.threads} thread(s)")
    print("| weight (d_out x d_in) | elements | " + " | ".join(f"{r} rows" for r in ROWS)
          + " | fast_linear |")
    print("|---|---|" + "---|" * len(ROWS) + "---|")
    for d_out, d_in in SHAPES:
        weight = torch.randn(d_out, d_in)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
        cells = []
        for rows in ROWS:
            x = torch.randn(rows, d_in)
            onednn = time_us(lambda x=x, w=packed: torch.ops.mkldnn._linear_pointwise(
                x, w, None, "none", [], ""), args.calls, args.repeats)
            mkl = time_us(lambda x=x, w=weight: F.linear(x, w), args.calls, args.repeats)
            cells.append(f"{onednn:.0f} / {mkl:.0f}")
        chosen = "oneDNN" if onednn_serves(weight) else "F.linear"
        print(f"| {d_out} x {d_in} | {d_out * d_in:,} | " + " | ".join(cells) + f" | {chosen} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
