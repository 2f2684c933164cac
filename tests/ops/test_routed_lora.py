"""The CPU routed low-rank kernel (goat_runtime._C via goat_runtime.ops.add_routed_lora) against
the plain PyTorch reference (goat_runtime.ops.reference)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from goat_runtime.ops import RoutedLoRAWeights, add_routed_lora
from goat_runtime.ops.reference import add_routed_lora_reference
from tests.ops.random_weights import (
    POPULARITIES,
    SliceSpec,
    fill_padding,
    random_weights,
    token_slots,
)

# Unit roundoff of float32: every router logit is a float32 dot product in the kernel and in
# the reference (a bfloat16 x widens exactly; the router is float32 in both).
U32 = 2.0**-24
# Probabilistic rounding error analysis (Higham and Mary, SIAM J. Sci. Comput. 41(5), 2019): a
# float32 sum of d products is within lambda sqrt(d) u sum |terms| of the exact value except
# with probability at most 2 exp(-lambda^2 / 2) (1e-8 for lambda = 6), whatever the order.
LAMBDA = 6.0


def near_tie_tokens(x: torch.Tensor, slots: torch.Tensor,
                    weights: RoutedLoRAWeights) -> torch.Tensor:
    """Tokens whose top-k choice two correct float32 implementations may make differently.

    The kernel and the reference sum each logit l_e = sum_i G_ei x_i over d_in terms in
    different orders; each is within LAMBDA sqrt(d_in) u sum_i |G_ei x_i| of the exact value
    (see LAMBDA), and the softmax moves a probability by a few ulps, a logit by about 4u. So the
    kept set can differ only where the gap between the k-th and (k+1)-th exact logits is at most
    the sum of those two logits' bounds. Exact ties (gap 0: equal router rows, x = 0, a zero
    router) are not near ties: every implementation computes equal logits there and must break
    them as torch.topk does. Gaps are computed in float64."""
    ties = torch.zeros(x.shape[0], dtype=torch.bool)
    per_term = LAMBDA * x.shape[1] ** 0.5 * U32
    for t in range(x.shape[0]):
        slot = int(slots[t])
        if slot < 0:
            continue
        for s in range(weights.num_slices):
            num_experts, top_k, *_ = (int(v) for v in weights.slice_meta[slot, s])
            if num_experts <= top_k:
                continue
            terms = weights.router[slot, s, :num_experts].double() * x[t].double()
            logits, order = terms.sum(1).sort(descending=True)
            error = per_term * terms.abs().sum(1)[order] + 4 * U32 * (1 + logits.abs())
            gap = logits[top_k - 1] - logits[top_k]
            if 0 < gap <= error[top_k - 1] + error[top_k]:
                ties[t] = True
    return ties


def check_against_reference(x: torch.Tensor, slots: torch.Tensor, weights: RoutedLoRAWeights,
                            *, rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0) -> None:
    """Run the op and the reference on the same random y; compare (near-tie rows excepted)."""
    gen = torch.Generator().manual_seed(seed)
    d_out = weights.out_offsets[-1]
    y0 = torch.randn(x.shape[0], d_out, generator=gen).to(x.dtype)
    y, y_ref = y0.clone(), y0.clone()
    add_routed_lora(y, x, slots, weights)
    add_routed_lora_reference(y_ref, x, slots, weights)
    keep = ~near_tie_tokens(x, slots, weights)
    # Only the near ties (a gap within the rounding bound above) are skipped: every other token
    # must match. The bound is about 2 LAMBDA u d_in times the logits' spread (sum |G x| is
    # about sqrt(d_in) spreads), about 1e-3 of it at d_in = 1536; the gap between the k-th and
    # (k+1)-th of 8 random logits has a density of about 3 per spread at 0, so under 0.3% of
    # the tokens per routed slice are near ties: more than 1 + 1% of the tokens means the bound
    # or the data is wrong and the comparison has become weak.
    skipped = int((~keep).sum())
    assert skipped <= 1 + 0.01 * len(keep), f"{skipped} near-tie tokens of {len(keep)}"
    # atol is relative to the size of the update: fp32 sums over d_in and R terms in another
    # order differ by a few ulps of the largest terms, not of each (possibly tiny) element.
    scale = max(1.0, (y_ref.float() - y0.float()).abs().max().item()) if y.numel() else 1.0
    torch.testing.assert_close(y[keep], y_ref[keep], rtol=rtol, atol=atol * scale)
    # Tokens without an adapter are untouched, bit for bit.
    none = slots < 0
    assert torch.equal(y[none], y0[none])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padding_rows_are_never_read(dtype):
    """Slots of different sizes share one R: a rank-2 LoRA, a GOAT slice with a static term and a
    GOAT slice without, beside a slot that needs all R = 11 rows. NaN in every slot's padding
    (past its slice_meta rows) leaves the output exactly as zeros there do, in the kernel and
    in the reference; a kernel that still read R rows per slot would turn tokens to NaN."""
    specs = [[SliceSpec(24, 0, 0, 0, 2), SliceSpec(8, 4, 2, 2, 3)],
             [SliceSpec(24, 4, 1, 2, 0), SliceSpec(8, 0, 0, 0, 5)],
             [SliceSpec(24, 4, 2, 2, 3), SliceSpec(8, 2, 1, 4, 3)]]
    weights = random_weights(specs, 40, dtype=dtype, seed=3)
    assert weights.num_value_rows == 11
    poisoned = fill_padding(weights, float("nan"))
    slots = token_slots(36, len(specs), "uniform", seed=4, none_fraction=0.2)
    x = torch.randn(36, 40, generator=torch.Generator().manual_seed(5)).to(dtype)
    for op in (add_routed_lora, add_routed_lora_reference):
        y, y_poisoned = torch.zeros(36, 32, dtype=dtype), torch.zeros(36, 32, dtype=dtype)
        op(y, x, slots, weights)
        op(y_poisoned, x, slots, poisoned)
        assert y.abs().sum() > 0 and torch.equal(y_poisoned, y), op.__name__


# ---- property test --------------------------------------------------------------------------


@st.composite
def slice_specs(draw, d_out: int) -> SliceSpec:
    num_experts = draw(st.integers(0, 8))
    if num_experts == 0:  # plain LoRA
        return SliceSpec(d_out, 0, 0, 0, draw(st.integers(1, 8)))
    top_k = draw(st.integers(1, num_experts))
    return SliceSpec(d_out, num_experts, top_k, draw(st.integers(1, 4)), draw(st.integers(0, 8)))


@st.composite
def problems(draw):
    num_slices = draw(st.integers(1, 3))
    out_sizes = draw(st.lists(st.integers(1, 48), min_size=num_slices, max_size=num_slices))
    d_in = draw(st.integers(1, 80).filter(lambda d: d != sum(out_sizes)))
    num_slots = draw(st.integers(1, 16))
    if draw(st.booleans()):  # every slot the same adapter shape
        row = [draw(slice_specs(size)) for size in out_sizes]
        specs = [row] * num_slots
    else:  # each slot its own (different E, k, ranks per adapter)
        specs = [[draw(slice_specs(size)) for size in out_sizes] for _ in range(num_slots)]
    num_tokens = draw(st.one_of(st.integers(1, 40), st.integers(41, 512)))
    popularity = draw(st.sampled_from(POPULARITIES))
    none_fraction = draw(st.sampled_from([0.0, 0.0, 0.2, 0.9]))
    seed = draw(st.integers(0, 2**16))
    return specs, d_in, num_tokens, popularity, none_fraction, seed


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_reference_property(problem):
    specs, d_in, num_tokens, popularity, none_fraction, seed = problem
    weights = random_weights(specs, d_in, seed=seed)
    slots = token_slots(num_tokens, len(specs), popularity, seed=seed,
                        none_fraction=none_fraction)
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(seed + 1))
    check_against_reference(x, slots, weights, seed=seed + 2)


def test_every_expert_choice_matters():
    """k = E (dense routing) and k = 1 both match, and top_k changes the result (the gate is
    really applied)."""
    d_in, num_tokens = 24, 50
    x = torch.randn(num_tokens, d_in, generator=torch.Generator().manual_seed(3))
    slots = token_slots(num_tokens, 4, "uniform", seed=3)
    outs = []
    for top_k in (1, 4):
        weights = random_weights([[SliceSpec(20, 4, top_k, 2, 3)]] * 4, d_in, seed=5)
        check_against_reference(x, slots, weights)
        y = torch.zeros(num_tokens, 20)
        add_routed_lora(y, x, slots, weights)
        outs.append(y)
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


# ---- Punica-style grid ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("popularity", POPULARITIES)
@pytest.mark.parametrize("hidden", [64, 576, 1536])
@pytest.mark.parametrize("rank", [8, 16, 64])
def test_grid(rank, hidden, popularity):
    """E = 8 experts of rank/8 rows each, top-2, plus a static term of the same rank, on 8
    slots; two output slices (d_out != d_in); batch sizes from decode to prefill."""
    spec = [SliceSpec(hidden, 8, 2, rank // 8, rank), SliceSpec(hidden // 3, 8, 2, rank // 8, 0)]
    weights = random_weights([spec] * 8, hidden, seed=rank + hidden)
    for batch in (1, 7, 64, 256):
        slots = token_slots(batch, 8, popularity, seed=batch, none_fraction=0.1)
        x = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(batch))
        check_against_reference(x, slots, weights, rtol=1e-5, atol=1e-5)


def test_smollm_shapes_distinct_decode():
    """The benchmark's shapes: fused q/k/v (576 -> 576 + 192 + 192), 16 adapters, r = 8, E = 8,
    k = 2, token t on slot t % 16."""
    spec = [SliceSpec(n, 8, 2, 1, 8) for n in (576, 192, 192)]
    weights = random_weights([spec] * 16, 576, seed=11)
    slots = token_slots(32, 16, "distinct")
    x = torch.randn(32, 576, generator=torch.Generator().manual_seed(12))
    check_against_reference(x, slots, weights)


def test_thread_count_does_not_change_the_result():
    spec = [SliceSpec(96, 8, 2, 1, 8), SliceSpec(40, 0, 0, 0, 8)]
    weights = random_weights([spec] * 6, 160, seed=21)
    slots = token_slots(300, 6, "zipf", seed=21, none_fraction=0.1)
    x = torch.randn(300, 160, generator=torch.Generator().manual_seed(22))
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = torch.zeros(300, 136)
            add_routed_lora(y, x, slots, weights)
            results.append(y)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    assert results[0].abs().sum() > 0


# ---- bfloat16 -------------------------------------------------------------------------------


@pytest.mark.parametrize(("act_dtype", "weight_dtype"), [
    (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32),
])
def test_bfloat16(act_dtype, weight_dtype):
    spec = [SliceSpec(64, 8, 2, 1, 8), SliceSpec(32, 4, 4, 2, 0), SliceSpec(16, 0, 0, 0, 4)]
    weights = random_weights([spec] * 5, 96, dtype=weight_dtype, seed=31)
    slots = token_slots(200, 5, "uniform", seed=31, none_fraction=0.1)
    x = torch.randn(200, 96, generator=torch.Generator().manual_seed(32)).to(act_dtype)
    if act_dtype == torch.bfloat16:
        # Both round the fp32 delta to bfloat16 and add in bfloat16: at most an ulp or two.
        check_against_reference(x, slots, weights, rtol=2e-2, atol=2e-2)
    else:
        check_against_reference(x, slots, weights, rtol=1e-5, atol=1e-5)


# ---- no-ops ---------------------------------------------------------------------------------


def small_problem(num_tokens: int = 6):
    spec = [SliceSpec(12, 4, 2, 1, 2), SliceSpec(5, 0, 0, 0, 3)]
    weights = random_weights([spec] * 3, 10, seed=41)
    x = torch.randn(num_tokens, 10, generator=torch.Generator().manual_seed(42))
    y = torch.randn(num_tokens, 17, generator=torch.Generator().manual_seed(43))
    slots = torch.arange(num_tokens, dtype=torch.int32) % 3
    return y, x, slots, weights


def test_no_tokens_is_a_no_op():
    y, x, slots, weights = small_problem(0)
    add_routed_lora(y, x, slots, weights)
    assert y.shape == (0, 17)
    # The kernel itself, below the Python wrapper's early return.
    from goat_runtime import _C

    _C.add_routed_lora(y, x, slots, weights.shrink, weights.router, weights.expand,
                       weights.slice_meta, list(weights.out_offsets))
    assert y.shape == (0, 17)


def test_tokens_without_adapter_are_a_no_op():
    y, x, _, weights = small_problem()
    before = y.clone()
    add_routed_lora(y, x, torch.full((6,), -1, dtype=torch.int32), weights)
    assert torch.equal(y, before)
    # ... while with adapters the same call changes y.
    add_routed_lora(y, x, torch.zeros(6, dtype=torch.int32), weights)
    assert not torch.equal(y, before)


# ---- invalid inputs -------------------------------------------------------------------------


def call_kernel(y, x, slots, weights, **changes):
    """The public op, with some of the stacked weights' fields replaced."""
    fields = {"shrink": weights.shrink, "router": weights.router, "expand": weights.expand,
              "slice_meta": weights.slice_meta, "out_offsets": weights.out_offsets}
    fields.update(changes)
    add_routed_lora(y, x, slots, RoutedLoRAWeights(**fields))


@pytest.mark.parametrize(("case", "message"), [
    ("x_float64", "same dtype"),
    ("y_x_float64", "float32 or bfloat16"),
    ("slots_int64", "token_slots must be int32"),
    ("meta_int64", "slice_meta must be int32"),
    ("weights_dtype_mismatch", "same dtype"),
    ("router_bfloat16", "router must be float32"),
    ("router_shape", "router must be"),
    ("slot_too_large", "outside"),
    ("slot_below_minus_one", "outside"),
    ("d_in_mismatch", "d_in mismatch"),
    ("d_out_mismatch", "d_out mismatch"),
    ("token_count_mismatch", "number of tokens"),
    ("y_not_contiguous", "contiguous"),
    ("top_k_too_large", "top_k"),
    ("top_k_zero", "top_k"),
    ("too_many_experts", "experts"),
    ("bad_offsets", "out_offsets"),
    ("meta_shape", "slice_meta"),
])
def test_invalid_inputs_raise(case, message):
    y, x, slots, weights = small_problem()
    y, x, slots, changes = invalid_arguments(case, y, x, slots, weights)
    before = y.clone()
    with pytest.raises((RuntimeError, ValueError), match=message):
        call_kernel(y, x, slots, weights, **changes)
    assert torch.equal(y, before)  # validation happens before anything is written


def invalid_arguments(case, y, x, slots, weights):
    """The op's arguments made invalid as `case` says: (y, x, token_slots, the weights' fields
    to replace)."""
    meta = weights.slice_meta.clone()

    def meta_with(index, value):
        meta[index] = value
        return {"slice_meta": meta}

    cases = {
        "x_float64": lambda: (y, x.double(), slots, {}),
        "y_x_float64": lambda: (y.double(), x.double(), slots, {}),
        "slots_int64": lambda: (y, x, slots.long(), {}),
        "meta_int64": lambda: (y, x, slots, {"slice_meta": meta.long()}),
        "weights_dtype_mismatch": lambda: (y, x, slots, {"expand": weights.expand.bfloat16()}),
        "router_bfloat16": lambda: (y, x, slots, {"router": weights.router.bfloat16()}),
        "router_shape": lambda: (
            y, x, slots, {"router": weights.router[:, :, :, :9].contiguous()}),
        "slot_too_large": lambda: (
            y, x, torch.tensor([0, 1, 2, 3, 0, 1], dtype=torch.int32), {}),
        "slot_below_minus_one": lambda: (
            y, x, torch.tensor([0, -2, 2, 1, 0, 1], dtype=torch.int32), {}),
        "d_in_mismatch": lambda: (y, x[:, :9].contiguous(), slots, {}),
        "d_out_mismatch": lambda: (y[:, :16].contiguous(), x, slots, {}),
        "token_count_mismatch": lambda: (y, x, slots[:5], {}),
        "y_not_contiguous": lambda: (torch.zeros(6, 34)[:, ::2], x, slots, {}),
        "top_k_too_large": lambda: (y, x, slots, meta_with((1, 0, 1), 5)),
        "top_k_zero": lambda: (y, x, slots, meta_with((2, 0, 1), 0)),
        # the router has room for 4 rows
        "too_many_experts": lambda: (y, x, slots, meta_with((0, 1, 0), 5)),
        "bad_offsets": lambda: (y, x, slots, {"out_offsets": (0, 12, 16)}),
        "meta_shape": lambda: (y, x, slots, {"slice_meta": meta[:, :, :2].contiguous()}),
    }
    return cases[case]()


@pytest.mark.parametrize("popularity", ["distinct", "zipf", "identical"])
def test_expert_counts_match_reference(popularity):
    """Counting what the routers choose: per slot and expert, over slices, as the reference."""
    spec = [SliceSpec(40, 8, 2, 1, 4), SliceSpec(24, 4, 3, 2, 0), SliceSpec(16, 0, 0, 0, 4)]
    weights = random_weights([spec] * 6, 48, seed=21)
    slots = token_slots(300, 6, popularity, seed=4, none_fraction=0.2)
    x = torch.randn(300, 48, generator=torch.Generator().manual_seed(5))
    counts = torch.zeros(6, 8, dtype=torch.int64)
    expected = torch.zeros(6, 8, dtype=torch.int64)
    add_routed_lora(torch.zeros(300, 80), x, slots, weights, counts)
    add_routed_lora_reference(torch.zeros(300, 80), x, slots, weights, expected)
    assert torch.equal(counts, expected)
    tokens_per_slot = torch.bincount(slots[slots >= 0].long(), minlength=6)
    assert torch.equal(counts.sum(1), tokens_per_slot * (2 + 3))  # top_k of the routed slices
