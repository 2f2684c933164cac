"""A safetensors checkpoint read in one piece and checked as a whole (float dtypes, finite
values), its tensors made on demand as views of the memory-mapped file."""

import json
import mmap
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or holds values no adapter may have; the message names
    the file and, where one is at fault, the tensor."""


# safetensors dtype names -> torch dtypes; every other dtype is refused (adapters are float).
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16}


class Checkpoint:
    """A safetensors file read in one piece, its tensors made on demand as views of it.

    A GOAT checkpoint holds thousands of small tensors (each expert's A and B per module, twice:
    6,930 for r = 8, E = 8 on SmolLM2-135M), and per-tensor work costs more than the bytes. The
    adapter manager loads beside the running engine, and that time, mostly spent holding the
    GIL, is taken from the batch. So safetensors checks the header (offsets, sizes, dtypes), the
    file is memory-mapped (read in place from the page cache: the float32 copies the adapter
    keeps are the only copy made), a module's experts become one view where they lie back to
    back, and the whole-file checks (finite values, twin copies) run on the mapped bytes: a
    fraction of the time making every tensor with safetensors' loader took (docs/benchmarks.md
    section 7).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(path, framework="pt"):  # validates the header against the file
                pass
            with path.open("rb") as f:  # the mapping outlives the file object
                self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            header_len = int.from_bytes(self.data[:8], "little")
            header = json.loads(self.data[8 : 8 + header_len])
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): {exc}"
            ) from None
        header.pop("__metadata__", None)
        begin = 8 + header_len
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            dtype = _FLOAT_DTYPES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path}: {key} has dtype {info['dtype']}; expected a "
                                   f"floating point tensor ({', '.join(_FLOAT_DTYPES)})")
            start, end = info["data_offsets"]
            self.entries[key] = (dtype, tuple(info["shape"]), begin + start, begin + end)
        with warnings.catch_warnings():  # read-only: only ever read, and copied to keep
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self._bytes = torch.frombuffer(self.data, dtype=torch.uint8)
        self._check_finite(begin)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def keys(self) -> set[str]:
        return set(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def tensor(self, key: str) -> torch.Tensor:
        """A view of the file's bytes (copy it to keep it past the checkpoint)."""
        dtype, shape, start, end = self.entries[key]
        return self._view(start, end, dtype).view(shape)

    def stack(self, keys: list[str]) -> torch.Tensor:
        """The tensors of `keys` (one dtype and shape) stacked: [len(keys), *shape]; one view
        when they lie back to back in this order (as writers lay out a module's experts)."""
        dtype, shape, start, stop = self.entries[keys[0]]
        for key in keys[1:]:
            d, s, b, e = self.entries[key]
            if (d, s, b) != (dtype, shape, stop):
                return torch.stack([self.tensor(k) for k in keys])
            stop = e
        return self._view(start, stop, dtype).view(len(keys), *shape)

    def same(self, key: str, other: str) -> bool:
        """Whether two tensors hold the same values (same dtype and shape, same bytes)."""
        (dtype, shape, start, end), (dtype2, shape2, start2, end2) = (self.entries[key],
                                                                     self.entries[other])
        return (dtype, shape) == (dtype2, shape2) and \
            self.data[start:end] == self.data[start2:end2]

    def _view(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        raw = self._bytes[start:end]
        if start % dtype.itemsize:  # writers align tensors; a file that does not gets copied
            raw = raw.clone()
        return raw.view(dtype)

    def _check_finite(self, begin: int) -> None:
        dtypes = {dtype for dtype, *_ in self.entries.values()}
        if len(dtypes) == 1:  # the usual file: one dtype, its tensors back to back
            dtype = dtypes.pop()
            if torch.isfinite(self._view(begin, len(self.data), dtype)).all():
                return
        elif all(torch.isfinite(self.tensor(k)).all() for k in self.entries):
            return
        bad = next(k for k in self.entries if not torch.isfinite(self.tensor(k)).all())
        raise CheckpointError(f"{self.path}: {bad} contains NaN or Inf values")
