"""Device slots: the stacked shrink/expand tensors of one fused base linear, one adapter a slot.

`write_slot` lays an adapter's per-slice deltas (plus their static terms) out in the op's layout
(goat_runtime.ops.routed_lora): value rows (experts, then static rows) in the served dtype, the
router in float32 whatever the served dtype;
`write_slice` writes one slice from blocks of rows (the vLLM plugin's slots use it too).
"""

from collections.abc import Sequence

import torch

from goat_runtime.adapters.format import AdaptedLinear
from goat_runtime.adapters.static import Factors
from goat_runtime.ops import RoutedLoRAWeights
from goat_runtime.ops.routed_lora import SLICE_META_FIELDS


def allocate_slots(num_slots: int, out_sizes: Sequence[int], d_in: int, *, value_rows: int,
                   max_experts: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu", zeroed: bool = True) -> RoutedLoRAWeights:
    """Zeroed slots for a fused linear with output slices `out_sizes`; every slot can hold, per
    slice, `value_rows` expert plus static rows (in `dtype`) and a router of up to `max_experts`
    experts (float32). zeroed=False leaves the value rows and routers unset, so that on the CPU
    slots not yet written take no memory: each slot is written whole (write_slot zeroes its
    padding) or copied (copy_slot) before a token reads it, and its metadata, zeroed either
    way, makes an unwritten slot read as no term."""
    offsets = [0]
    for size in out_sizes:
        offsets.append(offsets[-1] + size)
    num_slices = len(out_sizes)
    new = torch.zeros if zeroed else torch.empty
    return RoutedLoRAWeights(
        shrink=new(num_slots, num_slices, value_rows, d_in, dtype=dtype, device=device),
        router=new(num_slots, num_slices, max_experts, d_in, dtype=torch.float32,
                   device=device),
        expand=new(num_slots, value_rows, offsets[-1], dtype=dtype, device=device),
        slice_meta=torch.zeros(num_slots, num_slices, SLICE_META_FIELDS, dtype=torch.int32,
                               device=device),
        out_offsets=tuple(offsets),
    )


def slice_rows(delta: AdaptedLinear | None, static: Factors | None) -> tuple[int, int]:
    """(value rows, router rows) a slice needs in a slot."""
    rows = (delta.rank if delta else 0) + (static[0].shape[0] if static else 0)
    return rows, (delta.num_experts if delta else 0)


def write_slot(weights: RoutedLoRAWeights, slot: int,
               deltas: Sequence[AdaptedLinear | None],
               statics: Sequence[Factors | None]) -> None:
    """Put one adapter in `slot`: deltas[s] and statics[s] for each output slice s (None where
    the adapter leaves the slice alone). Every slice is written whole (its padding zeroed), so
    the slot's earlier contents never show through. Raises ValueError if it does not fit the
    slot."""
    meta = []
    for s, (delta, static) in enumerate(zip(deltas, statics, strict=True)):
        blocks = []
        router, top_k, expert_rank = None, 0, 0
        if delta is not None:
            blocks.append((delta.lora_a, delta.scale * delta.lora_b))
            if delta.router is not None:
                router, top_k, expert_rank = delta.router, delta.top_k, delta.expert_rank
        if static is not None:
            blocks.append(static)
        meta.append(_fill_slice(weights, slot, s, blocks, router, top_k, expert_rank))
    # One write for every slice's metadata: a slot write is hundreds of small ops, each
    # taking the engine thread's time (the CPU writes a new adapter's slot before its step).
    weights.slice_meta[slot] = torch.tensor(meta, dtype=torch.int32)


def write_slice(weights: RoutedLoRAWeights, slot: int, s: int,
                blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
                router: torch.Tensor | None = None, top_k: int = 0,
                expert_rank: int = 0) -> None:
    """Write output slice `s` of `slot` whole (its padding zeroed): its value rows are the
    blocks' (shrink [n, d_in], expand [d_out_s, n], already scaled), in order (the experts'
    block first, then the static term's); `router` [E, d_in] routes top_k of E experts of
    expert_rank rows each (None: no router, every row has gate 1). Raises ValueError if they do
    not fit the slot."""
    meta = _fill_slice(weights, slot, s, blocks, router, top_k, expert_rank)
    weights.slice_meta[slot, s] = torch.tensor(meta, dtype=torch.int32)


def _fill_slice(weights: RoutedLoRAWeights, slot: int, s: int,
                blocks: Sequence[tuple[torch.Tensor, torch.Tensor]],
                router: torch.Tensor | None, top_k: int, expert_rank: int) -> list[int]:
    """write_slice's values and padding; returns the slice's metadata row for the caller to
    write (SLICE_META_FIELDS: experts, top_k, expert rank, value rows)."""
    value_rows = weights.num_value_rows
    max_experts = weights.max_experts
    rows = sum(a.shape[0] for a, _ in blocks)
    experts = router.shape[0] if router is not None else 0
    if rows > value_rows or experts > max_experts:
        raise ValueError(f"slice {s} needs {rows} value rows and {experts} router rows; the "
                         f"slots hold {value_rows} and {max_experts}")
    shrink, expand = weights.shrink[slot, s], weights.expand[slot]
    cols = slice(weights.out_offsets[s], weights.out_offsets[s + 1])
    row = 0
    for a, b in blocks:
        shrink[row : row + a.shape[0]] = a
        expand[row : row + a.shape[0], cols] = b.T
        row += a.shape[0]
    # No op reads the padding (slice_meta's rows and experts bound every read), but a slot
    # should hold what a fresh zeroed one would, whatever it held before. Zeroing only what
    # no value covers, not the whole slot first, halves a write's memory traffic and skips
    # hundreds of ops where adapters share one size.
    if rows < value_rows:
        shrink[rows:].zero_()
        expand[rows:, cols].zero_()
    if router is not None:
        weights.router[slot, s, :experts] = router  # float32: never rounded to the served dtype
    if experts < max_experts:
        weights.router[slot, s, experts:].zero_()
    # The op reads `rows` value rows of this slice, not the padding up to the slots' R.
    return [experts, top_k if router is not None else 0,
            expert_rank if router is not None else 0, rows]


def clear_slot(weights: RoutedLoRAWeights, slot: int) -> None:
    weights.shrink[slot].zero_()
    weights.router[slot].zero_()
    weights.expand[slot].zero_()
    weights.slice_meta[slot].zero_()
