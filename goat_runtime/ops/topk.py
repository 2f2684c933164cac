"""The experts torch.topk keeps, for a batch of tokens with different (E, k), on any device.

The reference's gate is `torch.topk(softmax(logits), k)` on the CPU, and its choice among equal
probabilities (a zero-initialised router ties all E experts of every token) is neither the
lowest nor the highest index: see `goat_runtime.ops.routed_lora` ("Ties"). On the CPU this asks
torch.topk itself, once per distinct (E, k); on CUDA, where torch.topk breaks ties its own
way, the Triton kernel replays the CPU's steps (`triton_kernel.topk_kept_triton`).
"""

import torch


def topk_kept(probs: torch.Tensor, num_experts: torch.Tensor,
              top_k: torch.Tensor) -> torch.Tensor:
    """Semantics: kept[t, e] = whether torch.topk(probs[t, :E_t], k_t) on the CPU returns e.

    probs: [T, E_max] float32 (columns past a row's E are ignored).
    num_experts, top_k: [T] integer (E_t, k_t), 0 <= k_t <= E_t <= E_max; E_t = 0: none kept.
    Returns [T, E_max] bool on probs' device.
    """
    if probs.is_cuda:
        from goat_runtime.ops.triton_kernel import topk_kept_triton

        return topk_kept_triton(probs, num_experts, top_k)
    kept = torch.zeros(probs.shape, dtype=torch.bool)
    pairs = torch.stack([num_experts, top_k], dim=1).long()
    for num, k in torch.unique(pairs, dim=0).tolist():
        if num == 0 or k == 0:
            continue
        rows = ((pairs[:, 0] == num) & (pairs[:, 1] == k)).nonzero().squeeze(1)
        chosen = torch.topk(probs[rows, :num], k, dim=-1).indices
        kept[rows.unsqueeze(1), chosen] = True
    return kept
