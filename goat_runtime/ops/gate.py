"""The top-k router gate of many tokens at once, over a stacked slot layout (router rows first).

`goat_runtime.ops.reference.gate_from_logits` states the semantics for one token; `gate_rows`
is the same gate vectorised over a flat batch whose tokens belong to slots with different
(E, k, expert rank), as the vLLM plugin's layers call it once per step for the whole batch (the
routed op's kernels compute it inside their own loops). Equal probabilities are kept as
torch.topk keeps them on the CPU (`goat_runtime.ops.topk`), on every device.

Row layout of one slot's shrink output h (vLLM's stacked slots, `vllm_plugin/loader.py`):
rows [0, E) are the router's, rows [E, E + E * expert_rank) the experts' values, later rows
the static term (gate 1).
"""

import torch

from goat_runtime.ops.topk import topk_kept


def gate_rows(logits: torch.Tensor, meta: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Semantics: gate[t, c] = the multiplier of shrink row c of token t, meta[t] = (E, k,
    rank_e): 0 on the E router rows, on expert e's rank_e value rows the renormalised top-k
    softmax weight of expert e (softmax over logits[t, :E], torch.topk's k, ties as torch.topk
    keeps them on the CPU; 0 if not kept), 1 on every later row (static term; every row when
    E = 0, plain LoRA or no adapter).

    logits: [T, E_max] float32 router logits (columns past a token's E are ignored; other
      dtypes are widened, but the caller should compute them in float32: a rounded logit can
      flip a choice).
    meta: [T, 3] int64 (E, k, rank_e) per token, 0 <= k <= E <= E_max.
    num_rows: R, the rows of the slot layout (>= E + E * rank_e for every token).
    Returns [T, R] float32 on logits' device.
    """
    num_tokens, e_max = logits.shape
    device = logits.device
    num_experts, top_k, expert_rank = meta[:, 0:1], meta[:, 1:2], meta[:, 2:3]
    rows = torch.arange(num_rows, device=device).unsqueeze(0)  # [1, R]
    gate = torch.ones(num_tokens, num_rows, dtype=torch.float32, device=device)
    if e_max == 0:
        return gate
    cols = torch.arange(e_max, device=device).unsqueeze(0)
    masked = logits.float().masked_fill(cols >= num_experts, float("-inf"))
    # A token without a router (E = 0) has no finite logit: give it a dummy one, its gate
    # is all ones below anyway.
    masked[:, 0] = torch.where(num_experts[:, 0] > 0, masked[:, 0], 0.0)
    probs = torch.softmax(masked, dim=-1)
    # Each token's own torch.topk(probs[:E], k) (not a top-E_max sort: its ties differ).
    kept = topk_kept(probs, num_experts[:, 0], top_k[:, 0])
    expert_w = torch.where(kept, probs, 0.0)
    expert_w = expert_w / expert_w.sum(dim=-1, keepdim=True).clamp(
        min=torch.finfo(torch.float32).tiny)
    value = rows - num_experts  # value row index past the router rows
    is_router = rows < num_experts
    is_expert = (value >= 0) & (value < num_experts * expert_rank)
    expert_of_row = torch.where(is_expert, value // expert_rank.clamp(min=1), 0)
    routed = torch.gather(expert_w, 1, expert_of_row.clamp(max=e_max - 1))
    gate = torch.where(is_expert, routed, gate)
    return gate.masked_fill(is_router, 0.0)
