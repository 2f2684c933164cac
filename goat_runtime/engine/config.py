"""EngineConfig: everything the engine is built from (the server's flags map onto it)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the command line checks flags without it
    import torch

    from goat_runtime.adapters.store import StoreConfig

def check_adapter_dir(path: str | Path) -> Path | str:
    """The adapter folder `path`: a local folder (a Path), or an s3:// or hf:// URL (a str,
    checked for form only); ValueError naming it otherwise (a typo would otherwise serve the
    base alone without a word)."""
    from goat_runtime.adapters.store import check_location

    return check_location(path)


DTYPES = ("auto", "float32", "bfloat16")
DEFAULT_MAX_LORAS = 8  # accelerator slots without --max-loras or --max-gpu-adapter-memory


def resolve_dtype(dtype: str, device_type: str) -> str:
    """The dtype `dtype` means on a device type, for both engines (goat-serve's and vLLM's):
    auto is float32 on the CPU (without AVX-512 BF16, bfloat16 matmuls are far slower there,
    docs/benchmarks.md, and answers then differ from float32's) and bfloat16 on CUDA."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, float32 or bfloat16, got {dtype!r}")
    if dtype == "auto":
        return "bfloat16" if device_type == "cuda" else "float32"
    return dtype


@dataclass
class EngineConfig:
    model_dir: Path
    # Adapters known by folder name, loaded on first use: a local folder, s3://bucket/prefix or
    # hf://org/repo[@revision][/folder] (goat_runtime/adapters/store.py)
    adapter_dir: Path | str | None = None
    adapters: dict[str, Path | str] = field(default_factory=dict)  # loaded at start and pinned
    adapter_cache_dir: Path | None = None  # remote adapters' downloads; $GOAT_CACHE_DIR/adapters
    max_adapter_size: int = 1 << 30  # bytes of one remote adapter's files
    adapter_download_timeout: float = 60.0  # seconds per network call
    adapter_download_retries: int = 3
    served_model_name: str | None = None  # the base's name in requests; default: folder name
    dtype: str = "auto"  # auto (float32 on cpu, bfloat16 on cuda), float32, bfloat16
    device: str = "auto"  # auto, cpu, cuda
    # Accelerator slots (distinct adapters per step there; no bound on the CPU, whose slots are
    # host memory). None: DEFAULT_MAX_LORAS, or as many as max_gpu_adapter_memory holds (see
    # max_device_slots); given, an upper bound on the count either way.
    max_loras: int | None = None
    # Bytes of the accelerator's slot pool: the slot count follows from it and one slot's bytes
    # at the largest resident rank and expert count (engine/adapter_slots.py). None: max_loras
    # slots whatever their size. Ignored on the CPU.
    max_gpu_adapter_memory: int | None = None
    max_cpu_adapters: int = 32  # adapters kept loaded in host memory (LRU)
    max_cpu_adapter_memory: int | None = None  # bytes of those adapters (LRU); None: no bound
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
    # The waiting queue's order under overload: fair (a Virtual Token Counter per tenant, see
    # fairness.py; first come, first served with one tenant) or fcfs.
    scheduling_policy: str = "fair"
    static_cache_dir: Path | None = None  # default: $GOAT_CACHE_DIR/static
    # Seconds a request waits for its structured-output grammar to compile before a 400.
    grammar_compile_timeout: float = 10.0

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir)
        if self.adapter_dir is not None:
            self.adapter_dir = check_adapter_dir(self.adapter_dir)
        self.adapters = {name: check_adapter_dir(p) for name, p in self.adapters.items()}
        for name in ("max_cpu_adapters", "max_lora_rank", "max_num_seqs",
                     "max_num_batched_tokens", "block_size", "max_adapter_size",
                     "adapter_download_retries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        for name in ("max_cpu_adapter_memory", "max_gpu_adapter_memory"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 byte, got {getattr(self, name)}")
        if self.max_cpu_adapters < self.max_device_slots:
            raise ValueError(f"max_cpu_adapters ({self.max_cpu_adapters}) must be at least "
                             f"max_loras ({self.max_device_slots}): device adapters live on the "
                             "host too")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.scheduling_policy not in ("fcfs", "fair"):
            raise ValueError("scheduling_policy must be fcfs or fair, got "
                             f"{self.scheduling_policy!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def max_device_slots(self) -> int:
        """The most accelerator slots: max_loras where given; else DEFAULT_MAX_LORAS, or with a
        byte pool (max_gpu_adapter_memory) max_cpu_adapters: the bytes decide below that, and
        no more adapters than the host keeps can be in slots (they live on the host too)."""
        if self.max_loras is not None:
            return self.max_loras
        if self.max_gpu_adapter_memory is not None:
            return self.max_cpu_adapters
        return DEFAULT_MAX_LORAS

    def store_config(self) -> "StoreConfig":
        from goat_runtime.adapters.store import StoreConfig

        return StoreConfig(cache_dir=self.adapter_cache_dir,
                           max_adapter_bytes=self.max_adapter_size,
                           timeout=self.adapter_download_timeout,
                           retries=self.adapter_download_retries)

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

        dtype = getattr(torch, resolve_dtype(self.dtype, self.torch_device.type))
        if not isinstance(dtype, torch.dtype):  # resolve_dtype names only torch dtypes
            raise TypeError(f"torch.{dtype} is not a dtype")
        return dtype

    @property
    def base_name(self) -> str:
        return self.served_model_name or self.model_dir.name
