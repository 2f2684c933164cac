"""EngineConfig: everything the engine is built from (the server's flags map onto it)."""

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the command line checks flags without it
    import torch

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def check_adapter_dir(path: str | Path) -> Path:
    """The adapter folder `path`, or ValueError naming it if it is not a local folder (a typo
    would otherwise serve the base alone without a word)."""
    text = str(path)
    if _URL.match(text):
        raise ValueError(f"adapter folder {text!r}: object storage and URLs are not supported "
                         f"yet; give a local folder (copy the adapters there first)")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"adapter folder {text!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"adapter folder {text!r} is not a folder")
    return path


DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The dtype `dtype` means on a device type, for both engines (goat-serve's and vLLM's):
    auto is float32 on the CPU (bfloat16 matmuls are ~100x slower there without AVX-512 BF16,
    and answers then differ from float32's) and bfloat16 on CUDA."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype


@dataclass
class EngineConfig:
    model_dir: Path
    adapter_dir: Path | None = None  # adapters known by folder name, loaded on first use
    adapters: dict[str, Path] = field(default_factory=dict)  # loaded at start and pinned
    served_model_name: str | None = None  # the base's name in requests; default: folder name
    dtype: str = "auto"  # auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16
    device: str = "auto"  # auto, cpu, cuda
    max_loras: int = 8  # adapters resident in device slots (distinct adapters per step)
    max_cpu_adapters: int = 32  # adapters kept loaded in host memory (LRU)
    max_lora_rank: int = 64
    max_num_seqs: int = 64  # running sequences per step
    max_num_batched_tokens: int = 512  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    kv_cache_memory: int = 1 << 30  # bytes for K/V blocks
    block_size: int = 16
    # Fold the static term of the init signature most start-up GOAT adapters share into the base
    # weights (undone wherever it must not apply, so exact); nothing without GOAT adapters.
    merge_static: bool = True
    # CPU fp32: keep oneDNN-blocked copies of the linear weights (faster decode steps, twice
    # those weights' memory); see LlamaForCausalLM.pack_weights
    pack_weights: bool = True
    enable_prefix_caching: bool = True
    static_cache_dir: Path | None = None  # default: $GOAT_CACHE_DIR/static
    # Seconds a request waits for its structured-output grammar to compile before a 400.
    grammar_compile_timeout: float = 10.0

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.adapter_dir is not None:
            self.adapter_dir = check_adapter_dir(self.adapter_dir)
        self.adapters = {name: Path(p) for name, p in self.adapters.items()}
        for name in ("max_loras", "max_cpu_adapters", "max_lora_rank", "max_num_seqs",
                     "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_cpu_adapters < self.max_loras:
            raise ValueError(f"max_cpu_adapters ({self.max_cpu_adapters}) must be at least "
                             f"max_loras ({self.max_loras}): device adapters live on the host too")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def torch_device(self) -> "torch.device":
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda was asked for but torch sees no CUDA device")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch

        return getattr(torch, resolve_dtype(self.dtype, self.torch_device.type))

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model_dir.name
