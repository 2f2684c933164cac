"""Bind adapters to a model's fused linears: one device slot per adapter in every linear.

A fused linear (q/k/v, gate/up, o, down) carries one RoutedLoRAWeights; its output slices are
named after the checkpoint's modules (model.layers.0.self_attn.q_proj, ...), the names adapters
and static components use. A slot's owner is an Adapter, or None for the base model (which
needs a slot only when a static component is merged: it must undo it).
"""

from collections.abc import Sequence

import torch

from goat_runtime.adapters.format import Adapter
from goat_runtime.adapters.slots import allocate_slots, slice_rows, write_slot
from goat_runtime.adapters.static import Factors, StaticComponents
from goat_runtime.model.layers import FusedLinear


def linear_shapes(linears: Sequence[FusedLinear]) -> dict[str, tuple[int, int]]:
    """Module name -> (d_out, d_in) of every slice: what load_adapter checks adapters against."""
    return {name: (size, linear.d_in) for linear in linears
            for name, size in zip(linear.slice_names, linear.out_sizes, strict=True)}


def slice_weights(linears: Sequence[FusedLinear]) -> dict[str, torch.Tensor]:
    """Module name -> a view of its rows in the fused weight, for StaticComponents (merging
    writes through the views into the weights the model runs with)."""
    return {name: linear.slice_weight(s) for linear in linears
            for s, name in enumerate(linear.slice_names)}


def _terms(owners: Sequence[Adapter | None],
           static: StaticComponents | None) -> list[dict[str, Factors]]:
    return [static.static_terms(a) if static is not None else {} for a in owners]


def allocate_adapter_slots(linears: Sequence[FusedLinear], num_slots: int, *, value_rows: int,
                           max_experts: int) -> None:
    """Attach zeroed slots to every linear, each holding up to `value_rows` expert plus static
    rows and `max_experts` router rows per slice."""
    for linear in linears:
        linear.routed = allocate_slots(num_slots, linear.out_sizes, linear.d_in,
                                       value_rows=value_rows, max_experts=max_experts,
                                       dtype=linear.weight.dtype, device=linear.weight.device)


def write_adapter_slot(linears: Sequence[FusedLinear], slot: int, owner: Adapter | None,
                       static: StaticComponents | None) -> None:
    """Write `owner`'s deltas and static terms into `slot` of every linear (zero where it has
    none). Raises ValueError if the slots were allocated too small for it."""
    (terms,) = _terms([owner], static)
    for linear in linears:
        if linear.routed is None:
            raise RuntimeError("allocate_adapter_slots first")
        deltas = [owner.layers.get(n) if owner else None for n in linear.slice_names]
        write_slot(linear.routed, slot, deltas, [terms.get(n) for n in linear.slice_names])


def bind_adapters(linears: Sequence[FusedLinear], owners: Sequence[Adapter | None],
                  static: StaticComponents | None) -> None:
    """Slot i of every linear holds owners[i]; each linear's slots are sized to fit exactly."""
    all_terms = _terms(owners, static)
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
