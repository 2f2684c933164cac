"""The fixture's reference logits (saved by the GOAT and PEFT reference code) reproduced."""

import pytest
import torch
from safetensors.torch import load_file

from goat_runtime.ops import add_routed_lora
from goat_runtime.ops.reference import add_routed_lora_reference
from tests.adapters.adapted_model import FIXTURE, AdaptedModel
from tests.devices import DEVICES

ADAPTERS = ["goat0", "goat1", "lora0"]
REFERENCE = load_file(str(FIXTURE / "reference_outputs.safetensors"))
# op name -> (op, device): the plain-loop reference, and the public op on every device (the C++
# kernel on the CPU, the Triton kernel on CUDA), float32 throughout.
OPS = {"reference": (add_routed_lora_reference, "cpu"),
       **{device: (add_routed_lora, device) for device in DEVICES}}


@pytest.fixture(scope="module", params=[False, True], ids=["unmerged", "merged"])
def merged(request):
    return request.param


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_reference_logits(op, merged, tmp_path):
    function, device = OPS[op]
    model = AdaptedModel([FIXTURE / "adapters" / a for a in ADAPTERS], function, merge=merged,
                         cache_dir=tmp_path, device=device)
    for i in range(3):
        ids = REFERENCE[f"input_{i}"]
        for slot, name in enumerate(ADAPTERS):
            torch.testing.assert_close(model.logits(ids, slot), REFERENCE[f"{name}_logits_{i}"],
                                       atol=1e-4, rtol=0)
        torch.testing.assert_close(model.logits(ids, model.base_slot),
                                   REFERENCE[f"base_logits_{i}"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_static_term_matters(tmp_path):
    """Without the static correction the GOAT logits are off: the test above is not vacuous."""
    model = AdaptedModel([FIXTURE / "adapters" / "goat0"], add_routed_lora_reference,
                         cache_dir=tmp_path)
    for weights in (m.weights for m in model.model.modules() if hasattr(m, "weights")):
        weights.shrink[0, 0, 8:16].zero_()  # the static rows (r = 8 expert rows come first)
    ids = REFERENCE["input_1"]
    diff = (model.logits(ids, 0) - REFERENCE["goat0_logits_1"]).abs().max()
    assert diff > 1e-3
