"""`--dtype` means the same for both engines: one function maps it to a dtype per device type."""

import pytest
import torch

from goat_runtime.engine.config import EngineConfig, resolve_dtype


def test_auto_is_float32_on_the_cpu_and_bfloat16_on_cuda() -> None:
    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype("auto", "cuda") == "bfloat16"
    for device in ("cpu", "cuda"):
        assert resolve_dtype("bfloat16", device) == "bfloat16"
        assert resolve_dtype("float32", device) == "float32"
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("float16", "cpu")


def test_engine_config_uses_it(tmp_path) -> None:
    config = EngineConfig(model_dir=tmp_path, device="cpu")
    assert config.torch_dtype == torch.float32
    assert EngineConfig(model_dir=tmp_path, device="cpu", dtype="bfloat16").torch_dtype == (
        torch.bfloat16)
