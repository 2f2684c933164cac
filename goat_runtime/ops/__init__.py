"""Routed low-rank ops: the public op, its reference, and its CPU and GPU kernels."""

from goat_runtime.ops.routed_lora import RoutedLoRAWeights, add_routed_lora

__all__ = ["RoutedLoRAWeights", "add_routed_lora"]
