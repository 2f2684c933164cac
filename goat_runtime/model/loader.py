"""Load a Hugging Face checkpoint directory (config.json + safetensors shards) into the model.

Checkpoint tensors are copied into the model's parameters, q/k/v and gate/up into row slices of
their fused weights. Every expected tensor must be present with its exact shape, and every
tensor present must be used, so a mismatched checkpoint fails here, not with wrong outputs.
"""

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from goat_runtime.model.config import ModelConfig
from goat_runtime.model.llama import LlamaForCausalLM

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """model.safetensors, or the shards model.safetensors.index.json lists."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a safetensors index ({exc})") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise ValueError(f"{model_dir}: no model.safetensors or model.safetensors.index.json "
                         f"(only safetensors checkpoints are loaded)")
    for f in files:
        if not f.is_file():
            raise ValueError(f"{model_dir}: shard {f.name} listed in the index is missing")
    return files


def _ignored(name: str, config: ModelConfig) -> bool:
    # Old checkpoints save RoPE's inverse frequencies; tied models may also save lm_head.
    return name.endswith("rotary_emb.inv_freq") or (
        config.tie_word_embeddings and name == "lm_head.weight")


@torch.no_grad()  # not inference_mode: merging static terms later writes in place
def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype} is not supported (supported: float32, bfloat16)")
    config = ModelConfig.from_pretrained(model_dir)
    model = LlamaForCausalLM(config, dtype, device)
    targets = model.checkpoint_targets()
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if _ignored(name, config):
                        continue
                    if name not in targets:
                        raise ValueError(f"{path}: unexpected tensor {name!r} for a "
                                         f"{config.model_type} model with this config")
                    tensor, target = f.get_tensor(name), targets[name]
                    if tensor.shape != target.shape:
                        raise ValueError(f"{path}: {name} has shape {list(tensor.shape)}, "
                                         f"expected {list(target.shape)}")
                    target.copy_(tensor)
                    loaded.add(name)
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{path}: not a readable safetensors file: {exc}") from None
    missing = sorted(set(targets) - loaded)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {missing[0]!r} ({len(missing)} "
                         f"tensors missing in all)")
    return model.eval()
