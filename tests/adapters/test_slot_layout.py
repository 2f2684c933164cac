"""write_slot writes a slot whole: nothing of what the slot held before (an earlier, larger
adapter, or memory never written: CPU pools are allocated unset) shows through."""

import torch

from goat_runtime.adapters.format import AdaptedLinear
from goat_runtime.adapters.slots import allocate_slots, write_slot

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
