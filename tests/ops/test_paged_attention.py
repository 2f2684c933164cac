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
