"""The Llama-family model executor: config, checkpoint loader, layers, model, the per-step
batch metadata its layers read (`context.py`) and the KV tensors they write (`kv_cache.py`).
Imports nothing above `goat_runtime.ops`."""

from goat_runtime.model.config import ModelConfig
from goat_runtime.model.llama import LlamaForCausalLM
from goat_runtime.model.loader import load_model

__all__ = ["LlamaForCausalLM", "ModelConfig", "load_model"]
