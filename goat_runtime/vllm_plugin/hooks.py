"""Install the hooks into a running vLLM process (idempotent: vLLM may load plugins
several times per process).

(a) `LoRAModel.from_local_checkpoint`: GOAT directories are read by goat-serve's loader
    (`loader.py`); every other checkpoint goes to vLLM's own loader.
(b) `vllm.lora.utils._all_lora_classes`: each stock linear LoRA class is replaced, in place so
    the matching order is kept, by a subclass with the GOAT gate (`layers.py`); the logits
    processor's LoRA class likewise.
(c) `LoRAModelManager.__init__`: learn the base checkpoint and --max-lora-rank, refuse the
    options the hooks do not cover, and check that merged static terms can be undone;
    `LoRAModelManager.activate_adapter`: after vLLM copies an adapter into a slot, each layer
    is told that slot's (E, k, rank_e) and float32 routers per slice (on the CPU it then copies
    the slot into the fused kernel's layout).
(d) the front end (`validate.py`): adapters are read and checked in the API-server process
    before a worker loads them, since a failed load in a worker stops vLLM's engine.
(e) `process_weights_after_loading` of vLLM's model loader: with GOAT_VLLM_MERGE_STATIC set,
    static components are merged into the base weights first (`merge.py`).
"""

import functools
import logging
import os
from typing import Any

import torch

from goat_runtime.vllm_plugin.state import STATE

logger = logging.getLogger(__name__)


def _linear_classes() -> list[type]:
    from vllm.lora import layers as L

    return [L.ColumnParallelLinearWithLoRA, L.MergedColumnParallelLinearWithLoRA,
            L.QKVParallelLinearWithLoRA, L.MergedQKVParallelLinearWithLoRA,
            L.MergedColumnParallelLinearVariableSliceWithLoRA, L.RowParallelLinearWithLoRA,
            L.ReplicatedLinearWithLoRA]


def goat_class(stock: type) -> type:
    """The GOAT subclass of a stock vLLM linear LoRA class."""
    from vllm.lora.layers import RowParallelLinearWithLoRA

    from goat_runtime.vllm_plugin.layers import GoatLinearMixin

    if stock not in STATE.goat_classes:
        STATE.goat_classes[stock] = type(
            f"Goat{stock.__name__}", (GoatLinearMixin, stock),
            {"goat_row_parallel": issubclass(stock, RowParallelLinearWithLoRA),
             "__module__": __name__})
    return STATE.goat_classes[stock]


def check_lora_config(lora_config: Any) -> None:
    """Refuse the LoRA options whose code paths bypass the GOAT layers."""
    from vllm import envs

    if lora_config is None:
        return
    if lora_config.fully_sharded_loras:
        raise RuntimeError(
            "goat vLLM plugin: --fully-sharded-loras is not supported (the sharded LoRA layers "
            "bypass the GOAT gate); run without it")
    if envs.VLLM_LORA_ENABLE_DUAL_STREAM:
        raise RuntimeError(
            "goat vLLM plugin: VLLM_LORA_ENABLE_DUAL_STREAM=1 is not supported (the dual-stream "
            "path bypasses the GOAT gate); unset it")


def install() -> None:
    """Install hooks (a) to (e), in that order, once per process."""
    if STATE.installed:
        return
    _hook_loader()
    _hook_layer_classes()
    _hook_manager_init()
    _hook_activate_adapter()
    from goat_runtime.vllm_plugin import validate

    validate.install()  # (d)
    _hook_weight_loading()
    STATE.installed = True
    logger.info("goat vLLM plugin: hooks installed")


def _hook_loader() -> None:
    """(a) GOAT directories through goat-serve's loader, every other one through vLLM's."""
    from vllm.lora.lora_model import LoRAModel

    from goat_runtime.vllm_plugin import loader
    from goat_runtime.vllm_plugin.state import is_goat_dir

    original_load = LoRAModel.from_local_checkpoint.__func__

    @functools.wraps(original_load)
    def from_local_checkpoint(cls: type[Any], lora_dir: str, expected_lora_modules: set[str],
                              peft_helper: Any, *, lora_model_id: int | None = None,
                              device: str = "cuda", dtype: torch.dtype | None = None,
                              **kwargs: Any) -> Any:
        if not is_goat_dir(lora_dir):
            return original_load(cls, lora_dir, expected_lora_modules, peft_helper,
                                 lora_model_id=lora_model_id, device=device, dtype=dtype,
                                 **kwargs)
        from vllm.lora.utils import get_lora_id

        return loader.load_goat_lora_model(
            cls, lora_dir, lora_model_id=get_lora_id() if lora_model_id is None
            else lora_model_id, max_lora_rank=STATE.max_lora_rank, dtype=dtype,
            weights_mapper=kwargs.get("weights_mapper"))

    # typeshed types functools.wraps' result as _Wrapped, which mypy does not take as
    # classmethod's callable (python/typeshed#10653); at run time it is the function itself.
    LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)  # type: ignore[arg-type]


def _hook_layer_classes() -> None:
    """(b) the linear LoRA classes and the logits processor's, swapped in place."""
    import vllm.lora.utils as lora_utils
    from vllm.lora.layers import LogitsProcessorWithLoRA

    from goat_runtime.vllm_plugin.layers import GoatLogitsMixin

    linear = set(_linear_classes())
    lora_utils._all_lora_classes = tuple(
        goat_class(c) if c in linear else c for c in lora_utils._all_lora_classes)
    lora_utils.LogitsProcessorWithLoRA = type(
        "GoatLogitsProcessorWithLoRA", (GoatLogitsMixin, LogitsProcessorWithLoRA),
        {"__module__": __name__})


def _hook_manager_init() -> None:
    """(c) the LoRA manager's creation: the base, --max-lora-rank, refusals, merged terms."""
    from vllm.lora.model_manager import LoRAModelManager

    from goat_runtime.vllm_plugin import merge
    from goat_runtime.vllm_plugin.state import set_base_model

    original_init = LoRAModelManager.__init__

    @functools.wraps(original_init)
    def manager_init(self: Any, *args: Any, **kwargs: Any) -> None:
        vllm_config = kwargs.get("vllm_config")
        lora_config = kwargs.get("lora_config") or getattr(vllm_config, "lora_config", None)
        check_lora_config(lora_config)
        if vllm_config is not None:
            set_base_model(vllm_config.model_config.model, vllm_config.model_config.revision,
                           lora_config.max_lora_rank if lora_config else None)
        original_init(self, *args, **kwargs)
        if os.environ.get(merge.ENV):
            if STATE.merged_layers == 0:
                raise RuntimeError(f"goat vLLM plugin: {merge.ENV} is set but no static "
                                   f"component was merged: the model was not loaded through "
                                   f"vLLM's default loader (load_format auto or safetensors)")
            merge.check_undone(self.model, self.modules)

    LoRAModelManager.__init__ = manager_init


def _hook_activate_adapter() -> None:
    """(c) slot activation: each GOAT layer gets the slot's metadata and float32 routers."""
    from vllm.lora.model_manager import LoRAModelManager

    from goat_runtime.vllm_plugin.layers import GoatLinearMixin
    from goat_runtime.vllm_plugin.loader import GoatMeta

    original_activate = LoRAModelManager.activate_adapter

    @functools.wraps(original_activate)
    def activate_adapter(self: Any, lora_id: int) -> bool:
        activated: bool = original_activate(self, lora_id)
        if activated:
            index = self.lora_index_to_id.index(lora_id)
            model = self._registered_adapters[lora_id]
            # loader.py's attributes; a stock vLLM LoRAModel has none
            meta: GoatMeta = getattr(model, "goat_meta", None) or {}
            merged: set[str] = getattr(model, "goat_merged", set())
            routers: dict[str, torch.Tensor] = getattr(model, "goat_routers", {})
            for name, module in self.modules.items():
                if isinstance(module, GoatLinearMixin):
                    subs = self.packed_modules.get(name, [name])
                    if len(subs) != module.n_slices:
                        subs = [name] * module.n_slices
                    module.set_goat_meta(index, [meta.get(s, (0, 0, 0)) for s in subs],
                                         [s in merged for s in subs],
                                         [routers.get(s) for s in subs])
        return activated

    LoRAModelManager.activate_adapter = activate_adapter


def _hook_weight_loading() -> None:
    """(e) static components merged into the base weights while they load (merge.py), before
    vLLM's CPU layers repack them."""
    import vllm.model_executor.model_loader.base_loader as base_loader

    from goat_runtime.vllm_plugin import merge

    original_process = base_loader.process_weights_after_loading

    @functools.wraps(original_process)
    def process_weights_after_loading(model: Any, model_config: Any,
                                      target_device: torch.device) -> None:
        if os.environ.get(merge.ENV):
            merge.merge_into_model(model, model_config)
        original_process(model, model_config, target_device)

    base_loader.process_weights_after_loading = process_weights_after_loading
