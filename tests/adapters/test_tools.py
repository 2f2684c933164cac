"""`adapters inspect|validate`: facts from the config and header only; validation against a base
model's shapes, with a clear message when the adapter was made for another base."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from goat_runtime.adapters.binding import base_linear_shapes
from goat_runtime.adapters.format import AdapterError, load_adapter
from server.adapters_cli import (
    inspect_adapter,
    main,
    validate_adapter,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"
ADAPTERS = FIXTURE / "adapters"
BASE = FIXTURE / "base"


def copy_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    target.chmod(0o755)
    for f in target.iterdir():
        f.chmod(0o644)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_inspect_goat():
    info = inspect_adapter(ADAPTERS / "goat0")
    assert info["kind"] == "GOAT" and info["name"] == "goat0"
    assert info["base_model_name_or_path"] == "base"
    assert len(info["modules"]) == 14 and info["modules"][0] == "model.layers.0.mlp.down_proj"
    assert sorted(info["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert (info["rank"], info["num_experts"], info["top_k"], info["expert_rank"]) == (8, 4, 2, 2)
    assert info["scale"] == 16 / 2
    assert info["init_signature"] == {"rank": 8, "num_experts": 4, "init_type": "goat",
                                      "init_cof": 0.25, "slug": "r8-e4-goat-c0.25"}
    assert info["size_bytes"] == (ADAPTERS / "goat0" / "adapter_model.safetensors").stat().st_size
    assert info["dtypes"] == ["F32"] and info["unrecognized_keys"] == []
    loaded = load_adapter(ADAPTERS / "goat0", base_linear_shapes(BASE))
    assert info["num_parameters"] == loaded.num_parameters
    assert info["stored_parameters"] > info["num_parameters"]  # the moe_layer twin copies
    json.dumps(info)  # serialisable as is


def test_inspect_lora():
    info = inspect_adapter(ADAPTERS / "lora0")
    assert info["kind"] == "LORA" and info["base_model_name_or_path"] == ""
    assert (info["rank"], info["scale"]) == (8, 2.0)
    assert info["num_experts"] is None and info["init_signature"] is None
    assert len(info["modules"]) == 14
    loaded = load_adapter(ADAPTERS / "lora0", base_linear_shapes(BASE))
    assert info["num_parameters"] == info["stored_parameters"] == loaded.num_parameters


def test_inspect_reads_the_header_only_validate_reads_values(tmp_path):
    path = copy_dir(ADAPTERS / "lora0", tmp_path / "lora0")
    weights = path / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights))
    assert inspect_adapter(path)["num_parameters"] == 37376
    with pytest.raises(AdapterError, match="NaN"):
        validate_adapter(path, BASE)


def test_pickle_checkpoints_are_refused_unopened(tmp_path):
    path = tmp_path / "pickled"
    path.mkdir()
    shutil.copy(ADAPTERS / "lora0" / "adapter_config.json", path)
    (path / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(AdapterError, match="never unpickled"):
        inspect_adapter(path)
    with pytest.raises(AdapterError, match="never unpickled"):
        validate_adapter(path, BASE)


def test_inspect_errors_name_the_file(tmp_path):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        inspect_adapter(tmp_path / "nothing")
    path = copy_dir(ADAPTERS / "goat0", tmp_path / "goat0")
    edit_json(path / "adapter_config.json", peft_type="IA3")
    with pytest.raises(AdapterError, match=r"adapter_config.json: unknown peft_type 'IA3'"):
        inspect_adapter(path)
    (path / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    edit_json(path / "adapter_config.json", peft_type="GOAT")
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        inspect_adapter(path)


def test_base_linear_shapes_from_the_config():
    shapes = base_linear_shapes(BASE)
    assert len(shapes) == 14
    assert shapes["model.layers.1.self_attn.k_proj"] == (64, 128)
    assert shapes["model.layers.0.mlp.down_proj"] == (128, 352)


@pytest.mark.parametrize("name", ["goat0", "goat1", "lora0"])
def test_fixture_adapters_validate(name):
    warnings = validate_adapter(ADAPTERS / name, BASE)
    if name == "lora0":  # its config records no base model
        assert len(warnings) == 1 and "no base_model_name_or_path" in warnings[0]
    else:
        assert warnings == []


def test_validate_wrong_base_says_what_does_not_fit(tmp_path):
    base = copy_dir(BASE, tmp_path / "wide-base")
    edit_json(base / "config.json", hidden_size=256, num_attention_heads=8,
              num_key_value_heads=4)
    with pytest.raises(AdapterError) as info:
        validate_adapter(ADAPTERS / "goat0", base)
    message = str(info.value)
    assert "adapter_model.safetensors: base_model.model.model.layers.0" in message
    assert "expected [2, 256]" in message
    assert f"checked against the base model {base}" in message
    assert "hidden size 256" in message and "records its base model as 'base'" in message


def test_validate_base_with_fewer_layers(tmp_path):
    base = copy_dir(BASE, tmp_path / "short-base")
    edit_json(base / "config.json", num_hidden_layers=1)
    with pytest.raises(AdapterError, match=r"unexpected key 'base_model\.model\.model\.layers\.1"):
        validate_adapter(ADAPTERS / "lora0", base)


def test_validate_warns_about_another_recorded_base(tmp_path):
    path = copy_dir(ADAPTERS / "goat0", tmp_path / "goat0")
    edit_json(path / "adapter_config.json", base_model_name_or_path="meta-llama/Llama-3.2-1B")
    (warning,) = validate_adapter(path, BASE)
    assert "'meta-llama/Llama-3.2-1B'" in warning and "may differ" in warning


def test_validate_max_rank():
    with pytest.raises(AdapterError, match="over the configured maximum 4"):
        validate_adapter(ADAPTERS / "goat0", BASE, max_rank=4)


def test_validate_needs_a_base_config(tmp_path):
    with pytest.raises(ValueError, match=r"missing config\.json"):
        validate_adapter(ADAPTERS / "goat0", tmp_path)


def test_validate_static_components_must_fit(tmp_path):
    # 64 experts of rank 2 on weights with at most 64 singular values: no room for the static
    # components, although every tensor shape fits.
    path = tmp_path / "goat-many-experts"
    path.mkdir()
    shutil.copy(ADAPTERS / "goat0" / "adapter_config.json", path)
    edit_json(path / "adapter_config.json", r=128, num_experts=64, lora_alpha=4)
    tensors = {}
    for module, (d_out, d_in) in base_linear_shapes(BASE).items():
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_gating.weight"] = torch.zeros(64, d_in)
        for e in range(64):
            tensors[f"{prefix}.lora_A.{e}.weight"] = torch.zeros(2, d_in)
            tensors[f"{prefix}.lora_B.{e}.weight"] = torch.zeros(d_out, 2)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    assert inspect_adapter(path)["init_signature"]["slug"] == "r128-e64-goat-c0.25"
    with pytest.raises(AdapterError, match=r"k_proj \[64, 128\] cannot host the GOAT static"):
        validate_adapter(path, BASE, max_rank=128)


def test_cli_inspect(capsys):
    assert main(["inspect", str(ADAPTERS / "goat0")]) == 0
    out = capsys.readouterr().out
    assert "GOAT adapter" in out and "r8-e4-goat-c0.25" in out
    assert "4 experts of rank 2, top-2 routing" in out and "367,344 bytes" in out
    assert main(["inspect", str(ADAPTERS / "lora0"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "LORA"


def test_cli_validate(capsys, tmp_path):
    assert main(["validate", str(ADAPTERS / "goat1"), "--model", str(BASE)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    assert main(["validate", str(ADAPTERS / "lora0"), "--model", str(BASE), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and len(result["warnings"]) == 1

    base = copy_dir(BASE, tmp_path / "base")
    edit_json(base / "config.json", intermediate_size=512)
    assert main(["validate", str(ADAPTERS / "goat0"), "--model", str(base)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ")
    assert "layers.0.mlp.gate_proj" in captured.err and "expected [512, 2]" in captured.err
    assert main(["validate", str(ADAPTERS / "goat0"), "--model", str(base), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and "expected" in result["error"]


def test_cli_validate_reports_config_refusals(capsys, tmp_path):
    """validate goes through load_adapter: a base-changing init and tensors for an excluded
    module are reported as the server would refuse them."""
    pissa = copy_dir(ADAPTERS / "lora0", tmp_path / "pissa")
    edit_json(pissa / "adapter_config.json", init_lora_weights="pissa_niter_4")
    assert main(["validate", str(pissa), "--model", str(BASE)]) == 1
    err = capsys.readouterr().err
    assert "init_lora_weights='pissa_niter_4' is not supported" in err
    assert "path_initial_model_for_weight_conversion" in err
    excluding = copy_dir(ADAPTERS / "lora0", tmp_path / "excluding")
    edit_json(excluding / "adapter_config.json", exclude_modules=r".*\.0\.self_attn\.q_proj")
    assert main(["validate", str(excluding), "--model", str(BASE), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert "model.layers.0.self_attn.q_proj" in result["error"]
    assert "exclude_modules" in result["error"]


def test_cli_inspect_shows_exclude_modules(capsys, tmp_path):
    path = copy_dir(ADAPTERS / "lora0", tmp_path / "lora")
    edit_json(path / "adapter_config.json", exclude_modules=["down_proj", "model.x.q_proj"])
    assert inspect_adapter(path)["exclude_modules"] == ["down_proj", "model.x.q_proj"]
    assert inspect_adapter(ADAPTERS / "lora0")["exclude_modules"] is None
    assert main(["inspect", str(path)]) == 0
    assert "excluded        down_proj, model.x.q_proj" in capsys.readouterr().out
