"""The Llama-family model executor: config, checkpoint loader, layers, model."""

from goat_runtime.model.config import ModelConfig
from goat_runtime.model.llama import LlamaForCausalLM
from goat_runtime.model.loader import load_model

__all__ = ["LlamaForCausalLM", "ModelConfig", "load_model"]
