"""Hook (a): read a GOAT adapter directory into vLLM's LoRAModel, through goat-serve's loader.

vLLM stores, per adapted sub-module and slot, one shrink matrix A (rows x d_in) and one expand
matrix B (d_out x rows), and adds B (A x). A GOAT adapter fits that shape with the routers
stacked in front (GOAT_SPEC section 4):

    shrink = [ G ; A_0 ; ... ; A_{E-1} ; C ]        [E + r + r_c, d_in]
    expand = [ 0 | s B_0 | ... | s B_{E-1} | D ]     [d_out, E + r + r_c]

with scaling 1; the layers in `layers.py` put the top-k gate between the two halves. (C, D) is
the static residual of the adapter's init signature (`goat_runtime.adapters.static`), computed
once from the base checkpoint's weights and cached on disk; it is left out where it is merged
into the base weights (`merge.py`). Checkpoints that are not GOAT go to
vLLM's own loader unchanged.
"""

import logging
from typing import Any

import torch

from goat_runtime.adapters.format import KEY_PREFIX, AdaptedLinear, Adapter, load_adapter
from goat_runtime.adapters.static import StaticComponents
from goat_runtime.vllm_plugin.merge import merge_target
from goat_runtime.vllm_plugin.state import base_checkpoint

logger = logging.getLogger(__name__)

# Per adapted sub-module (vLLM name): (num_experts, top_k, expert_rank); the layers read it.
GoatMeta = dict[str, tuple[int, int, int]]

def stacked_factors(adapter: Adapter, static: StaticComponents,
                    covered: frozenset[str] = frozenset()
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]]:
    """Per module: (shrink [E + r + r_c, d_in], expand [d_out, E + r + r_c], (E, k, rank_e)).
    Modules in `covered` have their static term merged into the base weights: r_c = 0."""
    terms = {} if adapter.signature is None else static.factors(adapter.signature, adapter.layers)
    out = {}
    for module, layer in adapter.layers.items():
        shrink = [_router(module, layer), layer.lora_a]
        d_out = layer.lora_b.shape[0]
        expand = [torch.zeros(d_out, layer.num_experts), layer.scale * layer.lora_b]
        if module in terms and module not in covered:
            c, d = terms[module]
            shrink.append(c)
            expand.append(d)
        out[module] = (torch.cat(shrink).float().contiguous(),
                       torch.cat(expand, dim=1).float().contiguous(),
                       (layer.num_experts, layer.top_k, layer.expert_rank))
    return out


def _router(module: str, layer: AdaptedLinear) -> torch.Tensor:
    if layer.router is None:  # load_adapter gives a GOAT adapter GOAT layers only
        raise ValueError(f"GOAT module {module} has no router")
    return layer.router


def load_goat_lora_model(lora_model_cls: Any, lora_dir: str, *, lora_model_id: int,
                         max_lora_rank: int, dtype: torch.dtype | None,
                         weights_mapper: Any = None) -> Any:
    """A vLLM LoRAModel for the GOAT directory lora_dir, with `goat_meta` attached."""
    from vllm.lora.lora_weights import LoRALayerWeights
    from vllm.lora.utils import parse_fine_tuned_lora_name

    base = base_checkpoint()
    adapter = load_adapter(lora_dir, base.shapes, max_rank=1 << 30)
    if adapter.kind != "goat":
        raise ValueError(f"{lora_dir} is not a GOAT adapter")
    loras: dict[str, LoRALayerWeights] = {}
    meta: GoatMeta = {}
    routers: dict[str, torch.Tensor] = {}
    target = merge_target(base.shapes)
    covered = target.covered(adapter) if target is not None else frozenset()
    merged: set[str] = set()
    rank = 0
    for module, (shrink, expand, module_meta) in stacked_factors(adapter, base.static,
                                                                 covered).items():
        rows = shrink.shape[0]
        if rows > max_lora_rank:
            raise ValueError(
                f"{lora_dir}: GOAT module {module} needs {rows} LoRA rows (E={module_meta[0]} "
                f"router rows + r={adapter.layers[module].rank} expert rows + "
                f"{rows - module_meta[0] - adapter.layers[module].rank} static rows), over "
                f"--max-lora-rank {max_lora_rank}; raise --max-lora-rank to one of vLLM's "
                f"allowed values >= {rows} (1, 8, 16, 32, 64, 128, 256, 320, 512)")
        name, _ = parse_fine_tuned_lora_name(f"{KEY_PREFIX}{module}.lora_A.weight",
                                             weights_mapper)
        loras[name] = LoRALayerWeights(name, rows, 1, shrink.to(dtype=dtype),
                                       expand.to(dtype=dtype), scaling=1.0)
        meta[name] = module_meta
        # The router also rides in the shrink, rounded to vLLM's LoRA dtype; the layers take
        # it from here instead, in float32 (layers.py).
        routers[name] = _router(module, adapter.layers[module]).float().contiguous()
        if module in covered:
            merged.add(name)
        rank = max(rank, rows)
    model = lora_model_cls(lora_model_id, rank, loras)
    model.goat_meta = meta
    model.goat_routers = routers  # float32 [E, d_in] per sub-module, whatever `dtype` is
    model.goat_merged = merged  # sub-modules whose static term is in the base weights
    logger.info("goat vLLM plugin: loaded GOAT adapter %s (%d modules, %d LoRA rows, "
                "static components %s)", lora_dir, len(loras), rank,
                "cached" if base.static.svd_runs == 0 else f"{base.static.svd_runs} SVDs")
    return model

