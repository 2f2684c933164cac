"""Bind adapters to a model's fused linears: one device slot per adapter in every linear.

A fused linear (q/k/v, gate/up, o, down) carries one RoutedLoRAWeights; its output slices are
named after the checkpoint's modules (model.layers.0.self_attn.q_proj, ...), the names adapters
and static components use. A slot's owner is an Adapter, or None for the base model (which
needs a slot only when a static component is merged: it must undo it).
"""

from collections.abc import Sequence
from pathlib import Path

import torch

from goat_runtime.adapters.format import Adapter
from goat_runtime.adapters.slots import allocate_slots, slice_rows, write_slot
from goat_runtime.adapters.static import StaticComponents
from goat_runtime.model.layers import FusedLinear


def linear_shapes(linears: Sequence[FusedLinear]) -> dict[str, tuple[int, int]]:
    """Module name -> (d_out, d_in) of every slice: what load_adapter checks adapters against.
    The one owner of these shapes: from a config alone, build the model on the meta device
    (`LlamaForCausalLM(config, device="meta").fused_linears()`, no weights)."""
    return {name: (size, linear.d_in) for linear in linears
            for name, size in zip(linear.slice_names, linear.out_sizes, strict=True)}


def slice_groups(linears: Sequence[FusedLinear]) -> tuple[tuple[str, ...], ...]:
    """Each fused linear's slice names, in order: the slot images a read lays an adapter out in
    (adapters/reader.py)."""
    return tuple(tuple(linear.slice_names) for linear in linears)


def base_linears(model_dir: str | Path) -> list[FusedLinear]:
    """The fused linears of the base model at `model_dir`, from its config.json alone (the
    model built on the meta device: shapes, no weights). Raises ValueError for a config
    goat-serve cannot serve."""
    from goat_runtime.model import LlamaForCausalLM, ModelConfig

    config = ModelConfig.from_pretrained(model_dir)
    return LlamaForCausalLM(config, torch.float32, device="meta").fused_linears()


def base_linear_shapes(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """`linear_shapes` of the base model at `model_dir` (see base_linears)."""
    return linear_shapes(base_linears(model_dir))


def slice_weights(linears: Sequence[FusedLinear]) -> dict[str, torch.Tensor]:
    """Module name -> a view of its rows in the fused weight, for StaticComponents (merging
    writes through the views into the weights the model runs with)."""
    return {name: linear.slice_weight(s) for linear in linears
            for s, name in enumerate(linear.slice_names)}


def bind_adapters(linears: Sequence[FusedLinear], owners: Sequence[Adapter | None],
                  static: StaticComponents | None) -> None:
    """Slot i of every linear holds owners[i]; each linear's slots are sized to fit exactly."""
    all_terms = [static.static_terms(a) if static is not None else {} for a in owners]
    for linear in linears:
        needs = [slice_rows(a.layers.get(n) if a else None, t.get(n))
                 for a, t in zip(owners, all_terms, strict=True) for n in linear.slice_names]
        linear.routed = allocate_slots(
            len(owners), linear.out_sizes, linear.d_in,
            value_rows=max(r for r, _ in needs), max_experts=max(e for _, e in needs),
            dtype=linear.weight.dtype, device=linear.weight.device)
        for slot, (a, t) in enumerate(zip(owners, all_terms, strict=True)):
            deltas = [a.layers.get(n) if a else None for n in linear.slice_names]
            write_slot(linear.routed, slot, deltas, [t.get(n) for n in linear.slice_names])
