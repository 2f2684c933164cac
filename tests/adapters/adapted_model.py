"""The fixture's base model (transformers' Llama) with adapters attached through the routed op:
the test bed for adapter loading, static components and the op, independent of the engine."""

from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from goat_runtime.adapters.format import Adapter, load_adapter
from goat_runtime.adapters.slots import allocate_slots, slice_rows, write_slot
from goat_runtime.adapters.static import StaticComponents
from goat_runtime.ops import RoutedLoRAWeights

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"


class RoutedLinear(torch.nn.Module):
    """A base Linear plus the routed delta of whatever adapter each token's slot holds."""

    def __init__(self, base: torch.nn.Linear, weights: RoutedLoRAWeights, model: "AdaptedModel"):
        super().__init__()
        self.base, self.weights, self.model = base, weights, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat_y = y.reshape(-1, y.shape[-1]).contiguous()
        self.model.op(flat_y, x.reshape(-1, x.shape[-1]).contiguous(), self.model.token_slots,
                      self.weights)
        return flat_y.view_as(y)


class AdaptedModel:
    """Adapters in slots 0..n-1 of every target Linear; `logits(ids, slot)` runs one sequence
    on `device` in `dtype` (built on the CPU, then moved) and returns its logits on the CPU."""

    def __init__(self, adapters_dirs: list[Path], op: Callable, *, merge: bool = False,
                 cache_dir: Path | None = None, scale_override: float | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = AutoModelForCausalLM.from_pretrained(FIXTURE / "base", dtype=dtype)
        self.model.eval()
        self.op = op
        linears = {name: m for name, m in self.model.named_modules()
                   if isinstance(m, torch.nn.Linear)}
        shapes = {name: tuple(m.weight.shape) for name, m in linears.items()}
        self.adapters: list[Adapter] = [
            load_adapter(d, shapes, scale_override=scale_override) for d in adapters_dirs]
        targets = sorted({m for a in self.adapters for m in a.layers})
        self.static = StaticComponents({m: linears[m].weight.data for m in targets}, cache_dir)
        if merge:
            first = next(a for a in self.adapters if a.signature is not None)
            self.static.merge(first.signature, first.layers)
        # Slot i holds adapter i; the last slot holds the base's own term (non-zero once merged).
        owners: list[Adapter | None] = [*self.adapters, None]
        terms = [self.static.static_terms(a) for a in owners]
        self.base_slot = len(self.adapters)
        for name in targets:
            needs = [slice_rows(a.layers.get(name) if a else None, t.get(name))
                     for a, t in zip(owners, terms, strict=True)]
            weights = allocate_slots(len(owners), [shapes[name][0]], shapes[name][1],
                                     value_rows=max(r for r, _ in needs),
                                     max_experts=max(e for _, e in needs))
            for slot, (a, t) in enumerate(zip(owners, terms, strict=True)):
                write_slot(weights, slot, [a.layers.get(name) if a else None], [t.get(name)])
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child,
                    RoutedLinear(linears[name], weights.to(device, dtype), self))
        self.device = device
        self.model.to(device)
        self.token_slots = torch.zeros(0, dtype=torch.int32, device=device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, slot: int) -> torch.Tensor:
        self.token_slots = torch.full((input_ids.numel(),), slot, dtype=torch.int32,
                                      device=self.device)
        return self.model(input_ids.view(1, -1).to(self.device)).logits[0].cpu()
