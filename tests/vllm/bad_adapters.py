"""Adapters that vLLM must refuse without stopping its engine, made next to the fixture's
(importable from both environments: torch, safetensors and goat_runtime only)."""

import shutil
from pathlib import Path

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"


def make_bad_adapters(root: Path) -> dict[str, Path]:
    """root/NAME for: "corrupt" (goat1 with a weights file that is not safetensors),
    "too_large" (GOAT r=16, E=8: 8 + 16 + 16 = 40 LoRA rows, over --max-lora-rank 32), and
    "goat0" (a good copy, so a resolver over root finds a servable adapter too)."""
    from goat_runtime.adapters.writer import random_adapter
    from goat_runtime.vllm_plugin.state import linear_shapes

    root.mkdir(parents=True, exist_ok=True)
    corrupt = root / "corrupt"
    shutil.copytree(FIXTURE / "adapters" / "goat1", corrupt, dirs_exist_ok=True)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not safetensors")
    too_large = random_adapter(root / "too_large", linear_shapes(FIXTURE / "base"), kind="goat",
                               rank=16, num_experts=8, top_k=2, seed=3)
    good = root / "goat0"
    shutil.copytree(FIXTURE / "adapters" / "goat0", good, dirs_exist_ok=True)
    return {"corrupt": corrupt, "too_large": Path(too_large), "goat0": good}
