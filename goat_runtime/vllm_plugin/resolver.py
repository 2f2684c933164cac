"""A vLLM LoRA resolver for goat-serve's adapter directory: `model=NAME` in a request finds
the GOAT or LoRA adapter folder DIR/NAME, with the names and paths goat-serve's server accepts
(a safe name; a real folder inside DIR after symlinks; a GOAT or LORA adapter_config.json).

Enabled by GOAT_ADAPTER_DIR=DIR (vLLM also needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True to ask
resolvers at all)."""

import json
import os
import re
import zlib
from pathlib import Path
from typing import Any

from goat_runtime.adapters.format import CONFIG_FILE, WEIGHTS_FILE

# The same pattern as server.protocol.NAME_PATTERN (imported there with FastAPI models, which
# the vLLM side does not need).
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ENV_DIR = "GOAT_ADAPTER_DIR"


def adapter_id(name: str) -> int:
    """A stable positive int id per name: every API server process must agree on it."""
    return zlib.crc32(name.encode()) % (2**31 - 1) + 1


def find_adapter(root: Path, name: str) -> Path | None:
    """The adapter folder root/name if it is servable, else None."""
    if NAME_PATTERN.fullmatch(name) is None:
        return None
    root = root.resolve()
    path = (root / name).resolve()
    if path.parent != root or not path.is_dir():
        return None
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("peft_type") not in ("GOAT", "LORA"):
        return None
    if not (path / WEIGHTS_FILE).is_file():
        return None
    return path


def make_resolver(root: Path) -> Any:
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver

    class GoatAdapterResolver(LoRAResolver):  # type: ignore[misc]  # vllm is untyped here
        """Resolves adapter names to folders of goat-serve's adapter directory."""

        def __init__(self, root: Path):
            self.root = root

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> Any:
            path = find_adapter(self.root, lora_name)
            if path is None:
                return None
            return LoRARequest(lora_name=lora_name, lora_int_id=adapter_id(lora_name),
                               lora_path=str(path))

    return GoatAdapterResolver(root)


def register_resolver() -> None:
    root = os.environ.get(ENV_DIR)
    if not root:
        return
    if not Path(root).is_dir():
        raise RuntimeError(f"goat vLLM plugin: {ENV_DIR}={root} is not a directory")
    from vllm.lora.resolver import LoRAResolverRegistry

    LoRAResolverRegistry.register_resolver("goat-serve adapter directory",
                                           make_resolver(Path(root)))
