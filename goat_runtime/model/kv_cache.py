"""The paged KV cache's tensors: per layer, K and V as fixed-size blocks of tokens.

The model writes and reads them (`LlamaForCausalLM.attach_kv_cache`); which blocks belong to which
sequence is the engine's business (`goat_runtime.engine.block_allocator`). Token p of a sequence
lives at slot block_table[p // block_size] * block_size + p % block_size.
"""

import torch

from goat_runtime.model.config import ModelConfig


def block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, K and V."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


def cache_blocks_for_budget(memory_bytes: int, config: ModelConfig, block_size: int,
                            dtype: torch.dtype) -> int:
    """How many blocks fit in `memory_bytes` (0 if not even one does)."""
    if block_size < 1:
        raise ValueError(f"block_size must be positive, found {block_size}")
    return max(0, memory_bytes // block_bytes(config, block_size, dtype))


class KVCache:
    """k[layer] / v[layer]: [num_blocks, block_size, num_kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV cache needs at least one block of at least one token, "
                             f"got {num_blocks} blocks of {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
