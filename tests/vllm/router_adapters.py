"""Two GOAT adapters that route alike in float32 and apart once their routers are rounded to
bfloat16, made next to the fixture's base (importable from both environments: torch,
safetensors and goat_runtime only).

Both have the same experts (E = 2, k = 1) and the same static term on every Linear of the base;
their routers read only input column 0, x0:
- "router_fine": rows (1 - 2^-10) e0 and (1 + 2^-10) e0. In float32 the logits differ by
  2^-9 x0, so expert 1 wins where x0 > 0 and expert 0 where x0 < 0. Rounded to bfloat16 both
  rows become e0 (the spacing near 1 is 2^-7): every token is a tie.
- "router_exact": rows -2^-10 e0 and +2^-10 e0, exact in bfloat16: the same logit difference,
  2^-9 x0, so the same softmax, the same choice and the same weight as router_fine's float32
  router, for every token.
Served with routers in float32, the two give bit-identical outputs at any served dtype; with
router_fine's routers rounded to bfloat16, its tokens with the other sign of x0 change expert.
"""

from pathlib import Path

import torch

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"
NUM_EXPERTS, RANK = 2, 4


def routers(d_in: int) -> dict[str, torch.Tensor]:
    fine, exact = torch.zeros(NUM_EXPERTS, d_in), torch.zeros(NUM_EXPERTS, d_in)
    fine[:, 0] = torch.tensor([1 - 2**-10, 1 + 2**-10])
    exact[:, 0] = torch.tensor([-(2**-10), 2**-10])
    return {"router_fine": fine, "router_exact": exact}


def make_router_adapters(root: Path) -> dict[str, Path]:
    from goat_runtime.adapters.format import AdaptedLinear
    from goat_runtime.adapters.writer import save_adapter
    from goat_runtime.vllm_plugin.state import linear_shapes

    gen = torch.Generator().manual_seed(0)
    layers: dict[str, dict[str, AdaptedLinear]] = {"router_fine": {}, "router_exact": {}}
    for module, (d_out, d_in) in sorted(linear_shapes(FIXTURE / "base").items()):
        a = torch.randn(RANK, d_in, generator=gen) / d_in**0.5
        b = torch.randn(d_out, RANK, generator=gen) * 0.2
        for name, router in routers(d_in).items():
            layers[name][module] = AdaptedLinear(a, b, router, 1, 1.0)
    return {name: save_adapter(root / name, by_module, kind="goat", rank=RANK, lora_alpha=RANK)
            for name, by_module in layers.items()}
