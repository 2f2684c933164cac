"""Install the hooks into a running vLLM process (idempotent: vLLM may load plugins
several times per process).

(a) `LoRAModel.from_local_checkpoint`: GOAT directories are read by goat-serve's loader
    (`loader.py`); every other checkpoint goes to vLLM's own loader.
(b) `vllm.lora.utils._all_lora_classes`: each stock linear LoRA class is replaced, in place so
    the matching order is kept, by a subclass with the GOAT gate (`layers.py`); the logits
    processor's LoRA class likewise.
(c) `LoRAModelManager.activate_adapter`: after vLLM copies an adapter into a slot, each layer
    is told that slot's (E, k, rank_e) and float32 routers per slice (on the CPU it then copies
    the slot into the fused kernel's layout). `LoRAModelManager.__init__` is wrapped too,
    to learn the base checkpoint and refuse the options the hooks do not cover.
(d) the front end (`validate.py`): adapters are read and checked in the API-server process
    before a worker loads them, since a failed load in a worker stops vLLM's engine.
(e) `process_weights_after_loading` of vLLM's model loader: with GOAT_VLLM_MERGE_STATIC set,
    static components are merged into the base weights first (`merge.py`).
"""

import functools
import logging
import os

logger = logging.getLogger(__name__)

_installed = False
_goat_classes: dict[type, type] = {}


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

    if stock not in _goat_classes:
        _goat_classes[stock] = type(
            f"Goat{stock.__name__}", (GoatLinearMixin, stock),
            {"goat_row_parallel": issubclass(stock, RowParallelLinearWithLoRA),
             "__module__": __name__})
    return _goat_classes[stock]


def check_lora_config(lora_config) -> None:
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
    global _installed
    if _installed:
        return
    import vllm.lora.utils as lora_utils
    import vllm.model_executor.model_loader.base_loader as base_loader
    from vllm.lora.layers import LogitsProcessorWithLoRA
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager

    from goat_runtime.vllm_plugin import loader, merge, validate
    from goat_runtime.vllm_plugin.layers import GoatLinearMixin, GoatLogitsMixin

    # (b) the layer classes, in place.
    linear = set(_linear_classes())
    lora_utils._all_lora_classes = tuple(
        goat_class(c) if c in linear else c for c in lora_utils._all_lora_classes)
    lora_utils.LogitsProcessorWithLoRA = type(
        "GoatLogitsProcessorWithLoRA", (GoatLogitsMixin, LogitsProcessorWithLoRA),
        {"__module__": __name__})

    # (a) the loader.
    original_load = LoRAModel.from_local_checkpoint.__func__

    @functools.wraps(original_load)
    def from_local_checkpoint(cls, lora_dir, expected_lora_modules, peft_helper, *,
                              lora_model_id=None, device="cuda", dtype=None, **kwargs):
        if not loader.is_goat_dir(lora_dir):
            return original_load(cls, lora_dir, expected_lora_modules, peft_helper,
                                 lora_model_id=lora_model_id, device=device, dtype=dtype,
                                 **kwargs)
        from vllm.lora.utils import get_lora_id

        return loader.load_goat_lora_model(
            cls, lora_dir, lora_model_id=get_lora_id() if lora_model_id is None
            else lora_model_id, max_lora_rank=loader.max_lora_rank(), dtype=dtype,
            weights_mapper=kwargs.get("weights_mapper"))

    LoRAModel.from_local_checkpoint = classmethod(from_local_checkpoint)

    # (c) the manager: its creation and slot activation.
    original_init = LoRAModelManager.__init__

    @functools.wraps(original_init)
    def manager_init(self, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config")
        lora_config = kwargs.get("lora_config") or getattr(vllm_config, "lora_config", None)
        check_lora_config(lora_config)
        if vllm_config is not None:
            loader.set_base_model(vllm_config.model_config.model,
                                  vllm_config.model_config.revision,
                                  lora_config.max_lora_rank if lora_config else None)
        original_init(self, *args, **kwargs)
        if os.environ.get(merge.ENV):
            if merge.merged_layers == 0:
                raise RuntimeError(f"goat vLLM plugin: {merge.ENV} is set but no static "
                                   f"component was merged: the model was not loaded through "
                                   f"vLLM's default loader (load_format auto or safetensors)")
            merge.check_undone(self.model, self.modules)

    LoRAModelManager.__init__ = manager_init

    # (e) static components merged into the base weights while they load (merge.py), before
    # vLLM's CPU layers repack them.
    original_process = base_loader.process_weights_after_loading

    @functools.wraps(original_process)
    def process_weights_after_loading(model, model_config, target_device):
        if os.environ.get(merge.ENV):
            merge.merge_into_model(model, model_config)
        return original_process(model, model_config, target_device)

    base_loader.process_weights_after_loading = process_weights_after_loading

    original_activate = LoRAModelManager.activate_adapter

    @functools.wraps(original_activate)
    def activate_adapter(self, lora_id: int) -> bool:
        activated = original_activate(self, lora_id)
        if activated:
            index = self.lora_index_to_id.index(lora_id)
            meta = getattr(self._registered_adapters[lora_id], "goat_meta", None) or {}
            merged = getattr(self._registered_adapters[lora_id], "goat_merged", set())
            routers = getattr(self._registered_adapters[lora_id], "goat_routers", {})
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

    # (d) the front end: adapters are checked before a worker loads them (validate.py).
    validate.install()
    _installed = True
    logger.info("goat vLLM plugin: hooks installed")
