"""ModelConfig: the parts of a Hugging Face config.json the Llama-family executor needs.

Llama, Mistral, Qwen2 and Qwen3 share one decoder (pre-norm, RoPE, GQA attention, SwiGLU MLP);
they differ only in the flags kept here (biases, q/k norm, sliding windows, tied embeddings).
Anything else is refused with a ValueError naming it, so a checkpoint is never served wrong.
"""

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

# model_type -> the architecture class names that may accompany it.
SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters ("default", "linear" or "llama3" frequency scaling)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only: frequencies between the two wavelengths are interpolated.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """The per-pair inverse frequencies [head_dim / 2], float32, as transformers builds them."""
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        inv_freq = 1.0 / (self.theta**exponents)
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            old_len = self.original_max_position_embeddings
            low_freq_wavelen = old_len / self.low_freq_factor
            high_freq_wavelen = old_len / self.high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
            medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv_freq


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # qwen2 (always), llama/qwen3 with attention_bias
    o_bias: bool  # llama/qwen3 with attention_bias
    mlp_bias: bool  # llama with mlp_bias
    qk_norm: bool  # qwen3: RMSNorm over each head of q and k, before RoPE
    sliding_windows: tuple[int | None, ...]  # per layer; None: full attention
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        """Read config.json (and generation_config.json's eos ids, if present) in model_dir."""
        model_dir = Path(model_dir)
        config_file = model_dir / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{model_dir}: missing config.json")
        config = _read_json(config_file)
        generation_file = model_dir / "generation_config.json"
        parsed = cls.from_dict(config, source=str(config_file))
        if not generation_file.is_file():
            return parsed
        extra = _eos_ids(_read_json(generation_file).get("eos_token_id"), generation_file)
        return replace(parsed, eos_token_ids=tuple(dict.fromkeys(parsed.eos_token_ids + extra)))

    @classmethod
    def from_dict(cls, config: dict[str, Any], source: str = "config") -> "ModelConfig":
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})")
        for arch in config.get("architectures") or []:
            if arch != SUPPORTED_MODEL_TYPES[model_type]:
                raise ValueError(
                    f"{source}: architecture {arch!r} is not supported for model_type "
                    f"{model_type!r} (supported: {SUPPORTED_MODEL_TYPES[model_type]})")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"{source}: hidden_act {act!r} is not supported (supported: 'silu')")

        def integer(key: str, default: int | None = None) -> int:
            value = config.get(key)
            value = default if value is None else value
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: {key} must be a positive integer, found {value!r}")
            return value

        hidden, num_heads = integer("hidden_size"), integer("num_attention_heads")
        num_layers = integer("num_hidden_layers")
        num_kv_heads = integer("num_key_value_heads", num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{source}: num_attention_heads={num_heads} is not a multiple of "
                             f"num_key_value_heads={num_kv_heads}")
        # transformers' rule: derived from the hidden size, except qwen3 whose default is 128.
        head_dim = integer("head_dim", 128 if model_type == "qwen3" else hidden // num_heads)
        attention_bias = bool(config.get("attention_bias", False))
        max_positions = integer("max_position_embeddings", 2048)
        return cls(
            model_type=model_type,
            vocab_size=integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=integer("intermediate_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(config, source, max_positions),
            max_position_embeddings=max_positions,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_windows=_sliding_windows(config, source, model_type, num_layers),
            eos_token_ids=_eos_ids(config.get("eos_token_id"), source),
            bos_token_id=config.get("bos_token_id"),
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _eos_ids(value: Any, source: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{source}: eos_token_id must be an integer or a list of integers, "
                         f"found {value!r}")
    return tuple(ids)


def _rope_config(config: dict[str, Any], source: str, max_positions: int) -> RopeConfig:
    # transformers 5 writes "rope_parameters" (theta inside); older configs "rope_theta" plus an
    # optional "rope_scaling" dict whose type key is "rope_type" or, older still, "type".
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ValueError(f"{source}: rope parameters must be an object, found {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{source}: per-layer-type rope parameters are not supported")
    theta = float(params.get("rope_theta") or config.get("rope_theta") or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported (supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor is not supported")
    if rope_type == "default":
        return RopeConfig(theta)
    factor = params.get("factor")
    if not isinstance(factor, int | float) or factor <= 0:
        raise ValueError(f"{source}: rope type {rope_type!r} needs a positive factor, found "
                         f"{factor!r}")
    if rope_type == "linear":
        return RopeConfig(theta, "linear", float(factor))
    try:
        return RopeConfig(
            theta, "llama3", float(factor),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(
                params.get("original_max_position_embeddings", max_positions)))
    except KeyError as exc:
        raise ValueError(f"{source}: llama3 rope parameters lack {exc.args[0]!r}") from None


def _sliding_windows(config: dict[str, Any], source: str, model_type: str,
                     num_layers: int) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"{source}: sliding_window must be a positive integer or null, "
                         f"found {window!r}")
    if model_type == "mistral":  # one window for every layer, when set
        return (window,) * num_layers
    if model_type in ("qwen2", "qwen3") and config.get("use_sliding_window") and window:
        # transformers' rule: layers from max_window_layers on slide, unless layer_types says.
        layer_types = config.get("layer_types") or [
            "sliding_attention" if i >= config.get("max_window_layers", 28)
            else "full_attention" for i in range(num_layers)]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    return (None,) * num_layers
