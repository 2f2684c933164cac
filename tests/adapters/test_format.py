"""Adapter loading: the fixture's adapters load as their reference saved them; every bad adapter
fails with a message that says which file, which key, what was expected and what was found."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from goat_runtime.adapters.format import AdapterError, load_adapter, read_signature
from goat_runtime.adapters.writer import random_adapter
from tests.adapters.adapted_model import FIXTURE

HIDDEN, INTERMEDIATE, KV = 128, 352, 64
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTERMEDIATE, HIDDEN),
          "up_proj": (INTERMEDIATE, HIDDEN), "down_proj": (HIDDEN, INTERMEDIATE)}
BASE_LINEARS = {
    f"model.layers.{i}.{'self_attn' if n.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{n}": s  # noqa: E501
    for i in range(2) for n, s in SHAPES.items()
}
BASE_LINEARS["lm_head"] = (320, HIDDEN)
Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def copy_adapter(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURE / "adapters" / name, target)
    target.chmod(0o755)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "adapter_model.safetensors"))


def test_goat_adapter_loads_as_saved():
    adapter = load_adapter(FIXTURE / "adapters" / "goat0", BASE_LINEARS)
    assert adapter.kind == "goat" and adapter.name == "goat0"
    assert len(adapter.layers) == 14 and "lm_head" not in adapter.layers
    q = adapter.layers["model.layers.0.self_attn.q_proj"]
    assert (q.num_experts, q.top_k, q.expert_rank, q.rank) == (4, 2, 2, 8)
    assert q.scale == 16 / 2  # lora_alpha / expert rank
    assert tuple(q.lora_a.shape) == (8, 128) and tuple(q.lora_b.shape) == (128, 8)
    assert adapter.signature.slug() == "r8-e4-goat-c0.25"
    saved = load_file(str(FIXTURE / "adapters" / "goat0" / "adapter_model.safetensors"))
    torch.testing.assert_close(q.lora_a[2:4], saved[f"{Q0}.lora_A.1.weight"])
    torch.testing.assert_close(q.lora_b[:, 6:8], saved[f"{Q0}.lora_B.3.weight"])


def test_lora_adapter_loads_with_its_scale():
    adapter = load_adapter(FIXTURE / "adapters" / "lora0", BASE_LINEARS)
    assert adapter.kind == "lora" and adapter.signature is None
    down = adapter.layers["model.layers.1.mlp.down_proj"]
    assert (down.num_experts, down.rank, down.scale) == (0, 8, 2.0)


def test_rslora_rank_and_alpha_patterns(tmp_path):
    path = copy_adapter("lora0", tmp_path)
    pattern_rank = 4

    def shrink_q(tensors):
        for key in [k for k in tensors if "q_proj" in k]:
            tensors[key] = (tensors[key][:pattern_rank] if "lora_A" in key
                            else tensors[key][:, :pattern_rank]).contiguous()

    edit_tensors(path, shrink_q)
    edit_config(path, use_rslora=True, rank_pattern={"q_proj": pattern_rank},
                alpha_pattern={"layers.1.self_attn.q_proj": 8})
    adapter = load_adapter(path, BASE_LINEARS)
    assert adapter.layers["model.layers.0.self_attn.q_proj"].rank == pattern_rank
    assert adapter.layers["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / 2)
    assert adapter.layers["model.layers.1.self_attn.q_proj"].scale == pytest.approx(8 / 2)
    assert adapter.layers["model.layers.0.mlp.up_proj"].scale == pytest.approx(16 / 8**0.5)


def test_scale_override():
    adapter = load_adapter(FIXTURE / "adapters" / "goat0", BASE_LINEARS, scale_override=3.5)
    assert {layer.scale for layer in adapter.layers.values()} == {3.5}


def test_target_modules_as_regex(tmp_path):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, target_modules=r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj")
    assert len(load_adapter(path, BASE_LINEARS).layers) == 14


def expect_error(path: Path, *fragments: str, **kwargs) -> None:
    with pytest.raises(AdapterError) as info:
        load_adapter(path, BASE_LINEARS, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "nope", "adapter directory not found")


def test_missing_config(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    (path / "adapter_config.json").unlink()
    expect_error(path, str(path), "missing adapter_config.json")


def test_missing_weights(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    (path / "adapter_model.safetensors").unlink()
    expect_error(path, str(path), "missing adapter_model.safetensors")


def test_invalid_json(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    (path / "adapter_config.json").write_text('{"peft_type": "GOAT",')
    expect_error(path, "adapter_config.json", "invalid JSON")


def test_unknown_peft_type(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    edit_config(path, peft_type="IA3")
    expect_error(path, "adapter_config.json", "unknown peft_type 'IA3'", "'GOAT' or 'LORA'")


@pytest.mark.parametrize(("option", "value"), [
    ("use_dora", True), ("bias", "all"), ("lora_bias", True), ("modules_to_save", ["lm_head"]),
    ("layers_to_transform", [0]), ("fan_in_fan_out", True),
])
def test_unsupported_options(tmp_path, option, value):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, **{option: value})
    expect_error(path, "adapter_config.json", f"option {option}={value!r} is not supported")


@pytest.mark.parametrize(("changes", "message"), [
    ({"init_type": "pissa"}, "init_type 'pissa' is not supported"),
    ({"top_k": 5}, "top_k must be an integer in [1, num_experts=4], found 5"),
    ({"num_experts": 3}, "r=8 is not divisible by num_experts=3"),
    ({"use_rslora": True}, "use_rslora is not supported for GOAT"),
])
def test_unsupported_goat_configs(tmp_path, changes, message):
    path = copy_adapter("goat0", tmp_path)
    edit_config(path, **changes)
    expect_error(path, "adapter_config.json", message)


def test_module_absent_from_base(tmp_path):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, target_modules=["q_proj", "c_attn"])
    expect_error(path, "target module 'c_attn' matches no Linear layer", "q_proj")


def test_key_for_module_absent_from_base(tmp_path):
    path = copy_adapter("lora0", tmp_path)
    extra = "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"
    edit_tensors(path, lambda t: t.update({extra: torch.zeros(8, 128)}))
    expect_error(path, "adapter_model.safetensors", f"unexpected key {extra!r}")


def test_shape_mismatch(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    key = f"{Q0}.lora_B.2.weight"
    edit_tensors(path, lambda t: t.update({key: torch.zeros(96, 2)}))
    expect_error(path, "adapter_model.safetensors", key, "shape [96, 2], expected [128, 2]")


def test_missing_key(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    key = f"{Q0}.lora_gating.weight"
    edit_tensors(path, lambda t: t.pop(key))
    expect_error(path, "adapter_model.safetensors", f"missing key {key!r}")


def test_twin_expert_copies_must_agree(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    key = f"{Q0}.moe_layer.experts.1.lora_A.weight"
    edit_tensors(path, lambda t: t.update({key: t[key] + 1}))
    expect_error(path, key, "differs from its twin")


def test_rank_over_maximum():
    expect_error(FIXTURE / "adapters" / "lora0", "rank 8, over the configured maximum 4",
                 max_rank=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(tmp_path, bad):
    path = copy_adapter("goat0", tmp_path)
    key = f"{Q0}.lora_A.0.weight"

    def poison(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 3] = bad

    edit_tensors(path, poison)
    expect_error(path, "adapter_model.safetensors", key, "NaN or Inf")


def test_integer_tensor(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    key = f"{Q0}.lora_B.1.weight"

    def to_int(tensors):
        tensors[key] = tensors[key].to(torch.int32)

    edit_tensors(path, to_int)
    expect_error(path, "adapter_model.safetensors", key, "expected a floating point tensor")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(tmp_path, damage):
    path = copy_adapter("goat0", tmp_path)
    weights = path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    expect_error(path, "adapter_model.safetensors", "not a readable safetensors file")


def test_pickle_checkpoint_is_refused_unopened(tmp_path):
    path = copy_adapter("lora0", tmp_path)
    (path / "adapter_model.safetensors").unlink()
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save({"trap": Trap()}, path / "adapter_model.bin")
    expect_error(path, "adapter_model.bin", "never unpickled")
    assert not marker.exists()


def test_failed_load_leaves_loaded_adapters_alone(tmp_path):
    """Loading is pure: a bad adapter raises before anything is shared with the served ones."""
    good = load_adapter(FIXTURE / "adapters" / "goat0", BASE_LINEARS)
    before = {m: layer.lora_a.clone() for m, layer in good.layers.items()}
    bad = copy_adapter("goat0", tmp_path)
    edit_tensors(bad, lambda t: t.update({f"{Q0}.lora_A.0.weight": torch.zeros(3, 3)}))
    with pytest.raises(AdapterError):
        load_adapter(bad, BASE_LINEARS, name="goat0")
    for module, value in before.items():
        assert torch.equal(good.layers[module].lora_a, value)


def naive_layers(path: Path, modules, num_experts: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each layer's (A, B, router) rebuilt tensor by tensor with safetensors' own loader."""
    saved = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for module in modules:
        prefix = f"base_model.model.{module}"
        out[module] = (
            torch.cat([saved[f"{prefix}.lora_A.{e}.weight"] for e in range(num_experts)]).float(),
            torch.cat([saved[f"{prefix}.lora_B.{e}.weight"] for e in range(num_experts)],
                      dim=1).float(),
            saved[f"{prefix}.lora_gating.weight"].float())
    return out


@pytest.mark.parametrize("num_experts", [4, 12])  # 12: lora_A.10 sorts between .1 and .2
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_goat_layers_match_a_tensor_by_tensor_read(tmp_path, num_experts, dtype):
    """The one-read loader stacks each module's experts as views where they lie back to back
    and tensor by tensor where not; both must give what the file says, as float32 copies."""
    path = random_adapter(tmp_path / "a", BASE_LINEARS, rank=2 * num_experts,
                          num_experts=num_experts, seed=num_experts)
    if dtype != torch.float32:
        edit_tensors(path, lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
    adapter = load_adapter(path, BASE_LINEARS)
    expected = naive_layers(path, adapter.layers, num_experts)
    assert set(adapter.layers) == set(BASE_LINEARS) - {"lm_head"}
    storages = {}
    for module, layer in adapter.layers.items():
        for got, want in zip((layer.lora_a, layer.lora_b, layer.router), expected[module],
                             strict=True):
            assert got.dtype == torch.float32 and got.is_contiguous()
            assert torch.equal(got, want)
            storages[got.untyped_storage().data_ptr()] = got.untyped_storage().nbytes()
    # Not views of the file: the storages hold these float32 tensors and nothing else (one
    # kind of module of every layer may share one).
    kept = sum(t.nbytes for layer in adapter.layers.values()
               for t in (layer.lora_a, layer.lora_b, layer.router))
    assert sum(storages.values()) == kept


def test_header_only_checks_do_not_need_every_tensor(tmp_path):
    """A tensor whose dtype is not float is refused by name even when it is a twin copy."""
    path = copy_adapter("goat0", tmp_path)
    key = f"{Q0}.moe_layer.experts.0.lora_A.weight"
    edit_tensors(path, lambda t: t.update({key: t[key].to(torch.int8)}))
    expect_error(path, "adapter_model.safetensors", key, "expected a floating point tensor")


# exclude_modules: PEFT's rule (a regex string the whole name must match, or names matched
# exactly or as a '.'-suffix); an excluded module is not adapted even where target_modules
# matches it.

def drop_tensors(path: Path, modules: set[str]) -> None:
    """Remove the tensors of `modules`, as PEFT saves an adapter that excludes them."""
    def module_of(key: str) -> str:
        return re.sub(r"\.(lora_|moe_layer\.).*", "", key.removeprefix("base_model.model."))

    def drop(tensors):
        for key in [k for k in tensors if module_of(k) in modules]:
            del tensors[key]

    edit_tensors(path, drop)


@pytest.mark.parametrize("kind", ["lora0", "goat0"])
@pytest.mark.parametrize(("exclude", "excluded"), [
    (["down_proj", "model.layers.0.self_attn.q_proj"],
     {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj",
      "model.layers.0.self_attn.q_proj"}),
    (r"model\.layers\.1\..*", {m for m in BASE_LINEARS if m.startswith("model.layers.1.")}),
])
def test_excluded_modules_are_not_adapted(tmp_path, kind, exclude, excluded):
    path = copy_adapter(kind, tmp_path)
    drop_tensors(path, excluded)
    edit_config(path, exclude_modules=exclude)
    adapter = load_adapter(path, BASE_LINEARS)
    assert set(adapter.layers) == set(BASE_LINEARS) - {"lm_head"} - excluded
    full = load_adapter(FIXTURE / "adapters" / kind, BASE_LINEARS)
    for module, layer in adapter.layers.items():
        assert torch.equal(layer.lora_b, full.layers[module].lora_b)


def test_excluded_module_has_no_delta_in_the_model(tmp_path):
    """Served through the routed op: excluding a module gives the logits of the same adapter
    with that module's delta zeroed, and differs from the adapter without the exclusion."""
    from goat_runtime.ops.reference import add_routed_lora_reference
    from tests.adapters.adapted_model import AdaptedModel

    excluded = {"model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"}
    path = copy_adapter("lora0", tmp_path / "excluding")
    drop_tensors(path, excluded)
    edit_config(path, exclude_modules=sorted(excluded))
    zeroed = copy_adapter("lora0", tmp_path / "zeroed")
    edit_tensors(zeroed, lambda t: t.update({
        f"base_model.model.{m}.lora_B.weight": torch.zeros_like(
            t[f"base_model.model.{m}.lora_B.weight"]) for m in excluded}))
    model = AdaptedModel([path, zeroed, FIXTURE / "adapters" / "lora0"],
                         add_routed_lora_reference)
    ids = torch.tensor([5, 17, 42, 99, 3, 250, 8])
    got, want, full = (model.logits(ids, slot) for slot in range(3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - full).abs().max() > 1e-3


def test_tensors_for_an_excluded_module_are_refused(tmp_path):
    """PEFT never creates the layer and ignores such tensors (load_state_dict strict=False);
    the file contradicts its config, so it is refused like any other unexpected key."""
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, exclude_modules=["model.layers.1.mlp.down_proj"])
    expect_error(path, "adapter_model.safetensors", "model.layers.1.mlp.down_proj",
                 "exclude_modules ['model.layers.1.mlp.down_proj'] excludes")


@pytest.mark.parametrize(("changes", "message"), [
    ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]},
     "excludes every module target_modules ['q_proj'] matches"),
    ({"target_modules": ["q_proj"], "exclude_modules": r".*q_proj"},
     "excludes every module"),
    ({"exclude_modules": 3}, "exclude_modules must be a list of module names or a regex string"),
    ({"exclude_modules": "(q_proj"}, "exclude_modules '(q_proj' is not a valid regular"),
    ({"target_modules": [1, 2]}, "target_modules must be a list of module names or a regex"),
])
def test_bad_exclude_modules(tmp_path, changes, message):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, **changes)
    expect_error(path, "adapter_config.json", message)


def test_unused_exclude_modules_are_harmless(tmp_path):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, exclude_modules=["lm_head", "embed_tokens"])  # PEFT only warns
    assert len(load_adapter(path, BASE_LINEARS).layers) == 14


# init_lora_weights: the initialisations that change the base weights are refused; the others
# leave the base alone, so the saved factors are the whole delta.

@pytest.mark.parametrize("init", [True, False, None, "gaussian", "eva", "orthogonal"])
def test_base_preserving_inits_load(tmp_path, init):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, init_lora_weights=init)
    assert len(load_adapter(path, BASE_LINEARS).layers) == 14


@pytest.mark.parametrize(("init", "how"), [
    ("pissa", "path_initial_model_for_weight_conversion"),
    ("pissa_niter_16", "path_initial_model_for_weight_conversion"),
    ("olora", "path_initial_model_for_weight_conversion"),
    ("OLoRA", "path_initial_model_for_weight_conversion"),
    ("corda", "path_initial_model_for_weight_conversion"),
    ("loftq", "the base model LoftQ produced"),
    ("lora_ga", "the base model LoRA-GA produced"),
])
def test_base_changing_inits_are_refused(tmp_path, init, how):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, init_lora_weights=init)
    expect_error(path, "adapter_config.json", f"init_lora_weights={init!r} is not supported",
                 "changes the base weights", how)


def test_goat_with_a_base_changing_init_is_refused(tmp_path):
    path = copy_adapter("goat0", tmp_path)
    edit_config(path, init_lora_weights="pissa")
    expect_error(path, "init_lora_weights='pissa' is not supported", "init_type")


def test_unknown_init_is_refused(tmp_path):
    path = copy_adapter("lora0", tmp_path)
    edit_config(path, init_lora_weights="magic")
    expect_error(path, "init_lora_weights='magic' is not supported (supported: True, False")


@pytest.mark.parametrize("name", ["goat0", "goat1", "lora0"])
def test_read_signature_is_load_adapters_from_the_config_alone(name: str, tmp_path: Path) -> None:
    """What merging picks by (a store of 1,000 adapters took minutes to load whole at start-up):
    the signature and modules load_adapter gives, with the weights never read."""
    adapter = load_adapter(FIXTURE / "adapters" / name, BASE_LINEARS)
    assert read_signature(FIXTURE / "adapters" / name, BASE_LINEARS) == (
        adapter.signature, frozenset(adapter.layers))
    path = tmp_path / name
    shutil.copytree(FIXTURE / "adapters" / name, path)
    (path / "adapter_model.safetensors").write_bytes(b"not read")  # the weights are not read
    assert read_signature(path, BASE_LINEARS) == (adapter.signature, frozenset(adapter.layers))
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"missing adapter_model\.safetensors"):
        read_signature(path, BASE_LINEARS)
