"""The public routed low-rank op: one shrink (float32 routers beside it), a top-k gate, one expand.

One call serves a whole flat batch of T tokens from many adapters (GOAT_SPEC section 4). The
adapters bound to device slots are stacked in a `RoutedLoRAWeights` per fused base linear
(q/k/v, gate/up, o, down); each fused linear has `num_slices` output slices (3 for q/k/v), each
with its own router and experts. The CPU path is a C++ kernel (goat_runtime._C); the CUDA path a
Triton kernel (goat_runtime.ops.triton_kernel).

Layouts, per slot a and slice s (R = max value rows, E_max = max experts over slots and slices):
  shrink[a, s]  [R, d_in], the served dtype: the value rows (E expert blocks of expert_rank
                rows, expert e at rows [e*rank, (e+1)*rank), then the static term's rows), then
                zero padding up to R, which the op never reads.
  router[a, s]  [E_max, d_in], always float32: rows [0, E) the router G (rows past E are unused
                padding). Routers stay in float32 whatever the served dtype, as in the reference
                (GOAT_SPEC section 2): a bfloat16 router would move the logits by its rounding
                and can flip a top-k choice. The logits are float32 dot products (a bfloat16 x
                is widened exactly).
  expand[a]     [R, d_out]: column block [out_offsets[s], out_offsets[s+1]) belongs to slice s;
                its row c multiplies value row c of that slice, already scaled (s * B_e^T, D^T).
  slice_meta[a, s] int32 (num_experts E, top_k, expert_rank, rows); E = 0 means no router:
                every value row has gate 1 (plain LoRA). Value rows [E*expert_rank, rows) have
                gate 1 (the static term's); rows [rows, R) are padding and are not read, so a
                slot costs what its own adapter holds, not what the largest one holds (a merged
                GOAT slot beside LoRA slots that carry an undo term, a rank-8 LoRA beside an
                unmerged GOAT).
"""

from dataclasses import dataclass

import torch

# slice_meta's last dimension: (num_experts, top_k, expert_rank, value rows used).
SLICE_META_FIELDS = 4


@dataclass
class RoutedLoRAWeights:
    """The stacked adapter tensors of one fused base linear, for every device slot."""

    shrink: torch.Tensor  # [num_slots, num_slices, R, d_in], float32 or bfloat16
    router: torch.Tensor  # [num_slots, num_slices, E_max, d_in], float32
    expand: torch.Tensor  # [num_slots, R, d_out], same dtype as shrink
    slice_meta: torch.Tensor  # [num_slots, num_slices, 4] int32: (E, top_k, expert_rank, rows)
    out_offsets: tuple[int, ...]  # num_slices + 1 column offsets into d_out

    @property
    def num_slices(self) -> int:
        return self.shrink.shape[1]

    @property
    def num_value_rows(self) -> int:
        return self.expand.shape[1]

    @property
    def max_experts(self) -> int:
        return self.router.shape[2]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None
           ) -> "RoutedLoRAWeights":
        """These weights on `device`, the value rows in `dtype` (default: as they are); the
        router stays float32."""
        return RoutedLoRAWeights(self.shrink.to(device, dtype), self.router.to(device),
                                 self.expand.to(device, dtype), self.slice_meta.to(device),
                                 self.out_offsets)


def add_routed_lora(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                    weights: RoutedLoRAWeights,
                    expert_counts: torch.Tensor | None = None) -> None:
    """Semantics: y[t] += X_a (gate(h) * h_values), h = S_a x[t], a = token_slots[t], per slice.

    Args:
      y: [T, d_out] float32 or bfloat16, contiguous, updated in place.
      x: [T, d_in], same dtype as y, contiguous.
      token_slots: [T] int32, each token's device slot, -1 for a token without an adapter.
      weights: the stacked adapters of this fused linear (see the module docstring).
      expert_counts: optional [num_slots, E] int64, contiguous: expert_counts[a, e] += the number
        of (token, slice) pairs of slot a whose router chose expert e (e < E; wider routers'
        higher experts are not counted).
    The gate of slice s at token t: softmax of the E float32 router logits router[a, s, :E] x[t],
    top_k of them kept (ties as torch.topk, see the module docstring) and renormalised, expert
    e's weight repeated over its expert_rank value rows, 1 on the rows of the static term (and
    on every row when E = 0), 0 on experts not chosen.
    """
    if x.shape[0] == 0:
        return
    if x.is_cuda:
        from goat_runtime.ops.triton_kernel import add_routed_lora_triton

        add_routed_lora_triton(y, x, token_slots, weights, expert_counts=expert_counts)
    else:
        from goat_runtime._C import add_routed_lora as add_routed_lora_cpu

        add_routed_lora_cpu(y, x, token_slots, weights.shrink, weights.router, weights.expand,
                            weights.slice_meta, list(weights.out_offsets), expert_counts)
