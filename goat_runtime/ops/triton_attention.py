"""Paged decode attention on the GPU: one Triton kernel reading the paged KV cache in place.

Semantics: out[s, h] = softmax(scale * q[s, h] K_s^T) V_s over the keys and values of sequence
s's context (its last `sliding_window` when set), with kv head g = h // (H / KVH).

One program per (sequence, kv head), after the CPU kernel (ops/cpu/paged_attention.cpp): it walks
the sequence's context in tiles of BLOCK_N positions, looks each position's cache block up in the
block table, and loads the K and V rows where they lie (no gathered copy, unlike the torch path
`paged_decode_attention_torch`). The H / KVH query heads sharing the kv head (GQA) are a
[BLOCK_G, BLOCK_D] tile, so each K/V row is read once for all of them. Scores, an online softmax
(running max and sum, flash-decoding style) and the weighted values are in float32; the result
is rounded once to q's dtype. The heads' products are broadcast multiply-adds, not tl.dot: a
decode step has 1 to 8 query heads per kv head, below tl.dot's 16-row minimum, and float32 inputs
would otherwise go through TF32.

Not yet measured on a GPU (docs/gpu.md): a single pass per (sequence, kv head) leaves SMs idle
for few sequences with long contexts, where a split over the context (flash-decoding's second
pass) would help.

This module imports triton at import time: only the CUDA path of `paged_decode_attention` (and
the tests, under TRITON_INTERPRET=1 on the CPU) import it.
"""

import torch

from goat_runtime.ops.triton_import import tl, triton

_DTYPES = (torch.float32, torch.bfloat16)
# Elements of the [BLOCK_G, BLOCK_N, BLOCK_D] products a program holds at once (registers).
_TILE_ELEMENTS = 8192


@triton.jit
def _paged_decode_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr,
    num_blocks, block_size, table_width, head_dim, group, scale, window,
    stride_qs, stride_qh, stride_qd,
    stride_os, stride_oh, stride_od,
    stride_kb, stride_kp, stride_kh, stride_kd,
    stride_vb, stride_vp, stride_vh, stride_vd,
    stride_ts,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    context = tl.load(lens_ptr + s).to(tl.int32)
    # Positions past the block table are never read (a context longer than the table is the
    # caller's bug: it gives a wrong result, not an out-of-bounds read).
    context = tl.minimum(context, table_width * block_size)
    first = tl.where(window > 0, tl.maximum(context - window, 0), 0)

    heads = g * group + tl.arange(0, BLOCK_G)
    head_mask = tl.arange(0, BLOCK_G) < group
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    q = tl.load(q_ptr + s * stride_qs + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32) * scale

    peak = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    offsets = tl.arange(0, BLOCK_N)
    for start in range(first, context, BLOCK_N):
        pos = start + offsets
        valid = pos < context
        block = tl.load(tables_ptr + s * stride_ts + pos // block_size, mask=valid, other=0)
        # Clamped: a bad block id reads a wrong row, never outside the cache.
        block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)
        offset = (pos % block_size).to(tl.int64)
        row_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + block[:, None] * stride_kb + offset[:, None] * stride_kp
                    + g * stride_kh + dims[None, :] * stride_kd,
                    mask=row_mask, other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [BLOCK_G, BLOCK_N]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        # Every tile holds at least one valid position, so new_peak is finite.
        new_peak = tl.maximum(peak, tl.max(scores, axis=1))
        rescale = tl.exp(peak - new_peak)
        p = tl.exp(scores - new_peak[:, None])
        total = total * rescale + tl.sum(p, axis=1)
        v = tl.load(v_ptr + block[:, None] * stride_vb + offset[:, None] * stride_vp
                    + g * stride_vh + dims[None, :] * stride_vd,
                    mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * rescale[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        peak = new_peak

    out = acc / tl.maximum(total, 1e-30)[:, None]  # an empty context gives 0, not NaN
    tl.store(out_ptr + s * stride_os + heads[:, None] * stride_oh + dims[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])


def _validate(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              block_tables: torch.Tensor, context_lens: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"q must be [S, H, head_dim] and k_cache, v_cache one shape "
                         f"[num_blocks, block_size, KVH, head_dim]; got q {tuple(q.shape)}, "
                         f"k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share one dtype in {_DTYPES}; got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"the cache's head_dim {k_cache.shape[3]} is not q's {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"q's {num_heads} heads are not a multiple of the cache's "
                         f"{num_kv_heads} kv heads")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise ValueError(f"block_tables must be int32 [S, max_blocks]; got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if block_tables.shape[0] != num_seqs or tuple(context_lens.shape) != (num_seqs,):
        raise ValueError(f"block_tables and context_lens need one row per sequence ({num_seqs}); "
                         f"got {tuple(block_tables.shape)}, {tuple(context_lens.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables' rows must be contiguous")
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_tables": block_tables,
               "context_lens": context_lens}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device; got {devices}")


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor,
                                  v_cache: torch.Tensor, block_tables: torch.Tensor,
                                  context_lens: torch.Tensor, scale: float,
                                  sliding_window: int | None = None, *,
                                  block_n: int | None = None) -> torch.Tensor:
    """Semantics: out[s, h] = softmax(scale * q[s, h] K_s^T) V_s over sequence s's cached
    context (its last `sliding_window` positions when set), kv head h // (H / KVH).

    Args:
      q: [S, H, head_dim] float32 or bfloat16, the one query token of each sequence.
      k_cache, v_cache: [num_blocks, block_size, KVH, head_dim], q's dtype; H % KVH == 0.
      block_tables: [S, max_blocks] int32, rows contiguous: each sequence's cache blocks in
        order (entries past the context are not read).
      context_lens: [S] int32 or int64, 1 <= context_lens[s] <= max_blocks * block_size.
      scale: the softmax scale, usually head_dim ** -0.5.
      sliding_window: attend only to the last this many positions; None: the whole context.
      block_n: optional context tile (a power of two); by default chosen from the shapes.
    Returns [S, H, head_dim] in q's dtype.
    Block ids and context lengths are not checked on the host (that would synchronise the
    device): the kernel clamps them to the cache and to the table, so bad values give wrong
    numbers, never out-of-bounds reads; an empty context gives zeros. Raises ValueError on
    mismatched shapes, dtypes or devices.
    """
    _validate(q, k_cache, v_cache, block_tables, context_lens)
    if block_n is not None and (block_n < 1 or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two; got {block_n}")
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_d = triton.next_power_of_2(head_dim)
    # Powers of two throughout, so the quotient is one too (or 0, lifted to 8).
    block_n = block_n or max(8, min(64, _TILE_ELEMENTS // (block_g * block_d)))
    _paged_decode_kernel[(num_seqs, num_kv_heads)](
        out, q, k_cache, v_cache, block_tables, context_lens,
        num_blocks, block_size, block_tables.shape[1], head_dim, group, float(scale),
        sliding_window or 0,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0),
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    return out
