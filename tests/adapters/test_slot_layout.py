"""write_slot writes a slot whole: nothing of what the slot held before (an earlier, larger
adapter, or memory never written: CPU pools are allocated unset) shows through; a slot image
holds what writing slice by slice holds."""

import pytest
import torch

from goat_runtime.adapters.format import AdaptedLinear
from goat_runtime.adapters.slots import (
    allocate_slots,
    slot_image,
    slot_images,
    write_image,
    write_slice,
    write_slot,
)
from goat_runtime.adapters.static import Factors
from goat_runtime.ops import RoutedLoRAWeights

OUT_SIZES, D_IN = [12, 6, 6], 16  # a q/k/v-like fused linear


def _delta(gen: torch.Generator, d_out: int, experts: int, expert_rank: int,
           ) -> AdaptedLinear:
    rank = experts * expert_rank if experts else expert_rank
    router = torch.randn(experts, D_IN, generator=gen) if experts else None
    return AdaptedLinear(torch.randn(rank, D_IN, generator=gen),
                         torch.randn(d_out, rank, generator=gen), router,
                         2 if experts else 0, 0.5)


def test_a_rewritten_slot_equals_a_fresh_zeroed_one() -> None:
    gen = torch.Generator().manual_seed(0)
    large = [_delta(gen, d, 8, 2) for d in OUT_SIZES]  # 16 rows, 8 experts in every slice
    static = (torch.randn(2, D_IN, generator=gen), torch.randn(OUT_SIZES[1], 2, generator=gen))
    # smaller: a 4-expert slice with a static term, a plain LoRA slice, a slice left alone
    small = [_delta(gen, OUT_SIZES[0], 4, 2), _delta(gen, OUT_SIZES[1], 0, 4), None]
    small_statics = [None, static, None]

    reused = allocate_slots(2, OUT_SIZES, D_IN, value_rows=18, max_experts=8, zeroed=False)
    for tensor in (reused.shrink, reused.router, reused.expand):
        tensor.fill_(float("nan"))  # what unset memory may hold
    write_slot(reused, 1, large, [None, static, static])
    write_slot(reused, 1, small, small_statics)

    fresh = allocate_slots(2, OUT_SIZES, D_IN, value_rows=18, max_experts=8)
    write_slot(fresh, 1, small, small_statics)
    for name in ("shrink", "router", "expand", "slice_meta"):
        torch.testing.assert_close(getattr(reused, name)[1], getattr(fresh, name)[1],
                                   rtol=0, atol=0, msg=name)
    assert fresh.slice_meta[1].tolist() == [[4, 2, 2, 8], [0, 0, 0, 6], [0, 0, 0, 0]]
    assert int(fresh.expand[1, 8:, :OUT_SIZES[0]].count_nonzero()) == 0  # padding rows


def _slice_by_slice(weights: RoutedLoRAWeights, slot: int, deltas: list[AdaptedLinear | None],
                    statics: list[Factors | None]) -> None:
    """The layout written one slice at a time (write_slice, as the vLLM plugin writes it)."""
    for s, (delta, static) in enumerate(zip(deltas, statics, strict=True)):
        blocks = [] if delta is None else [(delta.lora_a, delta.scale * delta.lora_b)]
        blocks += [static] if static is not None else []
        router = delta.router if delta is not None else None
        write_slice(weights, slot, s, blocks, router, delta.top_k if delta else 0,
                    delta.expert_rank if delta else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["alike", "mixed", "alike+static", "lora", "none"])
def test_an_image_holds_what_slice_by_slice_writes_hold(case: str, dtype: torch.dtype) -> None:
    """slot_image's two ways (every slice adapted alike: whole-tensor ops; otherwise slice by
    slice) and write_image's static rows, against write_slice, in float32 and bfloat16 slots."""
    gen = torch.Generator().manual_seed(1)
    static = (torch.randn(2, D_IN, generator=gen), torch.randn(OUT_SIZES[1], 2, generator=gen))
    deltas, statics = {
        "alike": ([_delta(gen, d, 4, 2) for d in OUT_SIZES], [None] * 3),
        "mixed": ([_delta(gen, OUT_SIZES[0], 4, 2), _delta(gen, OUT_SIZES[1], 0, 4), None],
                  [None, static, None]),
        "alike+static": ([_delta(gen, d, 4, 2) for d in OUT_SIZES], [None, static, static]),
        "lora": ([_delta(gen, d, 0, 4) for d in OUT_SIZES], [None] * 3),
        "none": ([None] * 3, [None, static, None]),
    }[case]
    image = slot_image(deltas, OUT_SIZES, D_IN)
    assert all(t.dtype == torch.float32 for t in image.tensors()[:3])
    got = allocate_slots(2, OUT_SIZES, D_IN, value_rows=12, max_experts=8, dtype=dtype)
    want = allocate_slots(2, OUT_SIZES, D_IN, value_rows=12, max_experts=8, dtype=dtype)
    write_image(got, 1, image, statics)
    _slice_by_slice(want, 1, deltas, statics)
    for name in ("shrink", "router", "expand", "slice_meta"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0,
                                   msg=name)


def test_an_adapter_larger_than_the_slots_is_refused() -> None:
    gen = torch.Generator().manual_seed(2)
    deltas = [_delta(gen, d, 8, 2) for d in OUT_SIZES]  # 16 rows, 8 experts
    slots = allocate_slots(1, OUT_SIZES, D_IN, value_rows=8, max_experts=8)
    with pytest.raises(ValueError, match="needs 16 value rows and 8 router rows; the slots hold 8"):
        write_image(slots, 0, slot_image(deltas, OUT_SIZES, D_IN))
    static = (torch.randn(2, D_IN, generator=gen), torch.randn(OUT_SIZES[0], 2, generator=gen))
    small = [_delta(gen, d, 4, 2) for d in OUT_SIZES]  # 8 rows: the static term makes it 10
    with pytest.raises(ValueError, match="needs 10 value rows"):
        write_image(slots, 0, slot_image(small, OUT_SIZES, D_IN), [static, None, None])


def test_linears_laid_out_together_hold_what_each_alone_holds() -> None:
    """slot_images lays out linears of one shape adapted alike in one batch (here two q/k/v
    linears, beside a linear of another shape and one whose slices differ)."""
    gen = torch.Generator().manual_seed(3)
    other_sizes, other_d_in = [10, 10], 8

    def delta(d_out: int, d_in: int) -> AdaptedLinear:
        return AdaptedLinear(torch.randn(8, d_in, generator=gen),
                             torch.randn(d_out, 8, generator=gen),
                             torch.randn(4, d_in, generator=gen), 2, 0.75)

    linears = [([delta(d, D_IN) for d in OUT_SIZES], OUT_SIZES, D_IN),
               ([delta(d, other_d_in) for d in other_sizes], other_sizes, other_d_in),
               ([delta(d, D_IN) for d in OUT_SIZES], OUT_SIZES, D_IN),
               ([delta(OUT_SIZES[0], D_IN), None, _delta(gen, OUT_SIZES[2], 0, 4)], OUT_SIZES,
                D_IN)]
    for (deltas, sizes, d_in), image in zip(linears, slot_images(linears), strict=True):
        got = allocate_slots(1, sizes, d_in, value_rows=8, max_experts=4)
        want = allocate_slots(1, sizes, d_in, value_rows=8, max_experts=4)
        write_image(got, 0, image)
        _slice_by_slice(want, 0, deltas, [None] * len(deltas))
        for name in ("shrink", "router", "expand", "slice_meta"):
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0,
                                       msg=name)
