"""The model's custom ops: the routed low-rank op and paged decode attention, each with its
CPU kernel, GPU path and reference."""

from goat_runtime.ops.paged_attention import paged_decode_attention
from goat_runtime.ops.routed_lora import RoutedLoRAWeights, add_routed_lora

__all__ = ["RoutedLoRAWeights", "add_routed_lora", "paged_decode_attention"]
