"""Paged decode attention: the CPU kernel (goat_runtime._C) and the torch path the GPU runs,
both against a float64 reference that walks each sequence's block table position by position."""

import math
import random

import pytest
import torch

from goat_runtime.ops import paged_decode_attention
from goat_runtime.ops.paged_attention import paged_decode_attention_torch

# (num_heads, num_kv_heads, head_dim): SmolLM2-135M, no GQA, head_dim not a multiple of the
# vector width of every machine, one KV head, a long head.
HEAD_SHAPES = [(9, 3, 64), (4, 4, 32), (8, 2, 80), (2, 1, 128), (3, 1, 13)]
# Context lengths of a batch: all one token, uniform, one long among short ones, identical.
LENGTHS = {
    "single": lambda rng, n: [1] * n,
    "uniform": lambda rng, n: [rng.randint(1, 70) for _ in range(n)],
    "skewed": lambda rng, n: [rng.randint(1, 5) for _ in range(n - 1)] + [150],
    "identical": lambda rng, n: [33] * n,
}


def random_problem(num_seqs: int, heads: tuple[int, int, int], lengths: list[int],
                   block_size: int, dtype: torch.dtype, seed: int):
    """q, caches and scattered block tables: blocks handed out in random order, tables padded
    with a block id the kernel must never read past the context."""
    num_heads, num_kv_heads, head_dim = heads
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // block_size) for n in lengths]
    num_blocks = sum(blocks_needed) + 2
    order = list(range(num_blocks))
    rng.shuffle(order)
    width = max(blocks_needed) + 1
    tables = []
    for need in blocks_needed:
        table, order = order[:need], order[need:]
        tables.append(table + [0] * (width - need))
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(dtype)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    return (q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32),
            torch.tensor(lengths, dtype=torch.int64))


def reference(q, k_cache, v_cache, block_tables, context_lens, scale, sliding_window=None):
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for s in range(num_seqs):
        length = int(context_lens[s])
        first = 0 if sliding_window is None else max(0, length - sliding_window)
        rows = [int(block_tables[s, j // block_size]) * block_size + j % block_size
                for j in range(first, length)]
        keys = k_cache.reshape(-1, num_kv_heads, head_dim)[rows].double()
        values = v_cache.reshape(-1, num_kv_heads, head_dim)[rows].double()
        for h in range(num_heads):
            scores = keys[:, h // group] @ q[s, h].double() * scale
            out[s, h] = torch.softmax(scores, 0) @ values[:, h // group]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("heads", HEAD_SHAPES, ids=str)
@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("block_size", [1, 16])
@pytest.mark.parametrize("num_seqs", [1, 7, 40])
def test_kernel_and_torch_path_match_reference(heads, lengths, block_size, num_seqs):
    rng = random.Random(num_seqs * 31 + block_size)
    lens = LENGTHS[lengths](rng, num_seqs)
    args = random_problem(num_seqs, heads, lens, block_size, torch.float32, seed=num_seqs)
    scale = heads[2] ** -0.5
    expected = reference(*args, scale).float()
    kernel = paged_decode_attention(*args, max(lens), scale)
    torch.testing.assert_close(kernel, expected, rtol=1e-5, atol=1e-5)
    torch_path = paged_decode_attention_torch(*args, max(lens), scale)
    torch.testing.assert_close(torch_path, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [1, 4, 16, 1000])
def test_sliding_window(window):
    lens = [1, 3, 17, 40, 64]
    args = random_problem(len(lens), (4, 2, 32), lens, 4, torch.float32, seed=window)
    expected = reference(*args, 0.3, sliding_window=window).float()
    torch.testing.assert_close(paged_decode_attention(*args, max(lens), 0.3, window), expected,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(paged_decode_attention_torch(*args, max(lens), 0.3, window),
                               expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_is_float32_math_rounded_once():
    lens = [5, 50, 120]
    args = random_problem(len(lens), (9, 3, 64), lens, 16, torch.bfloat16, seed=3)
    expected = reference(*args, 0.125)
    out = paged_decode_attention(*args, max(lens), 0.125)
    assert out.dtype == torch.bfloat16
    # float32 math on bfloat16 inputs, rounded once at the end: within one bfloat16 ulp.
    torch.testing.assert_close(out.double(), expected, rtol=2 ** -7, atol=1e-3)


def test_many_threads_give_the_same_result_as_one():
    lens = [rng_len for rng_len in range(1, 200, 7)]
    args = random_problem(len(lens), (9, 3, 64), lens, 16, torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = paged_decode_attention(*args, max(lens), 0.125)
    finally:
        torch.set_num_threads(threads)
    # Each (sequence, kv head) is computed by one thread in one order: bit for bit equal.
    assert torch.equal(paged_decode_attention(*args, max(lens), 0.125), single)


def test_cache_rows_outside_the_context_are_never_read():
    lens = [3, 20]
    q, k_cache, v_cache, tables, context_lens = random_problem(2, (2, 1, 16), lens, 4,
                                                               torch.float32, seed=7)
    before = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 20, 0.25)
    used = {int(tables[s, j // 4]) * 4 + j % 4 for s, n in enumerate(lens) for j in range(n)}
    unused = [r for r in range(k_cache.shape[0] * 4) if r not in used]
    for cache in (k_cache, v_cache):
        cache.view(-1, 1, 16)[unused] = math.nan
    after = paged_decode_attention(q, k_cache, v_cache, tables, context_lens, 20, 0.25)
    assert torch.equal(before, after)


def test_bad_inputs_raise_clear_errors():
    lens = [3, 5]
    q, k_cache, v_cache, tables, context_lens = random_problem(2, (4, 2, 8), lens, 4,
                                                               torch.float32, seed=1)
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged_decode_attention(q, k_cache, v_cache, torch.full_like(tables, 99), context_lens,
                               5, 1.0)
    with pytest.raises(RuntimeError, match="context length 0"):
        paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([0, 5]), 5, 1.0)
    with pytest.raises(RuntimeError, match="block table width"):
        paged_decode_attention(q, k_cache, v_cache, tables, torch.tensor([3, 100]), 100, 1.0)
    with pytest.raises(RuntimeError, match="one dtype"):
        paged_decode_attention(q, k_cache.double(), v_cache, tables, context_lens, 5, 1.0)
    with pytest.raises(RuntimeError, match="not a multiple"):
        paged_decode_attention(q[:, :3].contiguous(), k_cache, v_cache, tables, context_lens,
                               5, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        paged_decode_attention(q, k_cache, v_cache, tables.long(), context_lens, 5, 1.0)
    with pytest.raises(RuntimeError, match="one row per sequence"):
        paged_decode_attention(q, k_cache, v_cache, tables[:1], context_lens, 5, 1.0)


# The Triton kernel (goat_runtime.ops.triton_attention): compiled on CUDA where there is a
# device, else under Triton's interpreter on the CPU (tests/devices.py), against the gather +
# SDPA path computed on the CPU in float32, and against the float64 reference in bfloat16.


def _triton(*args, **kwargs) -> torch.Tensor:
    """The Triton kernel on TRITON_DEVICE, its result back on the CPU."""
    pytest.importorskip("triton")
    from goat_runtime.ops.triton_attention import paged_decode_attention_triton
    from tests.devices import TRITON_DEVICE

    moved = [a.to(TRITON_DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    return paged_decode_attention_triton(*moved, **kwargs).cpu()


def _check_triton(heads, lens, block_size, dtype, seed, window=None, **kwargs):
    q, k_cache, v_cache, tables, context_lens = random_problem(len(lens), heads, lens,
                                                               block_size, dtype, seed=seed)
    scale = heads[2] ** -0.5
    out = _triton(q, k_cache, v_cache, tables, context_lens, scale, window, **kwargs)
    assert out.dtype == dtype
    if dtype == torch.float32:
        expected = paged_decode_attention_torch(q, k_cache, v_cache, tables, context_lens,
                                                max(lens), scale, window)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    else:  # float32 math rounded once: within one bfloat16 ulp of the exact result
        expected = reference(q, k_cache, v_cache, tables, context_lens, scale, window)
        torch.testing.assert_close(out.double(), expected, rtol=2 ** -7, atol=1e-3)


# Small enough for the interpreter: GQA 2 and 3 with a head_dim that is not a power of two,
# no GQA; contexts of 1, at, just past and across block boundaries (block_size 4), one long
# one spread over several context tiles (block_n 8).
SMALL_HEADS = [(4, 2, 16), (3, 1, 13), (2, 2, 8)]
SMALL_LENS = [1, 3, 4, 5, 12, 37]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", SMALL_HEADS, ids=str)
def test_triton_kernel_matches_gather_and_sdpa(heads, dtype):
    _check_triton(heads, SMALL_LENS, 4, dtype, seed=len(heads) + heads[2], block_n=8)


@pytest.mark.parametrize("window", [1, 5, 1000])
def test_triton_kernel_sliding_window(window):
    _check_triton((4, 2, 16), SMALL_LENS, 4, torch.float32, seed=window, window=window,
                  block_n=8)


def test_triton_kernel_never_reads_outside_the_context():
    lens = [3, 20]
    q, k_cache, v_cache, tables, context_lens = random_problem(2, (2, 1, 16), lens, 4,
                                                               torch.float32, seed=7)
    before = _triton(q, k_cache, v_cache, tables, context_lens, 0.25, block_n=8)
    used = {int(tables[s, j // 4]) * 4 + j % 4 for s, n in enumerate(lens) for j in range(n)}
    unused = [r for r in range(k_cache.shape[0] * 4) if r not in used]
    for cache in (k_cache, v_cache):
        cache.view(-1, 1, 16)[unused] = math.nan
    after = _triton(q, k_cache, v_cache, tables, context_lens, 0.25, block_n=8)
    assert torch.equal(before, after)


def test_triton_kernel_rejects_bad_inputs():
    pytest.importorskip("triton")
    from goat_runtime.ops.triton_attention import paged_decode_attention_triton

    q, k_cache, v_cache, tables, lens = random_problem(2, (4, 2, 8), [3, 5], 4, torch.float32,
                                                       seed=1)
    bad = {
        "one dtype": (q, k_cache.bfloat16(), v_cache, tables, lens),
        "not a multiple": (q[:, :3], k_cache, v_cache, tables, lens),
        "int32": (q, k_cache, v_cache, tables.long(), lens),
        "one row per sequence": (q, k_cache, v_cache, tables[:1], lens),
        "head_dim": (q[:, :, :4], k_cache, v_cache, tables, lens),
        "one device": (q, k_cache, v_cache, tables, lens.to("meta")),
    }
    for message, args in bad.items():
        with pytest.raises(ValueError, match=message):
            paged_decode_attention_triton(*args, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 1.0, block_n=12)


# On CUDA only: the shapes the engine serves (head dims 64 and 128, GQA 1, 3, 4 and 8), block
# size 16, contexts up to past 1000 across block and tile boundaries, with the kernel's own tiles.
CUDA_HEADS = [(9, 3, 64), (32, 8, 128), (8, 8, 64), (16, 2, 128), (12, 3, 128)]
CUDA_LENS = [1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1000, 1031]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", CUDA_HEADS, ids=str)
@pytest.mark.parametrize("window", [None, 100])
def test_triton_kernel_on_cuda(heads, dtype, window):
    _check_triton(heads, CUDA_LENS, 16, dtype, seed=heads[0], window=window)
    # Through the public op: paged_decode_attention dispatches CUDA tensors to the kernel.
    args = random_problem(4, heads, [5, 17, 300, 33], 16, dtype, seed=2)
    on_cuda = [a.cuda() for a in args]
    torch.testing.assert_close(paged_decode_attention(*on_cuda, 300, 0.1).cpu(),
                               _triton(*args, 0.1), rtol=0, atol=0)


@pytest.mark.slow
def test_triton_kernel_compiles_for_cuda(tmp_path):
    """The kernel the interpreter runs also compiles to cubins for sm_80 and sm_90, fp32 and
    bf16, with triton's bundled ptxas: no GPU needed."""
    pytest.importorskip("triton.backends.nvidia")
    from goat_runtime.ops.triton_attention import _paged_decode_kernel
    from tests.ops.cuda_compile import compile_for_cuda

    def signature(dtype: str) -> dict[str, str]:
        types = {"out_ptr": f"*{dtype}", "q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}",
                 "v_ptr": f"*{dtype}", "tables_ptr": "*i32", "lens_ptr": "*i64", "scale": "fp32"}
        return {name: types.get(name, "constexpr" if name.startswith("BLOCK") else "i32")
                for name in _paged_decode_kernel.arg_names}

    lines = compile_for_cuda("goat_runtime.ops.triton_attention", "_paged_decode_kernel",
                             {"fp32": signature("fp32"), "bf16": signature("bf16")},
                             {"BLOCK_G": 4, "BLOCK_N": 16, "BLOCK_D": 128}, (80, 90), tmp_path)
    assert lines == [f"{d} {a} ok" for d in ("fp32", "bf16") for a in (80, 90)]
