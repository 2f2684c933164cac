"""Random stacked adapters and token-to-slot assignments for the routed op's tests."""

from dataclasses import dataclass

import torch

from goat_runtime.ops import RoutedLoRAWeights

POPULARITIES = ("distinct", "uniform", "zipf", "identical", "skewed")


@dataclass(frozen=True)
class SliceSpec:
    """One output slice of a fused linear, for one slot: its out size and adapter shape."""

    d_out: int
    num_experts: int  # 0: plain LoRA (no router)
    top_k: int
    expert_rank: int
    static_rank: int = 0


def random_weights(slot_specs: list[list[SliceSpec]], d_in: int, *,
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> RoutedLoRAWeights:
    """Stack random adapters: slot_specs[a][s] describes slot a's slice s (out sizes must agree
    across slots). Padding rows stay zero, as the slot manager leaves them."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, num_slices = len(slot_specs), len(slot_specs[0])
    out_sizes = [spec.d_out for spec in slot_specs[0]]
    offsets = [0]
    for size in out_sizes:
        offsets.append(offsets[-1] + size)
    values = max(s.num_experts * s.expert_rank + s.static_rank for row in slot_specs for s in row)
    max_experts = max(s.num_experts for row in slot_specs for s in row)
    shrink = torch.zeros(num_slots, num_slices, values, d_in)
    router = torch.zeros(num_slots, num_slices, max_experts, d_in)
    expand = torch.zeros(num_slots, values, offsets[-1])
    meta = torch.zeros(num_slots, num_slices, 4, dtype=torch.int32)
    for a, row in enumerate(slot_specs):
        for s, spec in enumerate(row):
            rows = spec.num_experts * spec.expert_rank + spec.static_rank
            shrink[a, s, :rows] = torch.randn(rows, d_in, generator=gen) / d_in**0.5
            router[a, s, : spec.num_experts] = torch.randn(spec.num_experts, d_in, generator=gen)
            expand[a, :rows, offsets[s] : offsets[s + 1]] = torch.randn(
                rows, spec.d_out, generator=gen) / rows**0.5
            meta[a, s] = torch.tensor([spec.num_experts, spec.top_k, spec.expert_rank, rows])
    # The router stays float32 whatever the weights' dtype, as the slot manager keeps it.
    return RoutedLoRAWeights(shrink.to(dtype), router, expand.to(dtype), meta, tuple(offsets))


def token_slots(num_tokens: int, num_slots: int, popularity: str, *, seed: int = 0,
                none_fraction: float = 0.0) -> torch.Tensor:
    """Each token's slot under an adapter popularity (S-LoRA/Punica's setups); a fraction of
    tokens get no adapter (-1). Tokens of one request are contiguous, as the engine lays them."""
    gen = torch.Generator().manual_seed(seed)
    if popularity == "distinct":
        slots = torch.arange(num_tokens) % num_slots
    elif popularity == "uniform":
        slots = torch.randint(num_slots, (num_tokens,), generator=gen)
    elif popularity == "zipf":
        weights = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64)
        slots = torch.multinomial(weights, num_tokens, replacement=True, generator=gen)
    elif popularity == "identical":
        slots = torch.zeros(num_tokens, dtype=torch.long)
    elif popularity == "skewed":  # one hot adapter takes 90% of the tokens
        hot = torch.rand(num_tokens, generator=gen) < 0.9
        slots = torch.where(hot, 0, torch.randint(num_slots, (num_tokens,), generator=gen))
    else:
        raise ValueError(f"unknown popularity {popularity!r}; expected one of {POPULARITIES}")
    slots = slots.sort().values if popularity in ("uniform", "zipf", "skewed") else slots
    none = torch.rand(num_tokens, generator=gen) < none_fraction
    return torch.where(none, -1, slots).to(torch.int32)


def fill_padding(weights: RoutedLoRAWeights, value: float) -> RoutedLoRAWeights:
    """A copy of `weights` with every padding row (past each slot's slice's `rows` in
    slice_meta, up to R) of shrink and expand set to `value`: a kernel that reads padding
    (NaN, say) shows it in its output."""
    shrink, expand = weights.shrink.clone(), weights.expand.clone()
    offsets = weights.out_offsets
    for a in range(shrink.shape[0]):
        for s in range(shrink.shape[1]):
            rows = int(weights.slice_meta[a, s, 3])
            shrink[a, s, rows:] = value
            expand[a, rows:, offsets[s] : offsets[s + 1]] = value
    return RoutedLoRAWeights(shrink, weights.router, expand, weights.slice_meta, offsets)
