"""Device slots: the stacked shrink/expand tensors of one fused base linear, one adapter a slot.

`write_slot` lays an adapter's per-slice deltas (plus their static terms) out in the op's layout
(goat_runtime.ops.routed_lora): value rows (experts, then static rows) in the served dtype, the
router in float32 whatever the served dtype. It goes through a `SlotImage` (the adapter in the
slot's layout at its own size), which the CPU engine receives ready-made from the reader
process, so that its slot write is a few copies a linear (`write_image`);
`write_slice` writes one slice from blocks of rows (the vLLM plugin's slots use it).
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class SlotImage:
    """One adapter's part of one fused linear's slots, laid out as a slot holds it but at the
    adapter's own size (rows: its largest rank over the slices; experts: its most experts), in
    float32 whatever the served dtype. write_image copies it in a few whole-tensor ops; built
    ahead of the write (the reader process builds them, adapters/reader.py), it spares the
    engine thread the hundreds of per-slice ops of laying an adapter out."""

    shrink: torch.Tensor  # [S, rows, d_in]: per slice its A (expert blocks), zero past its rank
    router: torch.Tensor  # [S, experts, d_in]: per slice its router G, zero past its experts
    expand: torch.Tensor  # [rows, d_out]: slice s's columns hold scale * B^T, zero past its rank
    slice_meta: torch.Tensor  # [S, SLICE_META_FIELDS] int32 (rows: the adapter's own)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.shrink, self.router, self.expand, self.slice_meta


LinearDeltas = tuple[Sequence[AdaptedLinear | None], Sequence[int], int]  # deltas, outs, d_in


def slot_image(deltas: Sequence[AdaptedLinear | None], out_sizes: Sequence[int],
               d_in: int) -> SlotImage:
    """deltas[s] (None where the adapter leaves output slice s alone) of a fused linear with
    output slices `out_sizes` and input size d_in, as a SlotImage."""
    return slot_images([(deltas, out_sizes, d_in)])[0]


def slot_images(linears: Sequence[LinearDeltas]) -> list[SlotImage]:
    """slot_image of each of `linears`. Linears of one shape whose slices are all adapted alike
    (one rank, expert count and scale: the common case) are laid out together, a few ops for
    every layer's q/k/v at once instead of a few per layer and slice (a SmolLM2-sized GOAT
    adapter's 120 linears in the reader process: 7.6-8.1 -> 3.8-4.0 ms)."""
    images: list[SlotImage | None] = [None] * len(linears)
    # (out_sizes, d_in, rank, experts, scale) -> the indices of the linears of that kind
    alike: dict[tuple[tuple[int, ...], int, int, int, float], list[int]] = {}
    for i, (deltas, out_sizes, d_in) in enumerate(linears):
        present = [d for d in deltas if d is not None]
        kinds = {(d.rank, d.num_experts, d.scale) for d in present}
        if len(present) == len(deltas) and len(kinds) == 1:
            (kind,) = kinds
            alike.setdefault((tuple(out_sizes), d_in, *kind), []).append(i)
        else:
            images[i] = _image_slice_by_slice(deltas, out_sizes, d_in)
    for (sizes, width, rank, experts, scale), members in alike.items():
        group = [d for i in members for d in linears[i][0] if d is not None]
        count, num_slices = len(members), len(sizes)
        shrink = torch.stack([d.lora_a for d in group]).float()
        router = (torch.stack([d.router for d in group if d.router is not None]).float()
                  if experts else torch.zeros(len(group), 0, width))
        expand = torch.cat([d.lora_b for d in group]).float().mul_(scale)
        expand = expand.view(count, sum(sizes), rank).transpose(1, 2).contiguous()
        meta = _meta(group).view(count, num_slices, SLICE_META_FIELDS)
        shrink = shrink.view(count, num_slices, rank, width)
        router = router.view(count, num_slices, experts, width)
        for j, i in enumerate(members):
            images[i] = SlotImage(shrink[j], router[j], expand[j], meta[j])
    return [image for image in images if image is not None]


def _meta(deltas: Sequence[AdaptedLinear | None]) -> torch.Tensor:
    """The slice_meta rows of `deltas` (their own rows, no static term)."""
    return torch.tensor([[0, 0, 0, 0] if d is None else
                         [d.num_experts, d.top_k, d.expert_rank, d.rank] if d.router is not None
                         else [0, 0, 0, d.rank] for d in deltas],
                        dtype=torch.int32).view(len(deltas), SLICE_META_FIELDS)


def _image_slice_by_slice(deltas: Sequence[AdaptedLinear | None], out_sizes: Sequence[int],
                          d_in: int) -> SlotImage:
    """slot_image of a linear whose slices differ (ranks, experts, scales, slices left alone)."""
    present = [d for d in deltas if d is not None]
    rows = max((d.rank for d in present), default=0)
    experts = max((d.num_experts for d in present), default=0)
    image = SlotImage(shrink=torch.zeros(len(deltas), rows, d_in),
                      router=torch.zeros(len(deltas), experts, d_in),
                      expand=torch.zeros(rows, sum(out_sizes)), slice_meta=_meta(deltas))
    offset = 0
    for s, (delta, size) in enumerate(zip(deltas, out_sizes, strict=True)):
        if delta is not None:
            image.shrink[s, : delta.rank] = delta.lora_a
            image.expand[: delta.rank, offset : offset + size] = (
                delta.scale * delta.lora_b.float()).T
            if delta.router is not None:
                image.router[s, : delta.num_experts] = delta.router
        offset += size
    return image


def write_slot(weights: RoutedLoRAWeights, slot: int,
               deltas: Sequence[AdaptedLinear | None],
               statics: Sequence[Factors | None]) -> None:
    """Put one adapter in `slot`: deltas[s] and statics[s] for each output slice s (None where
    the adapter leaves the slice alone). See write_image."""
    d_in = weights.shrink.shape[-1]
    sizes = [b - a for a, b in itertools.pairwise(weights.out_offsets)]
    write_image(weights, slot, slot_image(deltas, sizes, d_in), statics)


def write_image(weights: RoutedLoRAWeights, slot: int, image: SlotImage,
                statics: Sequence[Factors | None] | None = None) -> None:
    """Put one adapter's image in `slot`, with statics[s] (a static term, C [t, d_in] and
    D [d_out_s, t]) as value rows of slice s after the adapter's own. The slot is written whole
    (its padding zeroed), so that its earlier contents never show through. Raises ValueError
    if the adapter does not fit the slot."""
    rows, experts = image.shrink.shape[1], image.router.shape[1]
    meta = image.slice_meta
    terms = [(s, static) for s, static in enumerate(statics or ()) if static is not None]
    if terms:  # the uncommon case (static terms not merged): per slice, after its own rows
        meta = meta.clone()
        for s, (c, _) in terms:
            meta[s, 3] += c.shape[0]
    needed = max(rows, int(meta[:, 3].max())) if terms else rows
    if needed > weights.num_value_rows or experts > weights.max_experts:
        raise ValueError(f"the adapter needs {needed} value rows and {experts} router rows; "
                         f"the slots hold {weights.num_value_rows} and {weights.max_experts}")
    weights.shrink[slot, :, :rows] = image.shrink
    weights.expand[slot, :rows] = image.expand
    weights.router[slot, :, :experts] = image.router  # float32: never rounded
    # No op reads the padding (slice_meta's rows and experts bound every read), but a slot
    # should hold what a fresh zeroed one would, whatever it held before. Zeroing only what
    # the image does not cover, not the whole slot first, halves a write's memory traffic.
    if rows < weights.num_value_rows:
        weights.shrink[slot, :, rows:].zero_()
        weights.expand[slot, rows:].zero_()
    if experts < weights.max_experts:
        weights.router[slot, :, experts:].zero_()
    for s, (c, d) in terms:
        start = int(image.slice_meta[s, 3])
        cols = slice(weights.out_offsets[s], weights.out_offsets[s + 1])
        weights.shrink[slot, s, start : start + c.shape[0]] = c
        weights.expand[slot, start : start + c.shape[0], cols] = d.T
    weights.slice_meta[slot] = meta


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
