"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3): forward(input_ids, positions).

Pre-norm decoder layers with fused q/k/v and gate/up projections, RoPE, GQA paged attention and
a SwiGLU MLP; the config's flags switch on biases, q/k norm and sliding windows.
"""

import torch
import torch.nn.functional as F
from torch import nn

from goat_runtime.model.config import ModelConfig
from goat_runtime.model.context import get_step_context
from goat_runtime.model.kv_cache import KVCache
from goat_runtime.model.layers import (
    AttentionFn,
    FusedLinear,
    PagedAttention,
    RMSNorm,
    RotaryEmbedding,
    _empty,
    apply_rotary,
    fast_linear,
    pack_for_onednn,
)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        c = config
        prefix = f"model.layers.{layer}.self_attn."
        self.q_size, self.kv_size = c.q_size, c.kv_size
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.qkv_proj = FusedLinear(
            c.hidden_size, [c.q_size, c.kv_size, c.kv_size],
            [prefix + n for n in ("q_proj", "k_proj", "v_proj")],
            bias=c.qkv_bias, dtype=dtype, device=device)
        self.o_proj = FusedLinear(c.q_size, [c.hidden_size], [prefix + "o_proj"],
                                  bias=c.o_bias, dtype=dtype, device=device)
        self.q_norm = self.k_norm = None
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype, device=device)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype=dtype, device=device)
        self.attn = PagedAttention(c.num_heads, c.num_kv_heads, c.head_dim,
                                   c.sliding_windows[layer])

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: AttentionFn | None = None) -> torch.Tensor:
        """attention: instead of the paged cache (e.g. `layers.DenseAttention` for training)."""
        qkv = self.qkv_proj(x)
        num_qk = self.num_heads + self.num_kv_heads
        v = qkv[:, self.q_size + self.kv_size :].view(-1, self.num_kv_heads, self.head_dim)
        qk = qkv[:, : self.q_size + self.kv_size].view(-1, num_qk, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, : self.num_heads]),
                            self.k_norm(qk[:, self.num_heads :])], dim=1)
        qk = apply_rotary(qk, cos, sin)  # q and k heads in one go
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        out = (self.attn(q, k, v) if attention is None
               else attention(q, k, v, self.attn.sliding_window))
        y: torch.Tensor = self.o_proj(out.view(-1, self.q_size))
        return y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        c = config
        prefix = f"model.layers.{layer}.mlp."
        self.intermediate_size = c.intermediate_size
        self.gate_up_proj = FusedLinear(
            c.hidden_size, [c.intermediate_size] * 2, [prefix + "gate_proj", prefix + "up_proj"],
            bias=c.mlp_bias, dtype=dtype, device=device)
        self.down_proj = FusedLinear(c.intermediate_size, [c.hidden_size],
                                     [prefix + "down_proj"], bias=c.mlp_bias, dtype=dtype,
                                     device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        y: torch.Tensor = self.down_proj(F.silu(gate) * up)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: torch.dtype,
                 device: torch.device | str):
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype, device=device)
        self.self_attn = Attention(config, layer, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype=dtype,
                                                device=device)
        self.mlp = MLP(config, layer, dtype, device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention: AttentionFn | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention)
        y: torch.Tensor = x + self.mlp(self.post_attention_layernorm(x))
        return y


class LlamaForCausalLM(nn.Module):
    """Parameters are allocated empty; goat_runtime.model.loader fills them."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.config = config
        self.embed_tokens = _empty(config.vocab_size, config.hidden_size, dtype=dtype,
                                   device=device)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, dtype, device) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else _empty(
            config.vocab_size, config.hidden_size, dtype=dtype, device=device)
        self.lm_head_packed: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attention: AttentionFn | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden], under a step context; or,
        given `attention` (e.g. `layers.DenseAttention`), without a KV cache or step context
        where no linear has routed adapter slots attached."""
        x = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attention)
        hidden: torch.Tensor = self.norm(x)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of the step context's logits_indices."""
        return self.logits(hidden[get_step_context().logits_indices])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, vocab] of hidden states [N, hidden] (any rows, no context)."""
        return fast_linear(hidden, self.lm_head, packed=self.lm_head_packed).float()

    def pack_weights(self) -> None:
        """Give every linear and lm_head a copy of its weight in oneDNN's blocked layout for
        decode-sized batches on the CPU in fp32 (`layers.pack_for_onednn`), at the cost of a
        second copy of those weights in memory. Call once the base weights are final (after
        loading and merging static terms): the copies are not refreshed."""
        for linear in self.fused_linears():
            linear.pack_weights()
        self.lm_head_packed = pack_for_onednn(self.lm_head.data)

    def attach_kv_cache(self, cache: KVCache) -> None:
        for i, layer in enumerate(self.decoder_layers()):
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = cache.k[i], cache.v[i]

    def decoder_layers(self) -> list[DecoderLayer]:
        """self.layers, typed."""
        return [m for m in self.layers if isinstance(m, DecoderLayer)]

    def fused_linears(self) -> list[FusedLinear]:
        """The linears adapters can target, in layer order."""
        return [m for m in self.modules() if isinstance(m, FusedLinear)]

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the tensor (or fused slice view) it is copied into."""
        targets = {"model.embed_tokens.weight": self.embed_tokens.data,
                   "model.norm.weight": self.norm.weight.data}
        if not self.config.tie_word_embeddings:
            targets["lm_head.weight"] = self.lm_head.data
        for i, layer in enumerate(self.decoder_layers()):
            prefix = f"model.layers.{i}."
            targets[prefix + "input_layernorm.weight"] = layer.input_layernorm.weight.data
            targets[prefix + "post_attention_layernorm.weight"] = \
                layer.post_attention_layernorm.weight.data
            attn = layer.self_attn
            for norm_name in ("q_norm", "k_norm"):
                norm = getattr(attn, norm_name)
                if norm is not None:
                    targets[f"{prefix}self_attn.{norm_name}.weight"] = norm.weight.data
        for linear in self.fused_linears():
            for s, name in enumerate(linear.slice_names):
                targets[name + ".weight"] = linear.slice_weight(s)
                bias = linear.slice_bias(s)
                if bias is not None:
                    targets[name + ".bias"] = bias
        return targets
