"""The routed low-rank op written for clarity: a loop over tokens and slices. The test oracle."""

import torch

from goat_runtime.ops.routed_lora import RoutedLoRAWeights


def gate_from_logits(logits: torch.Tensor, num_experts: int, top_k: int, expert_rank: int,
                     num_value_rows: int) -> torch.Tensor:
    """Semantics: m[c] = renormalised top-k softmax weight of the expert owning value row c,
    1 for rows past the experts' E * expert_rank rows (static term, plain LoRA), 0 for experts
    not chosen. GOAT_SPEC section 2: softmax, then torch.topk (whose choice among equal
    probabilities defines the tie rule every kernel follows), then renormalisation.

    logits: [E] float32 router logits (E = num_experts, 0 for plain LoRA).
    Returns [num_value_rows] float32.
    """
    gate = torch.ones(num_value_rows, dtype=torch.float32)
    if num_experts == 0:
        return gate
    probs = torch.softmax(logits.float(), dim=-1)
    top_w, top_i = torch.topk(probs, top_k)
    top_w = top_w / top_w.sum()
    expert_w = torch.zeros(num_experts, dtype=torch.float32)
    expert_w[top_i] = top_w
    gate[: num_experts * expert_rank] = expert_w.repeat_interleave(expert_rank)
    return gate


def add_routed_lora_reference(y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor,
                              weights: RoutedLoRAWeights,
                              expert_counts: torch.Tensor | None = None) -> None:
    """Semantics: y[t] += X[a] (gate(G[a] x[t]) * h) with h = S[a] x[t], a = token_slots[t], per
    slice (G: the float32 router); tokens with slot -1 are left alone; expert_counts[a, e] +=
    chosen (token, slice) pairs; only the first `rows` value rows of a slot's slice (its
    slice_meta) take part. Shapes as in `add_routed_lora`. fp32 math."""
    offsets = weights.out_offsets
    for t in range(x.shape[0]):
        slot = int(token_slots[t])
        if slot < 0:
            continue
        for s in range(weights.num_slices):
            num_experts, top_k, expert_rank, rows = (int(v) for v in weights.slice_meta[slot, s])
            values = weights.shrink[slot, s, :rows].float() @ x[t].float()
            logits = weights.router[slot, s, :num_experts].float() @ x[t].float()
            gate = gate_from_logits(logits, num_experts, top_k, expert_rank, rows)
            if expert_counts is not None and num_experts:
                chosen = gate[: num_experts * expert_rank : expert_rank] > 0
                width = min(num_experts, expert_counts.shape[1])
                expert_counts[slot, :width] += chosen[:width].to(expert_counts.dtype)
            expand = weights.expand[slot, :rows, offsets[s] : offsets[s + 1]].float()
            y[t, offsets[s] : offsets[s + 1]] += ((gate * values) @ expand).to(y.dtype)
