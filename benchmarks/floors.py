"""What a decode step must read, the memory bandwidth it reads at, and ratios over rounds.

Shared by `benchmarks/bench_engine.py`, `benchmarks/gpu_check.py` and the side-by-side load test
(`loadtests/side_by_side.py` and its report), so that every printed throughput stands beside its
floor:

- a decode step reads every base Linear weight and the lm_head once (`base_weight_bytes`), the
  rows of each distinct adapter in the batch (`adapter_bytes`: A, B and router of every module
  it targets, plus its static term: its own residual unmerged, the merged one's undo for the
  base and LoRA on a merged server), and the K/V of every context token of every sequence
  (`kv_cache.block_bytes` per token);
- those bytes take at least `bytes / bandwidth`, with the bandwidth measured in the same run by
  a copy loop over buffers larger than the caches (`measure_bandwidth`);
- on a shared machine absolute figures drift between passes, so configurations run
  interleaved over rounds and each ratio is the median of the per-round ratios
  (`median_of_ratios`).

Norms, biases and the embedding rows a step gathers are left out (under 0.1 % of the bytes at
these shapes). A GOAT adapter's rows are counted whole, every expert's included: the kernel
skips the rows of experts no token of the step chose, so for GOAT this is the floor of reading
each distinct adapter once, not the strictest one (which depends on the routers' choices).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBytes:
    """Bytes one decode step reads, by kind."""

    weights: int  # base Linear weights and lm_head
    adapters: int  # the rows of each distinct adapter in the step (and the base's undo term)
    kv: int  # K and V of every context token of every sequence

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.kv

    def seconds(self, bandwidth: float) -> float:
        """The step's floor: its bytes at `bandwidth` bytes per second."""
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be positive, got {bandwidth}")
        return self.total / bandwidth


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def base_weight_bytes(linears: Iterable[torch.nn.Module], lm_head: torch.Tensor) -> int:
    """Bytes of the weights a decode step multiplies by: every fused Linear's weight (one
    read, packed or not: the packed copy is the same size) and the lm_head."""
    return sum(nbytes(linear.weight) for linear in linears) + nbytes(lm_head)


def adapter_bytes(layers: Mapping[str, object], terms: Mapping[str, tuple[torch.Tensor, ...]],
                  element_size: int) -> int:
    """Bytes of one adapter's rows at the served element size. layers: module -> AdaptedLinear
    (lora_a [r, d_in], lora_b [d_out, r], router [E, d_in] or None); terms: module -> the
    static factors (C [r_s, d_in], D [d_out, r_s]) its slot carries."""
    count = 0
    for layer in layers.values():
        count += layer.lora_a.numel() + layer.lora_b.numel()
        if layer.router is not None:
            count += layer.router.numel()
    for factors in terms.values():
        count += sum(f.numel() for f in factors)
    return count * element_size


def step_bytes(weights: int, adapters: Iterable[int], context_tokens: int,
               kv_bytes_per_token: int) -> StepBytes:
    """A decode step's bytes: `adapters` holds the rows of each distinct adapter in the step,
    `context_tokens` the sum of every sequence's context (the new token included)."""
    return StepBytes(weights, sum(adapters), context_tokens * kv_bytes_per_token)


def measure_bandwidth(buffer_bytes: int = 256 << 20, repeats: int = 5,
                      device: str = "cpu") -> float:
    """Memory bandwidth of `device` in bytes per second, the best of `repeats` copies of a
    buffer of `buffer_bytes` (choose it far larger than the last-level cache). A copy reads the
    source and writes the destination: 2 x buffer_bytes move per copy. Best, not mean: on a
    shared machine other jobs only ever slow a copy down."""
    src = torch.ones(buffer_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page once, outside the timing
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes(src) / best


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_of_ratios(rounds: Sequence[Mapping[str, float]], numerator: str,
                     denominator: str) -> tuple[float, list[float]]:
    """The median over rounds of rounds[i][numerator] / rounds[i][denominator], and the
    per-round ratios: a ratio taken within one round cancels the machine's drift between
    rounds. Rounds missing either figure are skipped; none left raises ValueError."""
    ratios = [r[numerator] / r[denominator] for r in rounds
              if numerator in r and denominator in r and r[denominator] > 0]
    if not ratios:
        raise ValueError(f"no round has both {numerator!r} and {denominator!r}")
    return statistics.median(ratios), ratios


def format_ratio(median: float, ratios: Sequence[float]) -> str:
    """'0.912x (0.905, 0.912, 0.930)': the median, then each round's ratio."""
    return f"{median:.3f}x (" + ", ".join(f"{r:.3f}" for r in ratios) + ")"


def decode_floor_tok_s(fixed_bytes: int, kv_bytes_per_token: int, sequences: int, prompt: int,
                       output: int, bandwidth: float) -> float:
    """Tokens per second at the floor over the decode phase of `sequences` requests of `prompt`
    + `output` tokens decoding together: step t = 1 .. output - 1 reads `fixed_bytes` (weights
    and adapter rows) and the K/V of sequences x (prompt + t) context tokens (the first
    output token comes out of the prefill)."""
    if output < 2:
        raise ValueError(f"a decode phase needs output >= 2, got {output}")
    steps = output - 1
    context = sequences * (steps * prompt + steps * (steps + 1) // 2)  # sum over t of (p + t)
    total = steps * fixed_bytes + context * kv_bytes_per_token
    return sequences * steps * bandwidth / total
