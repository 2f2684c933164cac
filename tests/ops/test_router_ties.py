"""Equal router logits: every implementation keeps the experts torch.topk keeps on the CPU.

The reference gate is softmax, then torch.topk, then renormalisation (GOAT_SPEC section 2), and
torch.topk's choice among equal probabilities is not the lowest index: for E = 8 equal ones it
keeps {6} (k = 1), {5, 6} (k = 2), {4, 5, 6, 7} (k = 4). Expected outputs here come from that
math written out in this file with torch ops, never from the kernels under test: the reference
loop, the C++ kernel, the Triton kernel (TRITON_INTERPRET=1 on the CPU), the batched `topk_kept`
and the batched gate `ops.gate.gate_rows` (the vLLM plugin's).
"""

import os

import pytest
import torch

from goat_runtime.ops import RoutedLoRAWeights, add_routed_lora
from goat_runtime.ops.gate import gate_rows
from goat_runtime.ops.reference import add_routed_lora_reference
from goat_runtime.ops.topk import topk_kept
from tests.ops.random_weights import SliceSpec, random_weights

D_IN, D_OUT = 8, 6
# Tie patterns: router row e = PATTERNS[name][e % len] * u, so equal entries give equal rows;
# "zero" is a zero-initialised router (every expert tied, any x). u and x hold small integers,
# so every logit is exact in float32 whatever the summation order: equal rows do not always give
# bit-equal logits otherwise (torch's matrix-vector product rounds rows at different positions
# differently), and the test is about ties, not rounding.
PATTERNS = {"zero": (0,), "pairs": (1, 1, 0, 2, 2, 0, 1, 2), "halves": (1, 0)}


def spec_gate(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """GOAT_SPEC section 2 for a batch of tokens: [T, E] logits -> [T, E] expert weights."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(1, top_i, top_w)


def tied_problem(cases: list[tuple[int, int, str]], tokens_per_slot: int = 2, seed: int = 0):
    """One slot per (E, k, pattern), expert rank 1, no static rows; its tokens' x random."""
    specs = [[SliceSpec(D_OUT, num, k, 1)] for num, k, _ in cases]
    weights = random_weights(specs, D_IN, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randint(-3, 4, (D_IN,), generator=gen).float()
    for slot, (num, _, name) in enumerate(cases):
        pattern = PATTERNS[name]
        levels = torch.tensor([float(pattern[e % len(pattern)]) for e in range(num)])
        weights.router[slot, 0, :num] = levels[:, None] * u
    slots = torch.arange(len(cases), dtype=torch.int32).repeat_interleave(tokens_per_slot)
    x = torch.randint(-3, 4, (slots.shape[0], D_IN), generator=gen).float()
    return weights, slots, x


def spec_output(weights: RoutedLoRAWeights, slots: torch.Tensor, x: torch.Tensor,
                cases: list[tuple[int, int, str]]) -> torch.Tensor:
    """y = sum_e w_e B_e (A_e x) with the spec's gate, per token (expert rank 1)."""
    y = torch.zeros(x.shape[0], D_OUT)
    for t in range(x.shape[0]):
        slot = int(slots[t])
        num, k, _ = cases[slot]
        logits = weights.router[slot, 0, :num] @ x[t]
        w = spec_gate(logits.unsqueeze(0), k)[0]
        h = weights.shrink[slot, 0, :num].float() @ x[t]
        y[t] = (w * h) @ weights.expand[slot, :num].float()
    return y


def all_cases(max_experts: int) -> list[tuple[int, int, str]]:
    return [(num, k, name) for num in range(1, max_experts + 1) for k in range(1, num + 1)
            for name in PATTERNS]


def test_the_tie_rule_is_not_the_lowest_index():
    """What the test cases rely on: torch.topk's choice for equal values (E = 8, zero router)."""
    probs = torch.softmax(torch.zeros(1, 8), dim=-1)
    assert sorted(torch.topk(probs, 2, dim=-1).indices[0].tolist()) == [5, 6]
    assert torch.topk(probs[0], 1).indices.tolist() == [6]


@pytest.mark.parametrize("op", [add_routed_lora_reference, add_routed_lora],
                         ids=["reference", "cpu"])
def test_ops_break_ties_as_torch_topk(op):
    """Every E <= 16, every k, three tie patterns."""
    cases = all_cases(16)
    weights, slots, x = tied_problem(cases)
    expected = spec_output(weights, slots, x, cases)
    y = torch.zeros(x.shape[0], D_OUT)
    op(y, x, slots, weights)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    # Not vacuous: the lowest-index rule gives other outputs on these cases.
    lowest = weights.router.clone()
    for slot, (num, _, _) in enumerate(cases):  # strictly decreasing logits in index order
        lowest[slot, 0, :num] = torch.linspace(1e-3, 0, num)[:, None] * x[2 * slot].sign()
    assert (y - spec_output(RoutedLoRAWeights(weights.shrink, lowest, weights.expand,
                                              weights.slice_meta, weights.out_offsets),
                            slots, x, cases)).abs().max() > 1e-3


def test_counts_follow_the_kept_experts():
    """expert_counts of the C++ kernel count the experts torch.topk keeps (zero router)."""
    cases = [(8, 2, "zero"), (4, 1, "zero")]
    weights, slots, x = tied_problem(cases, tokens_per_slot=3)
    counts = torch.zeros(2, 8, dtype=torch.int64)
    add_routed_lora(torch.zeros(6, D_OUT), x, slots, weights, counts)
    assert counts[0].nonzero().flatten().tolist() == [5, 6]
    assert counts[1].nonzero().flatten().tolist() == [2]  # torch.topk(4 equal, 1) keeps 2
    assert counts.sum() == 3 * (2 + 1)


def tied_logits(cases: list[tuple[int, int, str]], e_max: int) -> torch.Tensor:
    logits = torch.full((len(cases), e_max), 7.0)  # columns past E: ignored
    for row, (num, _, name) in enumerate(cases):
        pattern = PATTERNS[name]
        logits[row, :num] = torch.tensor([float(pattern[e % len(pattern)]) for e in range(num)])
    return logits


def test_topk_kept_and_vllm_gate_break_ties_as_torch_topk():
    cases = all_cases(16)
    logits = tied_logits(cases, 16)
    num = torch.tensor([c[0] for c in cases])
    k = torch.tensor([c[1] for c in cases])
    expected = torch.zeros(len(cases), 16)
    for row, (e, top_k, _) in enumerate(cases):
        expected[row, :e] = spec_gate(logits[row : row + 1, :e], top_k)[0]
    probs = torch.softmax(logits.masked_fill(torch.arange(16) >= num[:, None], -torch.inf), -1)
    assert torch.equal(topk_kept(probs, num, k), expected > 0)
    # The gate of vLLM's layout (rows [0, E) router, then E experts of rank 1).
    meta = torch.stack([num, k, torch.ones_like(num)], dim=1)
    gate = gate_rows(logits, meta, 2 * 16)
    for row, (e, _, _) in enumerate(cases):
        torch.testing.assert_close(gate[row, e : 2 * e], expected[row, :e], rtol=1e-6,
                                   atol=0)


# ---- the Triton kernel, through the interpreter ---------------------------------------------


@pytest.fixture(scope="module")
def triton_kernel():
    """goat_runtime.ops.triton_kernel imported with TRITON_INTERPRET=1 (in a fresh module state
    when triton was imported without it, the Triton tests are skipped here)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        import sys

        if "triton" in sys.modules:
            pytest.skip("triton was imported without TRITON_INTERPRET=1 in this process")
        os.environ["TRITON_INTERPRET"] = "1"
    from goat_runtime.ops import triton_kernel

    return triton_kernel


def test_triton_topk_kept_breaks_ties_as_torch_topk(triton_kernel):
    """All E <= 8 equal (every k) and E = 12, 16 (some k), a few partial patterns, and the two
    rarer paths of torch.topk: its heap select for 64 k <= E, and introselect's heap-select
    fallback (this organ-pipe pattern of 57 values exhausts its depth limit for k = 16). (The
    interpreter takes about 0.2 s a tied row.)"""
    cases = [(num, k, "zero") for num in range(1, 9) for k in range(1, num + 1)]
    cases += [(num, k, "zero") for num in (12, 16) for k in (1, 2, num // 2 + 1)]
    cases += [(8, 3, "pairs"), (16, 5, "pairs"), (7, 1, "halves"), (12, 6, "halves")]
    logits = tied_logits(cases, 16)
    num = torch.tensor([c[0] for c in cases])
    k = torch.tensor([c[1] for c in cases])
    probs = torch.softmax(logits.masked_fill(torch.arange(16) >= num[:, None], -torch.inf), -1)
    kept = triton_kernel.topk_kept_triton(probs, num, k)
    for row, (e, top_k, _) in enumerate(cases):
        chosen = torch.topk(probs[row, :e], top_k).indices
        assert kept[row].nonzero().flatten().tolist() == sorted(chosen.tolist()), cases[row]
    levels = sorted(float(i % 9) for i in range(57))
    organ = torch.tensor([levels[::2] + levels[1::2][::-1], [0.0] * 57])
    for values, top_k in ((organ[0], 16), (organ[1], 1)):
        kept = triton_kernel.topk_kept_triton(values[None, :], torch.tensor([57]),
                                              torch.tensor([top_k]))
        assert kept[0].nonzero().flatten().tolist() == sorted(
            torch.topk(values, top_k).indices.tolist())


def test_triton_kernel_breaks_ties_as_torch_topk(triton_kernel):
    cases = [(num, k, name) for num in (4, 8) for k in sorted({1, 2, num})
             for name in ("zero", "pairs")]
    weights, slots, x = tied_problem(cases, tokens_per_slot=1, seed=3)
    y = torch.zeros(x.shape[0], D_OUT)
    triton_kernel.add_routed_lora_triton(y, x, slots, weights)
    torch.testing.assert_close(y, spec_output(weights, slots, x, cases), rtol=1e-5, atol=1e-6)


def test_bfloat16_serving_keeps_the_router_in_float32():
    """Two router rows one float32 ulp-scale step apart round to the same bfloat16 row: served in
    bfloat16 (weights, x and y), the kernels still keep the expert the float32 router prefers,
    as the spec does with x widened to float32."""
    from goat_runtime.adapters.format import AdaptedLinear
    from goat_runtime.adapters.slots import allocate_slots, write_slot

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, D_IN, generator=gen).bfloat16()
    base = torch.randn(D_IN, generator=gen).bfloat16().float()
    router = torch.stack([base, base, -base, -base])
    router[1] += 1e-4 * x[0].float().sign()  # expert 1 wins for token 0 in float32
    assert torch.equal(router[0].bfloat16(), router[1].bfloat16())  # ... and ties in bf16
    layer = AdaptedLinear(torch.randn(4, D_IN, generator=gen), torch.randn(D_OUT, 4,
                          generator=gen), router, 1, 1.0)
    weights = allocate_slots(1, [D_OUT], D_IN, value_rows=4, max_experts=4,
                             dtype=torch.bfloat16)
    write_slot(weights, 0, [layer], [None])
    assert weights.router.dtype == torch.float32 and torch.equal(weights.router[0, 0], router)
    slots = torch.zeros(1, dtype=torch.int32)
    logits = router @ x[0].float()
    assert logits[1] > logits[0]
    y = torch.zeros(1, D_OUT, dtype=torch.bfloat16)
    add_routed_lora(y, x[:1], slots, weights)
    h = weights.shrink[0, 0].float() @ x[0].float()
    expected = (spec_gate(logits[None], 1)[0] * h) @ weights.expand[0].float()
    torch.testing.assert_close(y[0].float(), expected.bfloat16().float(), rtol=0, atol=0)
    # With the router rounded to bfloat16 the choice would be expert 1's tie partner.
    rounded = spec_gate((router.bfloat16().float() @ x[0].float())[None], 1)[0]
    assert rounded.argmax() != 1


