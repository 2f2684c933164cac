"""Decode attention over the paged KV cache: one query token per sequence.

The CPU path is a C++ kernel (goat_runtime._C) and the CUDA path a Triton kernel
(goat_runtime.ops.triton_attention), each reading a sequence's keys and values where its block
table says; other devices gather the contexts into a padded batch for torch's
scaled-dot-product attention (`paged_decode_attention_torch`, also the kernels' test reference).
"""

import torch
import torch.nn.functional as F


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           max_context_len: int, scale: float,
                           sliding_window: int | None = None) -> torch.Tensor:
    """Semantics: out[s, h] = softmax(scale * q[s, h] K_s^T) V_s over the keys and values of
    sequence s's context (its last `sliding_window` when set), with kv head h // (H / KVH).

    Args:
      q: [S, H, head_dim] float32 or bfloat16, the one query token of each sequence.
      k_cache, v_cache: [num_blocks, block_size, KVH, head_dim], q's dtype; H % KVH == 0.
      block_tables: [S, max_blocks] int32: the cache blocks of each sequence's context, in
        order (entries past the context are not read).
      context_lens: [S] int64, 1 <= context_lens[s] <= max_blocks * block_size: the number of
        cached tokens of sequence s, its query token's own K/V included (written already).
      max_context_len: max(context_lens), known to the caller without a device sync.
      scale: the softmax scale, usually head_dim ** -0.5.
      sliding_window: attend only to the last this many positions; None: the whole context.
    Returns [S, H, head_dim] in q's dtype.
    """
    if q.is_cpu:
        from goat_runtime._C import paged_decode_attention as paged_decode_attention_cpu

        return paged_decode_attention_cpu(q.contiguous(), k_cache, v_cache, block_tables,
                                          context_lens, scale, sliding_window or 0)
    if q.is_cuda:
        from goat_runtime.ops.triton_attention import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens,
                                             scale, sliding_window)
    return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, context_lens,
                                        max_context_len, scale, sliding_window)


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 max_context_len: int, scale: float,
                                 sliding_window: int | None = None) -> torch.Tensor:
    """`paged_decode_attention` with torch ops: gather every context into a padded
    [S, KVH, L, head_dim] batch, then one masked SDPA (same arguments and result)."""
    num_seqs, _, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    length = max_context_len
    blocks = block_tables[:, : -(-length // block_size)].long()
    offsets = torch.arange(block_size, device=q.device)
    slots = (blocks[:, :, None] * block_size + offsets).flatten(1)[:, :length].flatten()
    shape = (num_seqs, length, num_kv_heads, head_dim)
    # index_select, not cache[slots]: several times faster on the CPU.
    keys = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots).view(shape)
    values = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, slots).view(shape)
    positions = torch.arange(length, device=q.device)[None, :]
    valid = positions < context_lens[:, None]
    if sliding_window is not None:
        valid &= positions >= context_lens[:, None] - sliding_window
    return F.scaled_dot_product_attention(
        q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True)[:, :, 0]
