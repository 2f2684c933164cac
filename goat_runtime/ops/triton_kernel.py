"""The routed low-rank op on the GPU: one fused Triton kernel (shrink, top-k gate, expand).

Semantics: y[t, off_s:off_{s+1}] += X_a[:, off_s:off_{s+1}]^T (gate(h) * h[:R]) with
h = S[a, s] x[t], a = token_slots[t], for every slice s; tokens with slot -1 are untouched.

One program per (token, slice), BGMV style: the program loads its token's slot and the slice's
(E, top_k, expert_rank) and computes, in fp32 and tiled over d_in, the value rows of
h = S[a, s] x[t] and, next to each expert row, the router logit of the expert owning it (router
row R + c // expert_rank), so the gate stays a per-row quantity with no gather across registers.
Then the softmax over the E logits, the top-k experts (k rounds of argmax over the rows with
masking, ties to the lower expert), their renormalised weights, the gate on the value rows, and
y[t, slice columns] += g @ X[a][:, slice columns], tiled over the columns. Programs write
disjoint column ranges of y, so no atomics are needed. Layouts: goat_runtime.ops.routed_lora.
The slices' column offsets are kept on the device, one small tensor per (offsets, device),
created on the first call: warm up before capturing a CUDA graph.

This module imports triton at import time: it is only imported on the CUDA path of
`add_routed_lora` (and by the tests, with TRITON_INTERPRET=1 to run the kernel on the CPU).
"""

import functools
import itertools

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("goat_runtime.ops.triton_kernel needs triton (the 'gpu' extra: "
                      "pip install 'goat-serve[gpu]')") from exc

from goat_runtime.ops.routed_lora import RoutedLoRAWeights

_DTYPES = (torch.float32, torch.bfloat16)
# Elements of a [BLOCK_R, BLOCK_K] (or [BLOCK_R, BLOCK_N]) weight tile a program holds at once.
_TILE_ELEMENTS = 4096


@triton.jit
def _routed_lora_kernel(
    y_ptr, x_ptr, slots_ptr, shrink_ptr, expand_ptr, meta_ptr, offsets_ptr, counts_ptr,
    num_slots, d_in, num_value_rows, max_experts, counts_width,
    stride_yt, stride_yn,
    stride_xt, stride_xk,
    stride_sa, stride_ss, stride_sr, stride_sk,
    stride_ea, stride_er, stride_en,
    stride_ma, stride_ms, stride_mf,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    COUNT_EXPERTS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    # Slot -1: no adapter. A slot past num_slots is the caller's bug; skip it rather than read
    # out of bounds.
    if (slot >= 0) & (slot < num_slots):
        meta = meta_ptr + slot * stride_ma + s * stride_ms
        # Clamp the metadata so a malformed slot can never read outside the stacked tensors.
        num_experts = tl.minimum(tl.maximum(tl.load(meta), 0), max_experts)
        top_k = tl.minimum(tl.maximum(tl.load(meta + stride_mf), 0), num_experts)
        expert_rank = tl.maximum(tl.load(meta + 2 * stride_mf), 0)

        rows = tl.arange(0, BLOCK_R)
        row_mask = rows < num_value_rows
        # Value row c < E * expert_rank belongs to expert c // expert_rank; its owner's router
        # logit is computed alongside it (router row R + owner), which keeps every gate a
        # per-row quantity: no gather across registers is needed.
        expert_rows = rows < num_experts * expert_rank
        owner = rows // tl.maximum(expert_rank, 1)
        cols_k = tl.arange(0, BLOCK_K)

        # Shrink: h = S[a, s] x[t] in fp32, tiled over d_in: the value rows, and for each
        # expert row the router logit of its expert.
        shrink = shrink_ptr + slot * stride_sa + s * stride_ss
        values = tl.zeros((BLOCK_R,), dtype=tl.float32)
        logits = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            k = k0 + cols_k
            k_mask = k < d_in
            xk = tl.load(x_ptr + t * stride_xt + k * stride_xk, mask=k_mask,
                         other=0.0).to(tl.float32)
            w_value = tl.load(shrink + rows[:, None] * stride_sr + k[None, :] * stride_sk,
                              mask=row_mask[:, None] & k_mask[None, :],
                              other=0.0).to(tl.float32)
            values += tl.sum(w_value * xk[None, :], axis=1)
            w_router = tl.load(
                shrink + (num_value_rows + owner[:, None]) * stride_sr + k[None, :] * stride_sk,
                mask=expert_rows[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            logits += tl.sum(w_router * xk[None, :], axis=1)

        # Router: softmax over the E logits, the top_k largest kept (k rounds of argmax, ties to
        # the lower expert) and renormalised. The softmax's denominator cancels in the
        # renormalisation, so the weights are exp(logit - max) over their sum on the chosen.
        peak = tl.max(tl.where(expert_rows, logits, float("-inf")), axis=0)
        peak = tl.where(num_experts * expert_rank > 0, peak, 0.0)  # no experts: stay finite
        probs = tl.exp(tl.where(expert_rows, logits - peak, float("-inf")))
        chosen = rows < 0  # all False
        total = 0.0
        for _ in range(top_k):
            best, pick = tl.max(tl.where(expert_rows & ~chosen, probs, -1.0), axis=0,
                                return_indices=True, return_indices_tie_break_left=True)
            chosen = chosen | (owner == pick // tl.maximum(expert_rank, 1))
            total += best

        # Gate: the chosen expert's weight on its rows, 0 on the others' rows, 1 past
        # E * expert_rank (the static term's rows, and every row when E = 0).
        gate = tl.where(chosen, probs / tl.maximum(total, 1e-30), 0.0)
        if COUNT_EXPERTS:  # one count per chosen expert: at its first value row
            first_row = chosen & expert_rows & (rows % tl.maximum(expert_rank, 1) == 0)
            tl.atomic_add(counts_ptr + slot * counts_width + owner, 1,
                          mask=first_row & (owner < counts_width))
        gated = tl.where(expert_rows, gate, 1.0) * values

        # Expand: y[t, slice columns] += gated @ X[a][:, slice columns], tiled over columns.
        col_start = tl.load(offsets_ptr + s)
        col_end = tl.load(offsets_ptr + s + 1)
        cols_n = tl.arange(0, BLOCK_N)
        expand = expand_ptr + slot * stride_ea
        for n0 in range(col_start, col_end, BLOCK_N):
            n = n0 + cols_n
            n_mask = n < col_end
            w_expand = tl.load(expand + rows[:, None] * stride_er + n[None, :] * stride_en,
                               mask=row_mask[:, None] & n_mask[None, :],
                               other=0.0).to(tl.float32)
            delta = tl.sum(gated[:, None] * w_expand, axis=0)
            y_cols = y_ptr + t * stride_yt + n * stride_yn
            acc = tl.load(y_cols, mask=n_mask, other=0.0).to(tl.float32) + delta
            tl.store(y_cols, acc.to(y_ptr.dtype.element_ty), mask=n_mask)


@functools.lru_cache(maxsize=64)
def _offsets_tensor(out_offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The slices' column offsets on the device, made once per (offsets, device)."""
    return torch.tensor(out_offsets, dtype=torch.int32, device=device)


def _block(size: int, cap: int) -> int:
    return max(1, min(triton.next_power_of_2(max(size, 1)), cap))


def _validate(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
              weights: RoutedLoRAWeights) -> None:
    shrink, expand, meta = weights.shrink, weights.expand, weights.slice_meta
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(f"x and y must be 2-D [T, d]; got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)}")
    if x.dtype not in _DTYPES or y.dtype != x.dtype:
        raise ValueError(f"x and y must share a dtype in {_DTYPES}; got x {x.dtype}, "
                         f"y {y.dtype}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x and y disagree on the token count: {x.shape[0]} vs {y.shape[0]}")
    if token_slots.dim() != 1 or token_slots.shape[0] != x.shape[0]:
        raise ValueError(f"token_slots must be [T] = [{x.shape[0]}]; got "
                         f"{tuple(token_slots.shape)}")
    if token_slots.dtype != torch.int32:
        raise ValueError(f"token_slots must be int32; got {token_slots.dtype}")
    if shrink.dim() != 4 or expand.dim() != 3 or meta.dim() != 3:
        raise ValueError(
            f"weights must be shrink [slots, slices, R + E_max, d_in], expand [slots, R, d_out],"
            f" slice_meta [slots, slices, 3]; got {tuple(shrink.shape)}, {tuple(expand.shape)},"
            f" {tuple(meta.shape)}")
    num_slots, num_slices, shrink_rows, d_in = shrink.shape
    if shrink.dtype != x.dtype or expand.dtype != x.dtype:
        raise ValueError(f"shrink and expand must have x's dtype {x.dtype}; got "
                         f"{shrink.dtype}, {expand.dtype}")
    if d_in != x.shape[1]:
        raise ValueError(f"shrink's d_in {d_in} does not match x's {x.shape[1]}")
    if expand.shape[0] != num_slots or expand.shape[2] != y.shape[1]:
        raise ValueError(f"expand must be [{num_slots}, R, {y.shape[1]}] (slots, value rows, "
                         f"y's d_out); got {tuple(expand.shape)}")
    if shrink_rows < expand.shape[1]:
        raise ValueError(f"shrink has {shrink_rows} rows, fewer than expand's "
                         f"{expand.shape[1]} value rows")
    if tuple(meta.shape) != (num_slots, num_slices, 3) or meta.dtype != torch.int32:
        raise ValueError(f"slice_meta must be int32 [{num_slots}, {num_slices}, 3]; got "
                         f"{meta.dtype} {tuple(meta.shape)}")
    offsets = tuple(weights.out_offsets)
    if (len(offsets) != num_slices + 1 or offsets[0] != 0 or offsets[-1] != y.shape[1]
            or any(b < a for a, b in itertools.pairwise(offsets))):
        raise ValueError(f"out_offsets must be {num_slices + 1} non-decreasing column offsets "
                         f"from 0 to d_out = {y.shape[1]}; got {offsets}")
    tensors = {"y": y, "x": x, "token_slots": token_slots, "shrink": shrink, "expand": expand,
               "slice_meta": meta}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device; got {devices}")


def add_routed_lora_triton(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                           weights: RoutedLoRAWeights, *, block_k: int | None = None,
                           block_n: int | None = None,
                           expert_counts: torch.Tensor | None = None) -> None:
    """Semantics: y[t] += X_a (gate(h) * h[:R]), h = S[a, s] x[t], a = token_slots[t], per slice.

    Args:
      y: [T, d_out] float32 or bfloat16, updated in place.
      x: [T, d_in], same dtype as y.
      token_slots: [T] int32, each token's slot in [0, num_slots), -1 for no adapter.
      weights: shrink [num_slots, num_slices, R + E_max, d_in] and expand [num_slots, R, d_out],
        x's dtype; slice_meta [num_slots, num_slices, 3] int32 (E, top_k, expert_rank);
        out_offsets, num_slices + 1 column offsets into d_out.
      expert_counts: optional [num_slots, E] int64, contiguous, on x's device: += the chosen
        (token, slice) pairs per slot and expert.
      block_k, block_n: optional tile sizes (powers of two) over d_in and over a slice's output
        columns; by default chosen from the shapes.
    token_slots and slice_meta are not range-checked on the host (that would synchronise the
    device): the kernel skips tokens whose slot is >= num_slots and clamps slice_meta to the
    stacked shapes, so bad values give wrong numbers, never out-of-bounds accesses.
    Raises ValueError on mismatched shapes, dtypes or devices.
    """
    _validate(y, x, token_slots, weights)
    for name, block in (("block_k", block_k), ("block_n", block_n)):
        if block is not None and (block < 1 or block & (block - 1)):
            raise ValueError(f"{name} must be a power of two; got {block}")
    num_tokens, d_in = x.shape
    num_slices = weights.num_slices
    if num_tokens == 0 or num_slices == 0:
        return
    num_value_rows = weights.num_value_rows
    max_experts = weights.shrink.shape[2] - num_value_rows
    block_r = _block(num_value_rows, 1 << 30)  # the gated rows live in registers: all of R
    block_k = block_k or _block(d_in, max(16, _TILE_ELEMENTS // block_r))
    slice_width = max(b - a for a, b in itertools.pairwise(weights.out_offsets))
    block_n = block_n or _block(slice_width, max(16, _TILE_ELEMENTS // block_r))
    offsets = _offsets_tensor(tuple(weights.out_offsets), x.device)
    shrink, expand, meta = weights.shrink, weights.expand, weights.slice_meta
    if expert_counts is not None and (expert_counts.dtype != torch.int64
                                      or expert_counts.dim() != 2
                                      or expert_counts.shape[0] != shrink.shape[0]
                                      or not expert_counts.is_contiguous()
                                      or expert_counts.device != x.device):
        raise ValueError(f"expert_counts must be contiguous int64 [{shrink.shape[0]}, E] on "
                         f"{x.device}; got {expert_counts.dtype} {tuple(expert_counts.shape)}")
    counts = expert_counts if expert_counts is not None else offsets  # unused when not counting
    _routed_lora_kernel[(num_tokens, num_slices)](
        y, x, token_slots, shrink, expand, meta, offsets, counts,
        shrink.shape[0], d_in, num_value_rows, max_experts,
        expert_counts.shape[1] if expert_counts is not None else 0,
        *y.stride(), *x.stride(), *shrink.stride(), *expand.stride(), *meta.stride(),
        BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_N=block_n,
        COUNT_EXPERTS=expert_counts is not None,
    )
