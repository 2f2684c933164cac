"""The routed low-rank op on the GPU: one fused Triton kernel (shrink, top-k gate, expand).

Semantics: y[t, off_s:off_{s+1}] += X_a[:, off_s:off_{s+1}]^T (gate(G[a, s] x[t]) * h) with
h = S[a, s] x[t], a = token_slots[t], for every slice s; tokens with slot -1 are untouched.

One program per (token, slice), BGMV style: the program loads its token's slot and the slice's
(E, top_k, expert_rank) and computes, in fp32 and tiled over d_in, the value rows of
h = S[a, s] x[t] and the E router logits G[a, s] x[t] (the router is float32 whatever the
served dtype; a bfloat16 x tile is widened exactly). Then the softmax over the E logits, the
top-k experts (k rounds of argmax; where the k-th probability equals the next one, the experts
torch.topk keeps on the CPU, by replaying its std::nth_element: `_torch_topk_kept`), their
renormalised weights, the gate on the value rows (each row takes its expert's weight), and
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

from goat_runtime.ops.routed_lora import RoutedLoRAWeights
from goat_runtime.ops.triton_import import tl, triton

_DTYPES = (torch.float32, torch.bfloat16)
# Elements of a [BLOCK_R, BLOCK_K] (or [BLOCK_R, BLOCK_N]) weight tile a program holds at once.
_TILE_ELEMENTS = 4096


# ---- torch.topk's choice among equal probabilities ------------------------------------------
# torch.topk on the CPU (ATen's topk_impl_loop) runs libstdc++'s std::nth_element at k - 1 (or,
# when 64 k <= E, std::partial_sort's heap select) on the (probability, index) pairs, comparing
# probabilities alone. The functions below replay those exact steps on one token's E
# probabilities held in registers: `pos[lane]` is the position of expert `lane` in the array the
# std algorithm permutes (lanes past E are never touched), an element is read as a masked sum,
# and a swap or a move rewrites `pos`. Only which experts end in positions [0, k) matters for
# the gate. The kernel runs this only for tokens whose k-th and (k+1)-th probabilities are equal.


@triton.jit
def _before(a, b):
    """std comparator of torch.topk (largest first): a before b, NaN largest."""
    return ((a != a) & (b == b)) | (a > b)


@triton.jit
def _value_at(pos, vals, i):
    return tl.sum(tl.where(pos == i, vals, 0.0), axis=0)


@triton.jit
def _lane_at(pos, lanes, i):
    return tl.sum(tl.where(pos == i, lanes, 0), axis=0)


@triton.jit
def _swap(pos, i, j):
    return tl.where(pos == i, j, tl.where(pos == j, i, pos))


@triton.jit
def _adjust_heap(pos, vals, lanes, first, hole, length, value_lane):
    """std::__adjust_heap then std::__push_heap; value_lane is detached (pos -1)."""
    value = tl.sum(tl.where(lanes == value_lane, vals, 0.0), axis=0)
    hole = hole + 0 * length  # a tensor even when called with a constant (loop-carried)
    top = hole
    child = hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        child = tl.where(_before(_value_at(pos, vals, first + child),
                                 _value_at(pos, vals, first + child - 1)), child - 1, child)
        pos = tl.where(lanes == _lane_at(pos, lanes, first + child), first + hole, pos)
        hole = child
    if ((length & 1) == 0) & (child == (length - 2) // 2):
        child = 2 * (child + 1)
        pos = tl.where(lanes == _lane_at(pos, lanes, first + child - 1), first + hole, pos)
        hole = child - 1
    parent = (hole - 1) // 2
    while (hole > top) & _before(_value_at(pos, vals, first + parent), value):
        pos = tl.where(lanes == _lane_at(pos, lanes, first + parent), first + hole, pos)
        hole = parent
        parent = (hole - 1) // 2
    return tl.where(lanes == value_lane, first + hole, pos)


@triton.jit
def _heap_select(pos, vals, lanes, first, middle, last):
    """std::__heap_select: make_heap on [first, middle), then pop_heap for every later element
    that comes before the heap's top."""
    length = middle - first
    if length >= 2:
        parent = (length - 2) // 2
        building = parent >= 0
        while building:
            lane = _lane_at(pos, lanes, first + parent)
            pos = tl.where(lanes == lane, -1, pos)
            pos = _adjust_heap(pos, vals, lanes, first, parent, length, lane)
            building = parent > 0
            parent -= 1
    i = middle
    while i < last:
        if _before(_value_at(pos, vals, i), _value_at(pos, vals, first)):
            lane = _lane_at(pos, lanes, i)  # pop_heap(first, middle, i)
            pos = tl.where(lanes == _lane_at(pos, lanes, first), i, pos)
            pos = tl.where(lanes == lane, -1, pos)
            pos = _adjust_heap(pos, vals, lanes, first, 0, length, lane)
        i += 1
    return pos


@triton.jit
def _stable_sort_range(pos, vals, first, last):
    """std::__insertion_sort of [first, last): a stable sort, so each element's new position is
    first + (elements of the range before it) + (equal ones at earlier positions)."""
    inside = (pos >= first) & (pos < last)
    v_l, v_m = vals[:, None], vals[None, :]
    p_l, p_m = pos[:, None], pos[None, :]
    m_before = _before(v_m, v_l)
    equal = ~m_before & ~_before(v_l, v_m)
    ahead = inside[None, :] & (m_before | (equal & (p_m < p_l)))
    return tl.where(inside, first + tl.sum(ahead.to(tl.int32), axis=1), pos)


@triton.jit
def _torch_topk_kept(vals, num_experts, top_k, BLOCK_E: tl.constexpr):
    """Which of the num_experts lanes of vals (float32 [BLOCK_E]) torch.topk(vals[:E], top_k)
    returns on the CPU: a bool [BLOCK_E]. libstdc++'s std::nth_element (introselect, depth limit
    2 floor(log2 E), then an insertion sort) or std::partial_sort's heap select, step by step."""
    lanes = tl.arange(0, BLOCK_E)
    pos = lanes
    nth = top_k - 1
    if top_k * 64 <= num_experts:
        pos = _heap_select(pos, vals, lanes, 0, top_k, num_experts)
    else:
        zero = num_experts * 0  # loop-carried integers start as tensors, not constants
        depth = zero
        n = num_experts
        while n > 1:
            n = n // 2
            depth += 2
        first = zero
        last = num_experts
        heaped = num_experts < 0  # False
        while (last - first > 3) & ~heaped:
            if depth == 0:
                pos = _heap_select(pos, vals, lanes, first, nth + 1, last)
                pos = _swap(pos, first, nth)
                heaped = num_experts >= 0  # True
            else:
                depth -= 1
                # std::__move_median_to_first(first, first + 1, mid, last - 1)
                a = first + 1
                b = first + (last - first) // 2
                c = last - 1
                va = _value_at(pos, vals, a)
                vb = _value_at(pos, vals, b)
                vc = _value_at(pos, vals, c)
                median = tl.where(
                    _before(va, vb),
                    tl.where(_before(vb, vc), b, tl.where(_before(va, vc), c, a)),
                    tl.where(_before(va, vc), a, tl.where(_before(vb, vc), c, b)))
                pos = _swap(pos, first, median)
                # std::__unguarded_partition(first + 1, last, pivot = first)
                pivot = _value_at(pos, vals, first)
                lo = first + 1
                hi = last
                running = lo < hi
                while running:
                    while _before(_value_at(pos, vals, lo), pivot):
                        lo += 1
                    hi -= 1
                    while _before(pivot, _value_at(pos, vals, hi)):
                        hi -= 1
                    running = lo < hi
                    pos = tl.where(running, _swap(pos, lo, hi), pos)
                    lo = tl.where(running, lo + 1, lo)
                first = tl.where(lo <= nth, lo, first)
                last = tl.where(lo <= nth, last, lo)
        if ~heaped:
            pos = _stable_sort_range(pos, vals, first, last)
    return (pos < top_k) & (lanes < num_experts)


@triton.jit
def _topk_kept(probs, num_experts, top_k, BLOCK_E: tl.constexpr):
    """The lanes of probs (float32 [BLOCK_E], lanes past num_experts ignored) that
    torch.topk(probs[:E], top_k) keeps on the CPU, as a bool [BLOCK_E]: k rounds of argmax, and
    where the k-th probability equals a left-out one, the replay of torch.topk's steps."""
    experts = tl.arange(0, BLOCK_E)
    live = experts < num_experts
    kept = experts < 0  # all False
    kth = num_experts.to(tl.float32) * 0.0  # a tensor: loop-carried
    for _ in range(top_k):
        kth = tl.max(tl.where(live & ~kept, probs, -1.0), axis=0)
        pick = tl.min(tl.where(live & ~kept & (probs == kth), experts, BLOCK_E), axis=0)
        kept = kept | (experts == pick)
    left_out = tl.max(tl.where(live & ~kept, probs, -1.0), axis=0)
    if (top_k > 0) & (left_out == kth):
        kept = _torch_topk_kept(probs, num_experts, top_k, BLOCK_E)
    return kept


@triton.jit
def _topk_kept_kernel(probs_ptr, meta_ptr, kept_ptr, stride_pt, stride_pe, stride_mt,
                      stride_mf, stride_kt, stride_ke, max_experts, BLOCK_E: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    num_experts = tl.minimum(tl.maximum(tl.load(meta_ptr + t * stride_mt), 0), max_experts)
    top_k = tl.minimum(tl.maximum(tl.load(meta_ptr + t * stride_mt + stride_mf), 0),
                       num_experts)
    experts = tl.arange(0, BLOCK_E)
    probs = tl.load(probs_ptr + t * stride_pt + experts * stride_pe,
                    mask=experts < num_experts, other=0.0)
    kept = _topk_kept(probs, num_experts, top_k, BLOCK_E)
    tl.store(kept_ptr + t * stride_kt + experts * stride_ke, kept.to(tl.int8),
             mask=experts < max_experts)


def topk_kept_triton(probs: torch.Tensor, num_experts: torch.Tensor,
                     top_k: torch.Tensor) -> torch.Tensor:
    """Semantics: kept[t, e] = whether torch.topk(probs[t, :E_t], k_t) on the CPU returns expert
    e (ties included: the experts its std::nth_element keeps), for every row t at once.

    probs: [T, E_max] float32 (columns past a row's E are ignored).
    num_experts, top_k: [T] int (E_t, k_t); E_t = 0 keeps nothing.
    Returns [T, E_max] bool, on probs' device. No host synchronisation.
    """
    if probs.dim() != 2 or probs.dtype != torch.float32:
        raise ValueError(f"probs must be float32 [T, E_max]; got {probs.dtype} "
                         f"{tuple(probs.shape)}")
    num_tokens, max_experts = probs.shape
    if num_experts.shape != (num_tokens,) or top_k.shape != (num_tokens,):
        raise ValueError(f"num_experts and top_k must be [{num_tokens}]; got "
                         f"{tuple(num_experts.shape)}, {tuple(top_k.shape)}")
    meta = torch.stack([num_experts, top_k], dim=1).to(torch.int32)
    kept = torch.zeros(num_tokens, max_experts, dtype=torch.int8, device=probs.device)
    if num_tokens and max_experts:
        _topk_kept_kernel[(num_tokens,)](probs, meta, kept, *probs.stride(), *meta.stride(),
                                         *kept.stride(), max_experts,
                                         BLOCK_E=_block(max_experts, 1 << 30))
    return kept.bool()


@triton.jit
def _routed_lora_kernel(
    y_ptr, x_ptr, slots_ptr, shrink_ptr, router_ptr, expand_ptr, meta_ptr, offsets_ptr,
    counts_ptr,
    num_slots, d_in, num_value_rows, max_experts, counts_width,
    stride_yt, stride_yn,
    stride_xt, stride_xk,
    stride_sa, stride_ss, stride_sr, stride_sk,
    stride_ga, stride_gs, stride_ge, stride_gk,
    stride_ea, stride_er, stride_en,
    stride_ma, stride_ms, stride_mf,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr, COUNT_EXPERTS: tl.constexpr,
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
        used_rows = tl.minimum(tl.maximum(tl.load(meta + 3 * stride_mf), 0), num_value_rows)
        num_experts = tl.where(num_experts * expert_rank > 0, num_experts, 0)

        rows = tl.arange(0, BLOCK_R)
        row_mask = rows < used_rows  # the padding up to R is never loaded
        expert_rows = rows < num_experts * expert_rank  # row c belongs to expert c // rank
        owner = rows // tl.maximum(expert_rank, 1)
        experts = tl.arange(0, BLOCK_E)
        expert_mask = experts < num_experts
        cols_k = tl.arange(0, BLOCK_K)

        # Shrink: h = S[a, s] x[t] and the router logits G[a, s] x[t], fp32, tiled over d_in.
        shrink = shrink_ptr + slot * stride_sa + s * stride_ss
        router = router_ptr + slot * stride_ga + s * stride_gs
        values = tl.zeros((BLOCK_R,), dtype=tl.float32)
        logits = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            k = k0 + cols_k
            k_mask = k < d_in
            xk = tl.load(x_ptr + t * stride_xt + k * stride_xk, mask=k_mask,
                         other=0.0).to(tl.float32)
            w_value = tl.load(shrink + rows[:, None] * stride_sr + k[None, :] * stride_sk,
                              mask=row_mask[:, None] & k_mask[None, :],
                              other=0.0).to(tl.float32)
            values += tl.sum(w_value * xk[None, :], axis=1)
            w_router = tl.load(router + experts[:, None] * stride_ge + k[None, :] * stride_gk,
                               mask=expert_mask[:, None] & k_mask[None, :], other=0.0)
            logits += tl.sum(w_router * xk[None, :], axis=1)

        # Router: softmax over the E logits, the top_k kept as torch.topk keeps them,
        # renormalised.
        peak = tl.max(tl.where(expert_mask, logits, float("-inf")), axis=0)
        peak = tl.where(num_experts > 0, peak, 0.0)  # no experts: stay finite
        exps = tl.exp(tl.where(expert_mask, logits - peak, float("-inf")))
        probs = exps / tl.maximum(tl.sum(exps, axis=0), 1e-30)  # the sum is >= 1 if E > 0
        kept = _topk_kept(probs, num_experts, top_k, BLOCK_E)
        weights = tl.where(kept, probs, 0.0)
        weights = weights / tl.maximum(tl.sum(weights, axis=0), 1e-30)
        if COUNT_EXPERTS:
            tl.atomic_add(counts_ptr + slot * counts_width + experts, 1,
                          mask=kept & (experts < counts_width))

        # Gate: the expert's weight on its rows, 1 past E * expert_rank (the static term's
        # rows, and every row when E = 0); padding rows hold h = 0.
        gate = tl.sum(tl.where(owner[:, None] == experts[None, :], weights[None, :], 0.0),
                      axis=1)
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
    return max(1, min(int(triton.next_power_of_2(max(size, 1))), cap))


def _validate(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
              weights: RoutedLoRAWeights) -> None:
    _validate_tokens(y, x, token_slots)
    _validate_weights(y, x, weights)
    tensors = {"y": y, "x": x, "token_slots": token_slots, "shrink": weights.shrink,
               "router": weights.router, "expand": weights.expand,
               "slice_meta": weights.slice_meta}
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) != 1:
        raise ValueError(f"all tensors must be on one device; got {devices}")


def _validate_tokens(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor) -> None:
    """y, x and token_slots: shapes and dtypes."""
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


def _validate_weights(y: torch.Tensor, x: torch.Tensor, weights: RoutedLoRAWeights) -> None:
    """The stacked weights against each other and against x and y (checked already)."""
    shrink, router, expand = weights.shrink, weights.router, weights.expand
    meta = weights.slice_meta
    if shrink.dim() != 4 or router.dim() != 4 or expand.dim() != 3 or meta.dim() != 3:
        raise ValueError(
            f"weights must be shrink [slots, slices, R, d_in], router [slots, slices, E_max, "
            f"d_in], expand [slots, R, d_out], slice_meta [slots, slices, 4]; got "
            f"{tuple(shrink.shape)}, {tuple(router.shape)}, {tuple(expand.shape)}, "
            f"{tuple(meta.shape)}")
    num_slots, num_slices, shrink_rows, d_in = shrink.shape
    if shrink.dtype != x.dtype or expand.dtype != x.dtype:
        raise ValueError(f"shrink and expand must have x's dtype {x.dtype}; got "
                         f"{shrink.dtype}, {expand.dtype}")
    if router.dtype != torch.float32:
        raise ValueError(f"router must be float32 (routers are never rounded to the served "
                         f"dtype); got {router.dtype}")
    if tuple(router.shape) != (num_slots, num_slices, router.shape[2], d_in):
        raise ValueError(f"router must be [{num_slots}, {num_slices}, E_max, {d_in}]; got "
                         f"{tuple(router.shape)}")
    if d_in != x.shape[1]:
        raise ValueError(f"shrink's d_in {d_in} does not match x's {x.shape[1]}")
    if expand.shape[0] != num_slots or expand.shape[2] != y.shape[1]:
        raise ValueError(f"expand must be [{num_slots}, R, {y.shape[1]}] (slots, value rows, "
                         f"y's d_out); got {tuple(expand.shape)}")
    if shrink_rows != expand.shape[1]:
        raise ValueError(f"shrink has {shrink_rows} rows per slice, expand "
                         f"{expand.shape[1]} value rows")
    if tuple(meta.shape) != (num_slots, num_slices, 4) or meta.dtype != torch.int32:
        raise ValueError(f"slice_meta must be int32 [{num_slots}, {num_slices}, 4]; got "
                         f"{meta.dtype} {tuple(meta.shape)}")
    offsets = tuple(weights.out_offsets)
    if (len(offsets) != num_slices + 1 or offsets[0] != 0 or offsets[-1] != y.shape[1]
            or any(b < a for a, b in itertools.pairwise(offsets))):
        raise ValueError(f"out_offsets must be {num_slices + 1} non-decreasing column offsets "
                         f"from 0 to d_out = {y.shape[1]}; got {offsets}")


def add_routed_lora_triton(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                           weights: RoutedLoRAWeights, *, block_k: int | None = None,
                           block_n: int | None = None,
                           expert_counts: torch.Tensor | None = None) -> None:
    """Semantics: y[t] += X_a (gate(G[a, s] x[t]) * h), h = S[a, s] x[t], a = token_slots[t], per
    slice; the gate's top-k keeps the experts torch.topk keeps on the CPU, ties included.

    Args:
      y: [T, d_out] float32 or bfloat16, updated in place.
      x: [T, d_in], same dtype as y.
      token_slots: [T] int32, each token's slot in [0, num_slots), -1 for no adapter.
      weights: shrink [num_slots, num_slices, R, d_in] and expand [num_slots, R, d_out],
        x's dtype; router [num_slots, num_slices, E_max, d_in] float32; slice_meta
        [num_slots, num_slices, 4] int32 (E, top_k, expert_rank, rows: value rows used; the
        padding past them is not loaded); out_offsets, num_slices + 1 column offsets into d_out.
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
    max_experts = weights.max_experts
    block_e = _block(max_experts, 1 << 30)
    block_r = _block(num_value_rows, 1 << 30)  # the gated rows live in registers: all of R
    block_k = block_k or _block(d_in, max(16, _TILE_ELEMENTS // block_r))
    slice_width = max(b - a for a, b in itertools.pairwise(weights.out_offsets))
    block_n = block_n or _block(slice_width, max(16, _TILE_ELEMENTS // block_r))
    offsets = _offsets_tensor(tuple(weights.out_offsets), x.device)
    shrink, router, expand = weights.shrink, weights.router, weights.expand
    meta = weights.slice_meta
    if expert_counts is not None and (expert_counts.dtype != torch.int64
                                      or expert_counts.dim() != 2
                                      or expert_counts.shape[0] != shrink.shape[0]
                                      or not expert_counts.is_contiguous()
                                      or expert_counts.device != x.device):
        raise ValueError(f"expert_counts must be contiguous int64 [{shrink.shape[0]}, E] on "
                         f"{x.device}; got {expert_counts.dtype} {tuple(expert_counts.shape)}")
    counts = expert_counts if expert_counts is not None else offsets  # unused when not counting
    _routed_lora_kernel[(num_tokens, num_slices)](
        y, x, token_slots, shrink, router, expand, meta, offsets, counts,
        shrink.shape[0], d_in, num_value_rows, max_experts,
        expert_counts.shape[1] if expert_counts is not None else 0,
        *y.stride(), *x.stride(), *shrink.stride(), *router.stride(), *expand.stride(),
        *meta.stride(),
        BLOCK_R=block_r, BLOCK_E=block_e, BLOCK_K=block_k, BLOCK_N=block_n,
        COUNT_EXPERTS=expert_counts is not None,
    )
