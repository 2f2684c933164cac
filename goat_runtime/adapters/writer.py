"""Write adapters in the on-disk formats `format.load_adapter` reads (GOAT-PEFT, PEFT LoRA).

Used by the training tool, and by benchmarks and tests that need many adapters of a given shape
(`random_adapter`). GOAT checkpoints are written as the reference saves them, expert tensors
twice (`lora_A.<e>` and `moe_layer.experts.<e>.lora_A`), so what we write loads anywhere
the reference's do.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from goat_runtime.adapters.format import CONFIG_FILE, KEY_PREFIX, WEIGHTS_FILE, AdaptedLinear

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_adapter(path: str | Path, layers: Mapping[str, AdaptedLinear], *, kind: str, rank: int,
                 lora_alpha: float, base_model_name_or_path: str = "",
                 init_type: str = "goat", init_cof: float = 1.0,
                 dtype: torch.dtype = torch.float32, twin_copies: bool = True) -> Path:
    """Write `layers` (module name -> delta) as a GOAT (kind "goat") or LoRA adapter folder.

    The scale of each layer is implied by lora_alpha and the rank (as the loaders compute it),
    so pass the values the layers were built with. dtype: of the saved tensors; twin_copies:
    GOAT's experts saved twice, as the reference does (False: once, the smaller file a
    checkpoint trimmed of them is)."""
    if kind not in ("goat", "lora"):
        raise ValueError(f"kind must be 'goat' or 'lora', got {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    first = next(iter(layers.values()))
    for module, layer in layers.items():
        prefix = KEY_PREFIX + module
        a, b = layer.lora_a.to(dtype).contiguous(), layer.lora_b.to(dtype).contiguous()
        if kind == "lora":
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
            continue
        if layer.router is None:
            raise ValueError(f"layer {module} is a plain LoRA delta (no router); kind 'goat' "
                             f"needs GOAT layers")
        er = layer.expert_rank
        for e in range(layer.num_experts):
            a_e = a[e * er : (e + 1) * er].clone()
            b_e = b[:, e * er : (e + 1) * er].clone()
            tensors[f"{prefix}.lora_A.{e}.weight"] = a_e
            tensors[f"{prefix}.lora_B.{e}.weight"] = b_e
            if twin_copies:
                tensors[f"{prefix}.moe_layer.experts.{e}.lora_A.weight"] = a_e.clone()
                tensors[f"{prefix}.moe_layer.experts.{e}.lora_B.weight"] = b_e.clone()
        tensors[f"{prefix}.lora_gating.weight"] = layer.router.to(dtype).contiguous()
    targets = sorted({module.rsplit(".", 1)[-1] for module in layers})
    config = {
        "peft_type": kind.upper(), "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": lora_alpha, "target_modules": targets, "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path, "inference_mode": True,
    }
    if kind == "goat":
        config.update(num_experts=first.num_experts, top_k=first.top_k, init_type=init_type,
                      init_cof=init_cof)
    save_file(tensors, str(path / WEIGHTS_FILE))
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def random_adapter(path: str | Path, base_linears: Mapping[str, tuple[int, int]], *,
                   kind: str = "goat", rank: int = 8, num_experts: int = 8, top_k: int = 2,
                   lora_alpha: float = 16.0, seed: int = 0,
                   projections: tuple[str, ...] = ALL_PROJECTIONS,
                   dtype: torch.dtype = torch.float32, twin_copies: bool = True) -> Path:
    """An adapter with random weights on every base Linear whose name ends in `projections`:
    for benchmarks and tests that need adapters of realistic shapes, not trained ones."""
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for module, (d_out, d_in) in sorted(base_linears.items()):
        if module.rsplit(".", 1)[-1] not in projections:
            continue
        a = torch.randn(rank, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, rank, generator=gen) * 0.01
        router = torch.randn(num_experts, d_in, generator=gen) if kind == "goat" else None
        layers[module] = AdaptedLinear(a, b, router, top_k if kind == "goat" else 0, 1.0)
    return save_adapter(path, layers, kind=kind, rank=rank, lora_alpha=lora_alpha, dtype=dtype,
                        twin_copies=twin_copies)
