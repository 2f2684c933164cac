"""The model and adapters every benchmark and load test runs on: SmolLM2-135M's shapes with random
weights, and random GOAT and PEFT LoRA adapters for its projections.

Shared by benchmarks/ and loadtests/ (one owner for the SmolLM2 config and the writers). Random
weights are enough: the figures measured on them are throughput and memory, which depend on the
shapes, not on what the weights say. Goat-serve's real default model (SmolLM2-135M-Instruct)
comes from goat_runtime/default_model.py; this file only copies its shapes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from goat_runtime.model.config import ModelConfig

SMOLLM2_135M: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "torch_dtype": "float32",  # for vLLM's dtype auto-detection
}
# SmolLM2-135M's config at a two-layer toy's sizes: the device checks' CPU rehearsals.
TINY_SMOLLM2: dict[str, Any] = {
    **SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
NUM_ADAPTERS = 16  # adapters of each kind in the benchmarks' stores


def write_tokenizer(model_dir: Path, vocab_size: int, words: Sequence[str] = ()) -> None:
    """A word-level tokenizer over the whole vocabulary: id N is the token `wN`, except that
    `words` (if given) take ids 3, 4, ...; random weights need no real text, only a tokenizer
    that decodes every id. The load tests pass their prompt words, so that prompts of random
    words are distinct token sequences (one token per word) and no prefix cache skips them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    for i, word in enumerate(words):
        del vocab[f"w{3 + i}"]
        vocab[word] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w2", bos_token="w1",
                                   unk_token="w0")
    fast.save_pretrained(str(model_dir))


def write_random_model(model_dir: Path, config_dict: Mapping[str, Any] | None = None,
                       words: Sequence[str] = ()) -> ModelConfig:
    """A checkpoint of random fp32 weights with SmolLM2-135M's config (or `config_dict`), and
    `write_tokenizer`'s tokenizer (written last: its file marks a complete folder)."""
    import torch
    from safetensors.torch import save_file

    from goat_runtime.model.config import ModelConfig
    from goat_runtime.model.llama import LlamaForCausalLM

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(dict(config_dict or SMOLLM2_135M)))
    config = ModelConfig.from_pretrained(model_dir)
    model = LlamaForCausalLM(config, device="meta")
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, target in model.checkpoint_targets().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(target.shape)
        else:
            tensors[name] = torch.randn(target.shape, generator=gen) * 0.02
    save_file(tensors, str(model_dir / "model.safetensors"))
    write_tokenizer(model_dir, config.vocab_size, words)
    return config


def write_adapters(folder: Path, shapes: Mapping[str, tuple[int, int]], names: Sequence[str],
                   kind: str, *, rank: int = 8, num_experts: int = 8, top_k: int = 2,
                   seed: int = 0, dtype: torch.dtype | None = None,
                   twin_copies: bool = True) -> list[Path]:
    """Random adapters `folder/<name>` of `kind` ("goat" or "lora"), the i-th with seed
    `seed + i`, on all seven projections, saved as `save_adapter`'s dtype (None: float32) and
    twin_copies say; existing ones are kept."""
    import torch

    from goat_runtime.adapters.writer import random_adapter

    paths = []
    for i, name in enumerate(names):
        path = folder / name
        if not (path / "adapter_model.safetensors").is_file():
            random_adapter(path, shapes, kind=kind, rank=rank, num_experts=num_experts,
                           top_k=top_k, seed=seed + i, dtype=dtype or torch.float32,
                           twin_copies=twin_copies)
        paths.append(path)
    return paths


def write_goat_and_lora(goat_dir: Path, lora_dir: Path, shapes: Mapping[str, tuple[int, int]],
                        count: int = NUM_ADAPTERS) -> tuple[list[str], list[str]]:
    """The benchmarks' adapter stores: `count` GOAT adapters goat0, goat1, ... (r = 8, E = 8,
    k = 2, seeds 0, 1, ...) in goat_dir and as many PEFT LoRA adapters lora0, ... (r = 8, seeds
    100, 101, ...) in lora_dir (the same folder or two); returns their names."""
    goat = [f"goat{i}" for i in range(count)]
    lora = [f"lora{i}" for i in range(count)]
    write_adapters(goat_dir, shapes, goat, "goat", seed=0)
    write_adapters(lora_dir, shapes, lora, "lora", seed=100)
    return goat, lora
