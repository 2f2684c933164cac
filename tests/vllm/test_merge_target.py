"""What GOAT_VLLM_MERGE_STATIC selects (merge.py) and what a slot then carries (the loader's
rows, the front end's row count), in goat-serve's own environment: no vLLM needed."""

import shutil
from pathlib import Path

import pytest

from goat_runtime.adapters.format import load_adapter
from goat_runtime.adapters.static import StaticComponents
from goat_runtime.vllm_plugin import merge
from goat_runtime.vllm_plugin.loader import stacked_factors
from goat_runtime.vllm_plugin.state import STATE, MergeTarget, linear_shapes
from goat_runtime.vllm_plugin.validate import lora_rows

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"
ADAPTERS = FIXTURE / "adapters"


@pytest.fixture
def shapes() -> dict[str, tuple[int, int]]:
    return linear_shapes(FIXTURE / "base")


def target_for(monkeypatch, value: str, shapes) -> MergeTarget | None:
    monkeypatch.setenv(merge.ENV, value)
    monkeypatch.setattr(STATE, "merge_target", None)
    return merge.merge_target(shapes)


def test_store_and_single_adapter_select_the_shared_signature(monkeypatch, shapes):
    goat0 = load_adapter(ADAPTERS / "goat0", shapes)
    lora0 = load_adapter(ADAPTERS / "lora0", shapes)
    from_store = target_for(monkeypatch, str(ADAPTERS), shapes)
    from_adapter = target_for(monkeypatch, str(ADAPTERS / "goat0"), shapes)
    assert from_store == from_adapter
    assert from_store.signature == goat0.signature
    assert from_store.modules == frozenset(goat0.layers)
    assert from_store.covered(goat0) == frozenset(goat0.layers)
    assert from_store.covered(lora0) == frozenset()
    assert target_for(monkeypatch, "", shapes) is None


def test_bad_settings_are_clear_errors(monkeypatch, shapes, tmp_path):
    with pytest.raises(RuntimeError, match="is not a directory"):
        target_for(monkeypatch, str(tmp_path / "missing"), shapes)
    shutil.copytree(ADAPTERS / "lora0", tmp_path / "lora0")
    with pytest.raises(RuntimeError, match="holds no readable GOAT adapter"):
        target_for(monkeypatch, str(tmp_path), shapes)


def test_covered_modules_carry_no_static_rows(monkeypatch, shapes, tmp_path):
    goat0 = load_adapter(ADAPTERS / "goat0", shapes)
    target = target_for(monkeypatch, str(ADAPTERS), shapes)
    covered = frozenset(sorted(goat0.layers)[:3])
    from safetensors.torch import load_file

    weights = {k.removesuffix(".weight"): v for k, v in
               load_file(str(FIXTURE / "base" / "model.safetensors")).items() if k in
               {f"{m}.weight" for m in shapes}}
    stacked = stacked_factors(goat0, StaticComponents(weights, tmp_path), covered)
    rows = lora_rows(goat0, covered)
    for module, (shrink, expand, (e, _, _)) in stacked.items():
        layer = goat0.layers[module]
        expected = e + layer.rank + (0 if module in covered else goat0.signature.rank)
        assert shrink.shape[0] == expand.shape[1] == rows[module] == expected, module
    assert lora_rows(goat0, target.covered(goat0)) == {
        m: layer.num_experts + layer.rank for m, layer in goat0.layers.items()}


def test_merged_layers_must_be_wrapped_by_goat_layers():
    """A merged term on a layer vLLM serves no LoRA on could not be undone: refused."""
    import torch

    from goat_runtime.vllm_plugin.layers import GoatLinearMixin

    model = torch.nn.ModuleDict({"q": torch.nn.Linear(4, 4), "o": torch.nn.Linear(4, 4)})
    for layer in model.values():
        layer.goat_undo = (torch.zeros(1, 4), torch.zeros(4, 1), torch.zeros(1, dtype=torch.long))
    wrapper = GoatLinearMixin.__new__(GoatLinearMixin)
    wrapper.base_layer = model["q"]
    with pytest.raises(RuntimeError, match=r"merged into 1 layers .* \(e\.g\. o\)"):
        merge.check_undone(model, {"q": wrapper})
    other = GoatLinearMixin.__new__(GoatLinearMixin)
    other.base_layer = model["o"]
    merge.check_undone(model, {"q": wrapper, "o": other})
