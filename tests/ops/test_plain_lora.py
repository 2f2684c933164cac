"""Plain LoRA is the routed op with no router: y += scale * B (A x) for every adapted token."""

import pytest
import torch

from goat_runtime.adapters.format import AdaptedLinear
from goat_runtime.adapters.slots import allocate_slots, write_slot
from goat_runtime.ops import add_routed_lora
from goat_runtime.ops.reference import add_routed_lora_reference


@pytest.mark.parametrize("op", [add_routed_lora_reference, add_routed_lora],
                         ids=["reference", "cpu"])
def test_plain_lora_equals_the_op_without_router(op):
    gen = torch.Generator().manual_seed(0)
    d_in, d_out, rank, scale = 40, 24, 6, 1.75
    loras = [AdaptedLinear(torch.randn(rank, d_in, generator=gen),
                           torch.randn(d_out, rank, generator=gen), None, 0, scale)
             for _ in range(3)]
    weights = allocate_slots(3, [d_out], d_in, value_rows=rank, max_experts=0)
    for slot, lora in enumerate(loras):
        write_slot(weights, slot, [lora], [None])
    x = torch.randn(9, d_in, generator=gen)
    slots = torch.tensor([0, 0, 1, -1, 2, 2, 2, 1, -1], dtype=torch.int32)
    y = torch.zeros(9, d_out)
    op(y, x, slots, weights)
    for t, slot in enumerate(slots.tolist()):
        expected = (torch.zeros(d_out) if slot < 0
                    else scale * loras[slot].lora_b @ (loras[slot].lora_a @ x[t]))
        torch.testing.assert_close(y[t], expected, atol=1e-5, rtol=1e-5)
