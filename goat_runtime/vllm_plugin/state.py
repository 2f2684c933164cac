"""The vLLM plugin's shared state and the base-checkpoint facts its hooks share.

vLLM runs the plugin in every process (API server, engine core, each worker); each process
holds one `PluginState`, `STATE`, the plugin's only mutable module global: the served base
model and --max-lora-rank (recorded when vLLM creates its LoRA manager), the base checkpoint's
Linear weights (read once), the merge target read from GOAT_VLLM_MERGE_STATIC, the layers that
received a merged term, the front end's check cache and whether the hooks are installed.
`loader.py`, `merge.py` and `validate.py` import this module and never each other's state.

The base model's Linear shapes are the model's own (`goat_runtime.adapters.binding.
base_linear_shapes`, from config.json: the shapes goat-serve's engine checks adapters against);
the one checkpoint scan reads those modules' weights for the static components, so the front
end checks adapters against exactly what the workers load.
"""

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from goat_runtime.adapters.format import CONFIG_FILE, Adapter, AdapterError, InitSignature
from goat_runtime.adapters.static import StaticComponents, covered_modules


@dataclass(frozen=True)
class MergeTarget:
    """The static term merged into the base weights (merge.py): one init signature, on the
    modules its adapters target."""

    signature: InitSignature
    modules: frozenset[str]  # checkpoint module names, e.g. model.layers.0.self_attn.q_proj

    def covered(self, adapter: Adapter) -> frozenset[str]:
        """The modules where `adapter`'s own static term is the merged one: its slot carries
        no static rows there and its tokens are not undone."""
        return covered_modules(self.signature, self.modules, adapter)


@dataclass
class BaseCheckpoint:
    """The served base model's Linear weights, read from its checkpoint (never from the TP
    shards a worker holds), so every tensor-parallel rank derives the same factors."""

    path: Path
    shapes: dict[str, tuple[int, int]]
    static: StaticComponents


@dataclass
class PluginState:
    lock: threading.RLock = field(default_factory=threading.RLock)
    base_model: Path | None = None  # set when vLLM creates its LoRA manager (hooks.py)
    max_lora_rank: int = 16
    base: BaseCheckpoint | None = None
    merge_target: tuple[str, MergeTarget | None] | None = None  # (GOAT_VLLM_MERGE_STATIC, ...)
    merged_layers: int = 0  # linear layers of this process's model with a merged term
    installed: bool = False  # hooks.install ran
    goat_classes: dict[type, type] = field(default_factory=dict)  # stock -> GOAT layer class
    shapes: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # per base path
    # validate.py: error or None, per (adapter files' stamp, base, revision, max rank)
    checked: dict[tuple[object, ...], str | None] = field(default_factory=dict)


STATE = PluginState()


def is_goat_dir(lora_dir: str | Path) -> bool:
    try:
        config = json.loads((Path(lora_dir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("peft_type") == "GOAT"


def model_dir(model: str, revision: str | None = None) -> Path:
    """The base checkpoint's directory: a local path, or a hub id already in the local cache."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, revision=revision, local_files_only=True))


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"{path}: the base model has no *.safetensors files (GOAT static "
                           f"components need the base weights)")
    return files


def linear_shapes(path: Path) -> dict[str, tuple[int, int]]:
    """Module name -> (d_out, d_in) of every Linear adapters can target in the base at `path`
    (cached per path). Raises AdapterError if the base has no *.safetensors files or a config
    goat-serve cannot serve."""
    from goat_runtime.adapters.binding import base_linear_shapes

    key = str(path.resolve())
    with STATE.lock:
        if key not in STATE.shapes:
            _weight_files(path)
            try:
                STATE.shapes[key] = base_linear_shapes(path)
            except (OSError, ValueError) as exc:
                raise AdapterError(f"{path}: {exc}") from None
        return STATE.shapes[key]


def set_base_model(model: str, revision: str | None = None,
                   max_lora_rank: int | None = None) -> None:
    """Record the served base model (a directory or a hub id already in the local cache) and
    the engine's --max-lora-rank."""
    path = model_dir(model, revision)
    with STATE.lock:
        if max_lora_rank is not None:
            STATE.max_lora_rank = max_lora_rank
        if STATE.base is not None and STATE.base.path != path:
            STATE.base = None
        STATE.base_model = path


def base_checkpoint() -> BaseCheckpoint:
    """The served base's Linear weights and static components, read once per process."""
    with STATE.lock:
        if STATE.base is None:
            path = STATE.base_model
            if path is None:
                raise RuntimeError("goat vLLM plugin: the base model is unknown (the LoRA "
                                   "manager hook did not run); is the plugin registered?")
            try:
                shapes = linear_shapes(path)
            except AdapterError as exc:
                raise RuntimeError(f"goat vLLM plugin: {exc}") from None
            weights: dict[str, torch.Tensor] = {}
            for file in _weight_files(path):
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():  # noqa: SIM118
                        if key.removesuffix(".weight") in shapes and key.endswith(".weight"):
                            weights[key.removesuffix(".weight")] = f.get_tensor(key)
            missing = sorted(shapes.keys() - weights.keys())
            if missing:
                raise RuntimeError(f"goat vLLM plugin: {path}: no weight for {len(missing)} "
                                   f"Linear modules (e.g. {missing[0]}.weight)")
            STATE.base = BaseCheckpoint(path, shapes, StaticComponents(weights))
        return STATE.base
