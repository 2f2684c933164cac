"""GOAT adapters outside the fixture's shape, served through the op, against the spec's forward
written here in plain PyTorch (GOAT_SPEC sections 2 and 3): dense routing (k = E), init_type
goat_mini, and a zero-initialised router (every expert tied for every token, broken as
torch.topk breaks ties). The expected logits come from the fixture's transformers Llama with
each target Linear replaced by that formula, computed from the adapter's safetensors and an SVD
of the base weight, never from the loader, the static-component code or the kernels tested."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from goat_runtime.adapters.format import AdaptedLinear
from goat_runtime.adapters.writer import ALL_PROJECTIONS, save_adapter
from goat_runtime.ops import add_routed_lora
from goat_runtime.ops.reference import add_routed_lora_reference
from tests.adapters.adapted_model import FIXTURE, AdaptedModel

OPS = {"reference": add_routed_lora_reference, "cpu": add_routed_lora}
IDS = torch.tensor([1, 5, 17, 42, 99, 7, 250, 3, 64, 128, 11])
# name: (init_type, E, k, init_cof, router): r = 8, lora_alpha = 16.
ADAPTERS = {
    "mini_dense": ("goat_mini", 4, 4, 0.5, "random"),
    "mini_top2": ("goat_mini", 4, 2, 0.5, "random"),
    "zero_router": ("goat", 8, 2, 0.125, "zero"),
}
RANK, ALPHA = 8, 16.0

TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def torch_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.topk(probs, k, dim=-1)


def lowest_index_topk(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule the kernels used to follow: among equal probabilities, the lower index."""
    values, indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


class SpecLinear(torch.nn.Module):
    """y = W' x + s sum_{e in I} w_e B_e A_e x (GOAT_SPEC sections 2 and 3)."""

    def __init__(self, weight: torch.Tensor, tensors: dict[str, torch.Tensor], prefix: str,
                 config: dict, topk: TopK):
        super().__init__()
        num_experts, rank = config["num_experts"], config["r"]
        rank_e = rank // num_experts
        self.scale = config["lora_alpha"] / rank_e
        self.top_k, self.topk = config["top_k"], topk
        self.gating = tensors[f"{prefix}.lora_gating.weight"]
        self.a = torch.stack([tensors[f"{prefix}.lora_A.{e}.weight"] for e in range(num_experts)])
        self.b = torch.stack([tensors[f"{prefix}.lora_B.{e}.weight"] for e in range(num_experts)])
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        span = min(weight.shape) // num_experts
        if config["init_type"] == "goat":
            sel = [e * span + i for e in range(num_experts) for i in range(rank_e)]
        else:  # goat_mini
            sel = [(e + 1) * span - rank_e + i for e in range(num_experts) for i in range(rank_e)]
        residual = u[:, sel] @ torch.diag(s[sel]) @ vh[sel]
        self.weight = (weight.double() - config["init_cof"] / 10 * residual).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(flat @ self.gating.T, dim=-1)
        top_w, top_i = self.topk(probs, self.top_k)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        gate = torch.zeros_like(probs).scatter(1, top_i, top_w)
        hidden = torch.einsum("erd,td->ter", self.a, flat)  # A_e x for every expert
        experts = torch.einsum("eor,ter->teo", self.b, hidden)  # B_e A_e x
        y = flat @ self.weight.T + self.scale * torch.einsum("te,teo->to", gate, experts)
        return y.view(*x.shape[:-1], -1)


@torch.no_grad()
def spec_logits(adapter_dir: Path, topk: TopK = torch_topk) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(FIXTURE / "base", dtype=torch.float32).eval()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and name.endswith(ALL_PROJECTIONS):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    SpecLinear(module.weight.data, tensors, f"base_model.model.{name}", config,
                               topk))
    return model(IDS.view(1, -1)).logits[0]


def write_adapter(path: Path, init_type: str, num_experts: int, top_k: int, init_cof: float,
                  router: str, seed: int) -> Path:
    base = AutoModelForCausalLM.from_pretrained(FIXTURE / "base", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ALL_PROJECTIONS):
            d_out, d_in = module.weight.shape
            a = torch.randn(RANK, d_in, generator=gen) / d_in**0.5
            b = torch.randn(d_out, RANK, generator=gen) * 0.05
            g = (torch.randn(num_experts, d_in, generator=gen) if router == "random"
                 else torch.zeros(num_experts, d_in))
            layers[name] = AdaptedLinear(a, b, g, top_k, ALPHA / (RANK // num_experts))
    return save_adapter(path, layers, kind="goat", rank=RANK, lora_alpha=ALPHA,
                        init_type=init_type, init_cof=init_cof)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec-adapters")
    return {name: write_adapter(root / name, *spec, seed=i)
            for i, (name, spec) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def expected(adapters) -> dict[str, torch.Tensor]:
    return {name: spec_logits(path) for name, path in adapters.items()}


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_served_logits_match_the_spec(op, adapters, expected, tmp_path):
    model = AdaptedModel(list(adapters.values()), OPS[op], cache_dir=tmp_path)
    for slot, name in enumerate(adapters):
        torch.testing.assert_close(model.logits(IDS, slot), expected[name], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_cases_are_not_vacuous(adapters, expected, tmp_path):
    """The tie rule and goat_mini's selection each move the logits far beyond the tolerance."""
    lowest = spec_logits(adapters["zero_router"], lowest_index_topk)
    assert (lowest - expected["zero_router"]).abs().max() > 1e-3
    as_goat = tmp_path / "as_goat"
    write_adapter(as_goat, "goat", *ADAPTERS["mini_dense"][1:], seed=0)
    assert (spec_logits(as_goat) - expected["mini_dense"]).abs().max() > 1e-3
