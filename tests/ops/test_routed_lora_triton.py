"""The Triton routed low-rank kernel against the PyTorch reference: compiled on CUDA where there
is a device, else on the CPU through Triton's interpreter (tests/conftest.py and
tests/devices.py), plus a compile of the same kernel for CUDA targets with the bundled ptxas
(no GPU needed)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from goat_runtime.ops import RoutedLoRAWeights  # noqa: E402
from goat_runtime.ops.reference import add_routed_lora_reference  # noqa: E402
from goat_runtime.ops.triton_kernel import add_routed_lora_triton  # noqa: E402
from tests.devices import TRITON_DEVICE as DEVICE  # noqa: E402
from tests.ops.random_weights import (  # noqa: E402
    POPULARITIES,
    SliceSpec,
    fill_padding,
    random_weights,
    token_slots,
)

D_IN = 40
SLICE_OUTS = (24, 8, 16)  # q/k/v-like slices of different widths; d_out != d_in
TOLERANCES = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
              # bf16: the kernel rounds y + delta once, the reference rounds delta then the sum.
              torch.bfloat16: {"rtol": 1.6e-2, "atol": 1.6e-2}}


def _slice(d_out: int, num_experts: int, top_k: int, expert_rank: int,
           static_rank: int) -> SliceSpec:
    """A slice spec; a plain LoRA (E = 0) has only gate-1 rows, given as static rows (rank 4
    when the case has no static term)."""
    if num_experts == 0:
        return SliceSpec(d_out, 0, 0, 0, static_rank or 4)
    return SliceSpec(d_out, num_experts, top_k, expert_rank, static_rank)


def _run(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, weights: RoutedLoRAWeights,
         **blocks: int) -> torch.Tensor:
    """The kernel on DEVICE; returns the updated copy of y, on the CPU."""
    y = y.to(DEVICE, copy=True)
    add_routed_lora_triton(y, x.to(DEVICE), slots.to(DEVICE), weights.to(DEVICE), **blocks)
    return y.cpu()


def _check(weights: RoutedLoRAWeights, slots: torch.Tensor, dtype: torch.dtype, *,
           seed: int = 0, **blocks: int) -> None:
    """Kernel and reference on the same random x, y agree; slot -1 rows stay bit-exact."""
    gen = torch.Generator().manual_seed(seed)
    num_tokens, d_in = slots.shape[0], weights.shrink.shape[-1]
    x = torch.randn(num_tokens, d_in, generator=gen).to(dtype)
    y0 = torch.randn(num_tokens, weights.out_offsets[-1], generator=gen).to(dtype)
    expected = y0.clone()
    add_routed_lora_reference(expected, x, slots, weights)
    y = _run(y0, x, slots, weights, **blocks)
    torch.testing.assert_close(y.float(), expected.float(), **TOLERANCES[dtype])
    untouched = slots < 0
    assert torch.equal(y[untouched], y0[untouched])
    if (~untouched).any():  # the adapters did add something
        assert not torch.equal(y[~untouched], y0[~untouched])


def test_padding_rows_are_never_loaded():
    """NaN in every slot's padding rows (past its slice_meta rows, up to R = 11) changes
    nothing: the kernel masks its loads to the rows a slot uses (see the CPU kernel's test)."""
    specs = [[SliceSpec(24, 0, 0, 0, 2), SliceSpec(8, 4, 2, 2, 3)],
             [SliceSpec(24, 4, 1, 2, 0), SliceSpec(8, 0, 0, 0, 5)],
             [SliceSpec(24, 4, 2, 2, 3), SliceSpec(8, 2, 1, 4, 3)]]
    weights = random_weights(specs, D_IN, seed=3)
    slots = token_slots(12, len(specs), "uniform", seed=4)
    x = torch.randn(12, D_IN, generator=torch.Generator().manual_seed(5))
    y0 = torch.zeros(12, 32)
    y = _run(y0, x, slots, weights)
    y_poisoned = _run(y0, x, slots, fill_padding(weights, float("nan")))
    assert y.abs().sum() > 0 and torch.equal(y_poisoned, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_slices", [1, 3])
@pytest.mark.parametrize("static_rank", [0, 4])
@pytest.mark.parametrize("experts", [(0, 0), (1, 1), (4, 2), (4, 4)],
                         ids=["lora", "E1k1", "E4k2", "E4k4"])
@pytest.mark.slow
def test_matches_reference(experts, static_rank, num_slices, dtype):
    num_experts, top_k = experts
    case = (4 * num_experts + top_k) + static_rank + num_slices  # varies the cheap knobs
    expert_rank = 1 + case % 2
    specs = [_slice(d_out, num_experts, top_k, expert_rank, static_rank)
             for d_out in SLICE_OUTS[:num_slices]]
    num_slots = 4
    weights = random_weights([specs] * num_slots, D_IN, dtype=dtype, seed=case)
    for i, num_tokens in enumerate((1, 7, 33)):
        popularity = POPULARITIES[(case + i) % len(POPULARITIES)]
        slots = token_slots(num_tokens, num_slots, popularity, seed=case + i,
                            none_fraction=0.3)
        _check(weights, slots, dtype, seed=case + i)


# Slots holding different adapters: GOAT adapters of several shapes and a plain LoRA, so the
# stack pads value rows (R = 8) and router rows (E_max = 4) differently for each slot.
MIXED_SLOTS = [
    [SliceSpec(24, 4, 2, 2), SliceSpec(8, 4, 2, 2), SliceSpec(16, 4, 2, 2)],
    [SliceSpec(24, 0, 0, 0, 8), SliceSpec(8, 0, 0, 0, 8), SliceSpec(16, 0, 0, 0, 8)],
    [SliceSpec(24, 2, 1, 1, 4), SliceSpec(8, 3, 2, 1), SliceSpec(16, 1, 1, 2, 4)],
    [SliceSpec(24, 4, 4, 1, 4), SliceSpec(8, 0, 0, 0, 2), SliceSpec(16, 4, 1, 2)],
]


@pytest.mark.slow
@pytest.mark.parametrize("num_tokens", [1, 7, 33])
@pytest.mark.parametrize("popularity", POPULARITIES)
def test_mixed_slots_and_popularities(popularity, num_tokens):
    weights = random_weights(MIXED_SLOTS, D_IN, seed=7)
    slots = token_slots(num_tokens, len(MIXED_SLOTS), popularity, seed=num_tokens,
                        none_fraction=0.3)
    _check(weights, slots, torch.float32, seed=num_tokens)


def test_many_value_rows():
    """R = 2 * 64 + 9 = 137 value rows (BLOCK_R = 256), tiled over d_in and d_out."""
    specs = [[SliceSpec(24, 2, 1, 64, 9), SliceSpec(16, 0, 0, 0, 3)]] * 2
    weights = random_weights(specs, D_IN, seed=5)
    slots = torch.tensor([1, -1, 0], dtype=torch.int32)
    _check(weights, slots, torch.float32, seed=5, block_k=16, block_n=16)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_several_tiles_with_partial_edges(dtype):
    """d_in = 40 in 16-wide tiles (3, the last partial), slice widths 24/8/16 in 16-wide tiles."""
    weights = random_weights(MIXED_SLOTS, D_IN, dtype=dtype, seed=3)
    slots = token_slots(9, len(MIXED_SLOTS), "uniform", seed=3, none_fraction=0.3)
    _check(weights, slots, dtype, seed=3, block_k=16, block_n=16)


def test_top_k_ties_are_broken_as_torch_topk():
    """Experts 0 and 3 have identical router rows (bit-equal logits, the largest): top-1 keeps
    the one torch.topk keeps on the CPU (expert 3: not the lower index), with weight 1; the
    static row keeps gate 1. (Ties in general: tests/ops/test_router_ties.py.)"""
    d_in, d_out = 16, 8
    gen = torch.Generator().manual_seed(0)
    weights = random_weights([[SliceSpec(d_out, 4, 1, 1, 1)]], d_in, seed=0)
    x = torch.randn(1, d_in, generator=gen)
    router = weights.router[0, 0]
    router[0] = x[0] / x[0].norm()
    router[3] = router[0]
    router[1] = router[2] = -router[0]
    logits = router @ x[0]
    assert logits[0] == logits[3] and logits[0] > logits[1]  # the tie is real
    assert torch.topk(torch.softmax(logits, -1), 1).indices.tolist() == [3]
    gate = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0])
    expected = (gate * (weights.shrink[0, 0] @ x[0])) @ weights.expand[0]
    y = _run(torch.zeros(1, d_out), x, torch.zeros(1, dtype=torch.int32), weights)
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-5)


def test_tokens_without_adapter_or_out_of_range_slot_are_untouched():
    weights = random_weights(MIXED_SLOTS, D_IN, seed=1)
    x, y0 = torch.randn(5, D_IN), torch.randn(5, 48)
    slots = torch.tensor([-1, -1, 4, 100, -1], dtype=torch.int32)  # 4 slots: 4, 100 invalid
    assert torch.equal(_run(y0, x, slots, weights), y0)


def _inputs(dtype=torch.float32):
    weights = random_weights([[SliceSpec(24, 4, 2, 1), SliceSpec(8, 4, 2, 1)]] * 2, 16,
                             dtype=dtype)
    x = torch.randn(3, 16, dtype=dtype)
    y = torch.zeros(3, 32, dtype=dtype)
    slots = torch.tensor([0, -1, 1], dtype=torch.int32)
    return y, x, slots, weights


def _replace(weights: RoutedLoRAWeights, **changes) -> RoutedLoRAWeights:
    fields = {"shrink": weights.shrink, "router": weights.router, "expand": weights.expand,
              "slice_meta": weights.slice_meta, "out_offsets": weights.out_offsets}
    return RoutedLoRAWeights(**{**fields, **changes})


INVALID = {
    "x 1-D": (lambda y, x, s, w: (y, x[0], s, w), "2-D"),
    "fp16": (lambda y, x, s, w: (y.half(), x.half(), s, w), "dtype"),
    "x/y dtypes": (lambda y, x, s, w: (y.bfloat16(), x, s, w), "dtype"),
    "token count": (lambda y, x, s, w: (y[:2], x, s, w), "token count"),
    "slots int64": (lambda y, x, s, w: (y, x, s.long(), w), "int32"),
    "slots length": (lambda y, x, s, w: (y, x, s[:2], w), "token_slots"),
    "weights dtype": (lambda y, x, s, w: (y, x, s, _replace(w, shrink=w.shrink.bfloat16())),
                      "dtype"),
    "d_in": (lambda y, x, s, w: (y, x[:, :8], s, w), "d_in"),
    "d_out": (lambda y, x, s, w: (y[:, :30], x, s, w), "expand"),
    "meta dtype": (lambda y, x, s, w: (y, x, s, _replace(w, slice_meta=w.slice_meta.long())),
                   "slice_meta"),
    "offsets": (lambda y, x, s, w: (y, x, s, _replace(w, out_offsets=(0, 40, 32))),
                "out_offsets"),
    "offsets count": (lambda y, x, s, w: (y, x, s, _replace(w, out_offsets=(0, 32))),
                      "out_offsets"),
    "shrink rank": (lambda y, x, s, w: (y, x, s, _replace(w, shrink=w.shrink[0])), "shrink"),
    "router dtype": (lambda y, x, s, w: (y, x, s, _replace(w, router=w.router.bfloat16())),
                     "router must be float32"),
    "router shape": (lambda y, x, s, w: (y, x, s, _replace(w, router=w.router[:, :, :, :8])),
                     "router must be"),
    "devices": (lambda y, x, s, w: (y, x, s.to("meta"), w), "device"),
}


@pytest.mark.slow
def test_expert_counts_match_reference():
    spec = [_slice(40, 8, 2, 1, 4), _slice(24, 4, 3, 2, 0)]
    weights = random_weights([spec] * 4, 48, seed=21)
    slots = token_slots(60, 4, "zipf", seed=4, none_fraction=0.2)
    x = torch.randn(60, 48, generator=torch.Generator().manual_seed(5))
    counts = torch.zeros(4, 8, dtype=torch.int64, device=DEVICE)
    expected = torch.zeros(4, 8, dtype=torch.int64)
    add_routed_lora_triton(torch.zeros(60, 64, device=DEVICE), x.to(DEVICE), slots.to(DEVICE),
                           weights.to(DEVICE), expert_counts=counts)
    add_routed_lora_reference(torch.zeros(60, 64), x, slots, weights, expected)
    assert torch.equal(counts.cpu(), expected) and counts.sum() > 0


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_inputs_raise_value_error(name):
    y, x, slots, weights = _inputs()
    y0 = y.clone()
    mutate, message = INVALID[name]
    with pytest.raises(ValueError, match=message):
        add_routed_lora_triton(*mutate(y, x, slots, weights))
    assert torch.equal(y, y0)


@pytest.mark.parametrize("block", [0, 24])
def test_block_sizes_must_be_powers_of_two(block):
    y, x, slots, weights = _inputs()
    with pytest.raises(ValueError, match="power of two"):
        add_routed_lora_triton(y, x, slots, weights, block_k=block)


# Compiles the kernel (not interpreted) for CUDA targets; prints one line per target.
COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from goat_runtime.ops.triton_kernel import _routed_lora_kernel as kernel
from goat_runtime.ops.triton_kernel import _topk_kept_kernel as topk_kernel

for dtype in ("fp32", "bf16"):
    floats = {"y_ptr", "x_ptr", "shrink_ptr", "expand_ptr"}
    signature = {name: (f"*{dtype}" if name in floats else "*fp32" if name == "router_ptr"
                        else "*i32" if name.endswith("_ptr")
                        else "constexpr" if name.startswith("BLOCK") else "i32")
                 for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={"BLOCK_R": 16, "BLOCK_E": 8, "BLOCK_K": 64,
                                   "BLOCK_N": 128})
    for arch in (80, 90):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32))
        ok = bool(compiled.asm["cubin"]) and f".target sm_{arch}" in compiled.asm["ptx"]
        print(dtype, arch, "ok" if ok else "bad")

signature = {name: ("*fp32" if name == "probs_ptr" else "*i32" if name == "meta_ptr"
                    else "*i8" if name == "kept_ptr" else "constexpr" if name == "BLOCK_E"
                    else "i32") for name in topk_kernel.arg_names}
source = ASTSource(fn=topk_kernel, signature=signature, constexprs={"BLOCK_E": 8})
compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
print("topk", 90, "ok" if compiled.asm["cubin"] else "bad")
"""


@pytest.mark.slow
def test_kernel_compiles_for_cuda(tmp_path):
    """The kernel the interpreter runs also compiles to cubins for sm_80 and sm_90 (fp32 and
    bf16), and the batched tie-rule kernel for sm_90, with triton's bundled ptxas: no GPU
    needed. In a subprocess, since the interpreter
    patches triton.language in this one."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:5] == [f"{d} {a} ok" for d in ("fp32", "bf16")
                                              for a in (80, 90)] + ["topk 90 ok"]
