"""The model's building blocks: RMSNorm, rotary embedding, fused linear (+ routed adapter delta)
and paged attention. Batch metadata comes from the installed StepContext, never from arguments.
"""

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from goat_runtime.model.config import RopeConfig
from goat_runtime.model.context import get_step_context
from goat_runtime.ops import RoutedLoRAWeights, add_routed_lora, paged_decode_attention

# Up to this many rows (tokens), fp32 linears on the CPU go through oneDNN: it beats the default
# MKL GEMM at decode batch sizes and loses to it beyond about 256 rows (figures in
# docs/benchmarks.md, "Figures behind defaults").
ONEDNN_MAX_ROWS = 256
# ... and only for weights of at least this many elements: oneDNN's fixed cost per call (20-50
# us here, against MKL's 5-10) made every row count up to 64 slower below about 512 x 512
# (`python -m benchmarks.bench_linear`); SmolLM2's smallest weight, 576 x 576, is above it.
ONEDNN_MIN_WEIGHT = 1 << 18
# torch leaves torch.backends.mkldnn.is_available unannotated.
_HAS_ONEDNN: bool = torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]


# oneDNN (and ideep above it) cache a compiled primitive per distinct input shape, up to 1024
# each, and what a primitive holds stays in the process: on a server, whose row counts are the
# step's token counts, RSS climbed with every new row count until those caches were full
# (docs/benchmarks.md section 4). So rows are padded up to one
# of ROW_BUCKETS counts: every count up to 16 (decode batches, no padding), then 8 per octave
# (at most 1/8 extra rows), 48 shapes per linear in all, reached in the server's warm-up.
_EXACT_ROWS = 16


def onednn_row_bucket(rows: int) -> int:
    """The row count `fast_linear` gives oneDNN for `rows` (1 <= rows <= ONEDNN_MAX_ROWS)."""
    if rows <= _EXACT_ROWS:
        return rows
    shift = rows.bit_length() - 4  # keep the top 3 bits after the leading one
    return -(-rows >> shift) << shift


ROW_BUCKETS = sorted({onednn_row_bucket(t) for t in range(1, ONEDNN_MAX_ROWS + 1)})


def onednn_serves(weight: torch.Tensor) -> bool:
    """Whether `fast_linear` gives this weight to oneDNN (for at most ONEDNN_MAX_ROWS rows):
    fp32 on the CPU, at least ONEDNN_MIN_WEIGHT elements."""
    return (_HAS_ONEDNN and weight.is_cpu and weight.dtype == torch.float32
            and weight.numel() >= ONEDNN_MIN_WEIGHT)


def _onednn_rows(x: torch.Tensor) -> bool:
    # mkldnn's linear has no backward (autograd would silently give wrong gradients): a
    # gradient through x (training) takes F.linear.
    return (x.is_cpu and x.dtype == torch.float32 and 0 < x.shape[0] <= ONEDNN_MAX_ROWS
            and not (x.requires_grad and torch.is_grad_enabled()))


def pack_for_onednn(weight: torch.Tensor) -> torch.Tensor | None:
    """A copy of weight [d_out, d_in] in oneDNN's blocked layout for `fast_linear`, or None
    where oneDNN does not serve it (`onednn_serves`). Given the plain weight, oneDNN works
    from that layout on every call; packed, a decode step's linears take less time
    (`python -m benchmarks.bench_model_step`; figures in docs/benchmarks.md). A copy, not a
    view: it does not see later writes to `weight`."""
    if not onednn_serves(weight):
        return None
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 32)
    return packed


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                packed: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [T, d_in], routed to the faster GEMM for T and the
    weight's size on the CPU; packed: `pack_for_onednn(weight)`, if the caller keeps one."""
    if _onednn_rows(x) and onednn_serves(weight):
        rows = x.shape[0]
        bucket = onednn_row_bucket(rows)
        if bucket != rows:  # padded with zero rows; each output row depends on its input row only
            x = torch.cat([x, x.new_zeros(bucket - rows, x.shape[1])])
        y: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x, weight if packed is None else packed, bias, "none", [], "")
        return y if bucket == rows else y[:rows]
    return F.linear(x, weight, bias)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    # Filled by the loader; inference only, so no autograd.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, *, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        self.eps = eps
        self.weight = _empty(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op instead of five
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # As transformers: normalise in float32, cast back, then scale (matters in bf16).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin for the step's positions, computed once per forward and shared by all layers."""

    inv_freq: torch.Tensor  # a buffer

    def __init__(self, head_dim: int, rope: RopeConfig, device: torch.device | str):
        super().__init__()
        self.register_buffer("inv_freq", rope.inv_freq(head_dim).to(device), persistent=False)

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, signed sin), each [T, 1, head_dim] in `dtype`, for `apply_rotary`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # float32, as transformers
        cos, sin = freqs.cos(), freqs.sin()
        return (torch.cat([cos, cos], dim=-1).to(dtype)[:, None, :],
                torch.cat([-sin, sin], dim=-1).to(dtype)[:, None, :])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; transformers' rotate-half convention, x * cos +
    rotate_half(x) * sin, with rotate_half(x) * sin = roll(x, head_dim / 2) * [-sin, sin]."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class FusedLinear(nn.Module):
    """Base projections sharing one input, fused into one weight [sum(out_sizes), d_in], plus
    the routed delta of the adapter in each token's slot once an adapter manager attaches one.

    slice_names: the checkpoint module name of each output slice (e.g. ...q_proj, k_proj,
    v_proj), the names adapters and static components refer to.
    """

    def __init__(self, d_in: int, out_sizes: Sequence[int], slice_names: Sequence[str], *,
                 bias: bool, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.d_in = d_in
        self.out_sizes = tuple(out_sizes)
        self.slice_names = tuple(slice_names)
        offsets = [0]
        for size in out_sizes:
            offsets.append(offsets[-1] + size)
        self.out_offsets = tuple(offsets)
        self.weight = _empty(offsets[-1], d_in, dtype=dtype, device=device)
        self.bias = _empty(offsets[-1], dtype=dtype, device=device) if bias else None
        self.routed: RoutedLoRAWeights | None = None
        self.packed: torch.Tensor | None = None  # see pack_weights

    def pack_weights(self) -> None:
        """Keep `pack_for_onednn(weight)` for decode-sized batches. Call after the last write
        to the weight (loading, merging static terms): the copy is not refreshed."""
        self.packed = pack_for_onednn(self.weight.data)

    def slice_weight(self, s: int) -> torch.Tensor:
        """A view of slice s's rows: writes (loading, merging static terms) go to the fused one."""
        return self.weight.data[self.out_offsets[s] : self.out_offsets[s + 1]]

    def slice_bias(self, s: int) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias.data[self.out_offsets[s] : self.out_offsets[s + 1]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fast_linear(x, self.weight, self.bias, self.packed)
        if self.routed is not None:
            ctx = get_step_context()
            if ctx.has_adapter_tokens:  # a base-only step skips the op altogether
                add_routed_lora(y, x.contiguous(), ctx.token_adapter_slots, self.routed,
                                ctx.expert_counts)
        return y


class PagedAttention(nn.Module):
    """Causal GQA attention over a paged KV cache (k_cache/v_cache attached by the engine).

    Writes the step's K/V at the context's slot mapping, then attends: sequences with several
    query tokens one by one (query i of a sequence with context C and Q queries sees keys
    0..C-Q+i), single-token (decode) sequences all together with `paged_decode_attention`,
    which reads their contexts from the cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_heads, head_dim]
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, head_dim]; k, v: [T, kv_heads, head_dim] -> [T, heads, head_dim]."""
        if self.k_cache is None or self.v_cache is None:
            raise RuntimeError("no KV cache attached; call model.attach_kv_cache(cache) first")
        ctx = get_step_context()
        k_flat = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        v_flat = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        k_flat.index_copy_(0, ctx.slot_mapping, k)
        v_flat.index_copy_(0, ctx.slot_mapping, v)
        window = self.sliding_window
        d = ctx.decode
        if d is not None and not ctx.prefills:  # decode only: the tokens are the sequences
            return paged_decode_attention(q, self.k_cache, self.v_cache, d.block_tables,
                                          d.context_lens, d.max_context_len,
                                          self.head_dim**-0.5, window)
        out = torch.empty_like(q)
        for seq in ctx.prefills:
            rows = slice(seq.start, seq.start + seq.query_len)
            if seq.context_slots is None:  # nothing cached before: use this step's K/V as is
                keys, values = k[rows], v[rows]
            else:
                keys = k_flat.index_select(0, seq.context_slots)
                values = v_flat.index_select(0, seq.context_slots)
            mask = None
            if seq.context_slots is not None or window is not None:
                key_pos = torch.arange(seq.context_len, device=q.device)
                query_pos = key_pos[seq.context_len - seq.query_len :, None]
                mask = key_pos[None, :] <= query_pos
                if window is not None:
                    mask &= key_pos[None, :] > query_pos - window
            out[rows] = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None], keys.transpose(0, 1)[None],
                values.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                enable_gqa=True)[0].transpose(0, 1)
        if d is not None:
            out[d.token_indices] = paged_decode_attention(
                q[d.token_indices], self.k_cache, self.v_cache, d.block_tables, d.context_lens,
                d.max_context_len, self.head_dim**-0.5, window)
        return out


# q [T, heads, head_dim], k, v [T, kv_heads, head_dim], the layer's sliding window -> out
# [T, heads, head_dim]: what a decoder layer attends with when not through its paged cache.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int | None], torch.Tensor]


class DenseAttention:
    """Attention over all the forward's tokens at once, without a KV cache or step context (the
    trainer's packed batches): the decoder layers call it, given one, instead of PagedAttention.

    mask(window) -> [T, T] bool, True where query row i may attend key column j, for a layer
    with that sliding window (None: no window); without `mask`, the tokens are one sequence
    and attention is causal. A mask is built once per window and shared by the layers.
    """

    def __init__(self, mask: Callable[[int | None], torch.Tensor] | None = None):
        self._mask = mask
        self._masks: dict[int | None, torch.Tensor | None] = {}

    def mask(self, window: int | None, num_tokens: int,
             device: torch.device) -> torch.Tensor | None:
        if window not in self._masks:
            if self._mask is not None:
                self._masks[window] = self._mask(window)
            elif window is None:
                self._masks[window] = None  # is_causal
            else:
                pos = torch.arange(num_tokens, device=device)
                self._masks[window] = ((pos[None, :] <= pos[:, None])
                                       & (pos[None, :] > pos[:, None] - window))
        return self._masks[window]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 window: int | None) -> torch.Tensor:
        mask = self.mask(window, q.shape[0], q.device)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None, enable_gqa=True)[0]
        return out.transpose(0, 1).contiguous()
