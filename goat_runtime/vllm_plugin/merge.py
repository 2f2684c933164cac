"""Static components merged into vLLM's base weights (opt-in: GOAT_VLLM_MERGE_STATIC).

Every GOAT adapter of one init signature carries the same static residual D C per module
(`goat_runtime.adapters.static`). Served as extra LoRA rows, each slot re-reads it for its own
tokens; merged, the base weights hold it once and the adapters of that signature drop those
rows. What is merged is undone, as a low-rank term in `layers.py`, for every token that must
not see it (base requests, plain LoRA adapters, other signatures, modules an adapter does not
target), so merging changes speed, never results.

GOAT_VLLM_MERGE_STATIC lists (os.pathsep-separated) GOAT adapter directories and directories of
adapters; the signature most of those GOAT adapters share is merged, on the modules they
target. Every vLLM process reads it, so every tensor-parallel rank merges the same terms. The
merge happens while vLLM loads the base weights, before its CPU layers repack them.
"""

import logging
import os
from pathlib import Path
from typing import Any

import torch

from goat_runtime.adapters.format import AdapterError, read_signature
from goat_runtime.adapters.static import Factors, most_common_signature
from goat_runtime.vllm_plugin.state import (
    STATE,
    MergeTarget,
    base_checkpoint,
    is_goat_dir,
    set_base_model,
)

logger = logging.getLogger(__name__)

ENV = "GOAT_VLLM_MERGE_STATIC"



def merge_target(shapes: dict[str, tuple[int, int]]) -> MergeTarget | None:
    """What GOAT_VLLM_MERGE_STATIC asks to merge, for a base with these Linear shapes (read
    once per value of the variable)."""
    value = os.environ.get(ENV, "")
    if STATE.merge_target is not None and STATE.merge_target[0] == value:
        return STATE.merge_target[1]
    target = None
    if value:
        dirs = []
        for part in value.split(os.pathsep):
            root = Path(part)
            if not root.is_dir():
                raise RuntimeError(f"goat vLLM plugin: {ENV}: {part} is not a directory")
            dirs += [root] if is_goat_dir(str(root)) else sorted(
                p for p in root.iterdir() if is_goat_dir(str(p)))
        adapters = []
        for path in dirs:
            try:
                adapters.append(read_signature(path, shapes))
            except AdapterError as exc:
                logger.warning("goat vLLM plugin: %s: skipping %s: %s", ENV, path, exc)
        chosen = most_common_signature(adapters)
        if chosen is None:
            raise RuntimeError(f"goat vLLM plugin: {ENV}={value} holds no readable GOAT "
                               f"adapter for this base model")
        signature, modules, count = chosen
        target = MergeTarget(signature, modules)
        logger.info("goat vLLM plugin: merging the static components of %s (%d adapters, %d "
                    "modules) into the base weights", signature.slug(), count, len(modules))
    STATE.merge_target = (value, target)
    return target


def _sub_modules(model: torch.nn.Module, name: str,
                 layer: Any) -> list[tuple[str, int | str | None]]:
    """The checkpoint modules packed into vLLM's layer `name`, with each one's shard id for
    the layer's weight loader."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    prefix, _, last = name.rpartition(".")
    subs = getattr(model, "packed_modules_mapping", {}).get(last, [last])
    full = [f"{prefix}.{sub}" if prefix else sub for sub in subs]
    if isinstance(layer, QKVParallelLinear) and len(full) == 3:
        return list(zip(full, ("q", "k", "v"), strict=True))
    if isinstance(layer, MergedColumnParallelLinear) and len(full) > 1:
        return list(zip(full, range(len(full)), strict=True))
    return [(full[0], None)]


def _shard(layer: Any, full: torch.Tensor, shape: tuple[int, int],
           shard_id: int | str | None) -> torch.Tensor:
    """`full` (a factor of one checkpoint module, unsharded) cut as vLLM cuts that module's
    weight on this rank, into a zero tensor of the layer's local `shape`: the layer's own
    weight loader does the cutting, so every parallel layout vLLM knows is covered."""
    from vllm.model_executor.parameter import ModelWeightParameter

    param = ModelWeightParameter(data=torch.zeros(shape, dtype=full.dtype, device=full.device),
                                 input_dim=1, output_dim=0,
                                 weight_loader=layer.weight.weight_loader)
    if shard_id is None:
        param.weight_loader(param, full)
    else:
        param.weight_loader(param, full, shard_id)
    data: torch.Tensor = param.data
    return data


def merge_into_model(model: torch.nn.Module, model_config: Any) -> None:
    """Add the target's static terms to the model's Linear weights (this rank's shards) and
    leave on each such layer `goat_undo` = (C [R, d_in_local], D [d_out_local, R], slice of
    each of the R rows), R = the static rank times the merged sub-modules."""
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.linear import LinearBase, RowParallelLinear

    if get_current_vllm_config().lora_config is None:
        # Without LoRA layers nothing would undo the merged term for base requests.
        raise RuntimeError(f"goat vLLM plugin: {ENV} is set but LoRA is not enabled: start "
                           f"vLLM with --enable-lora, or unset {ENV}")
    set_base_model(model_config.model, model_config.revision)
    base = base_checkpoint()
    target = merge_target(base.shapes)
    if target is None:
        return
    factors: dict[str, Factors] = base.static.factors(target.signature, sorted(target.modules))
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase) or not hasattr(layer, "weight"):
            continue
        weight = layer.weight.data
        parts = [(s, sub, shard) for s, (sub, shard)
                 in enumerate(_sub_modules(model, name, layer)) if sub in factors]
        if not parts:
            continue
        row_parallel = isinstance(layer, RowParallelLinear)
        cs, ds, slices = [], [], []
        for s, sub, shard in parts:
            c, d = (f.to(device=weight.device, dtype=weight.dtype) for f in factors[sub])
            rank = c.shape[0]
            cs.append(_shard(layer, c, (rank, weight.shape[1]), None) if row_parallel else c)
            ds.append(d if row_parallel else _shard(layer, d, (weight.shape[0], rank), shard))
            slices += [s] * rank
        c_all, d_all = torch.cat(cs).contiguous(), torch.cat(ds, dim=1).contiguous()
        if tuple(d_all.shape[:1] + c_all.shape[1:]) != tuple(weight.shape):
            raise RuntimeError(f"goat vLLM plugin: cannot merge static components into {name}: "
                               f"factors {tuple(d_all.shape)} x {tuple(c_all.shape)}, weight "
                               f"{tuple(weight.shape)}")
        weight += d_all @ c_all
        layer.goat_undo = (c_all, d_all,
                           torch.tensor(slices, dtype=torch.long, device=weight.device))
        STATE.merged_layers += 1
    if STATE.merged_layers == 0:
        raise RuntimeError(f"goat vLLM plugin: {ENV}: none of the {len(target.modules)} modules "
                           f"to merge (e.g. {min(target.modules)}) is a Linear layer of the "
                           f"model vLLM loaded")


def check_undone(model: torch.nn.Module, lora_modules: dict[str, Any]) -> None:
    """Raise unless every layer holding a merged term is wrapped by a GOAT LoRA layer, the
    only place the term is undone for the tokens that must not see it."""
    from goat_runtime.vllm_plugin.layers import GoatLinearMixin

    wrapped = {id(m.base_layer) for m in lora_modules.values() if isinstance(m, GoatLinearMixin)}
    # vars(): vLLM's LoRA layers forward attribute lookups to their base layer.
    bare = [name for name, layer in model.named_modules()
            if "goat_undo" in vars(layer) and id(layer) not in wrapped]
    if bare:
        raise RuntimeError(f"goat vLLM plugin: {ENV}: static components were merged into "
                           f"{len(bare)} layers vLLM does not serve LoRA on (e.g. {bare[0]}), "
                           f"where base requests could not have them undone")
