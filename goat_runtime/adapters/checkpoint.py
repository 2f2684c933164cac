"""A safetensors checkpoint read in one piece and checked as a whole (header, float dtypes,
finite values), its tensors made on demand as views of the memory-mapped file."""

import itertools
import math
import mmap
import operator
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

# key -> (dtype, shape, start, end): each tensor's place in the file, offsets from its start
_Entries = dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or holds values no adapter may have; the message names
    the file and, where one is at fault, the tensor."""


# safetensors dtype names -> torch dtypes; every other dtype is refused (adapters are float).
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16}
# torch runs an op on more elements than this (at::internal::GRAIN_SIZE) on all its intra-op
# threads. The loader works beside the engine, whose ops use every core already: its ops are
# cut into parts no bigger (`parts`), so that a load takes one core and never makes the
# engine's threads wait on a second team of threads.
SERIAL_NUMEL = 32768
_MAX_HEADER = 100_000_000  # safetensors' own limit on the header's size
# The header is parsed in pieces of about this many bytes: orjson.loads holds the GIL for the
# whole of one call (15-20 ms for the 1 MB header of a GOAT adapter), which the engine thread
# would wait out mid-step; between pieces it gets the GIL back.
_HEADER_PIECE = 1 << 15


def work_uncut() -> None:
    """In a process of its own that runs torch on one thread (the adapter reader), no engine
    waits for this GIL or shares these threads: parse the header in one call and run ops
    whole, not in parts (1-2 ms of a SmolLM2-sized GOAT adapter's 20 ms read)."""
    global SERIAL_NUMEL, _HEADER_PIECE
    SERIAL_NUMEL = _HEADER_PIECE = 1 << 62


class Checkpoint:
    """A safetensors file read in one piece, its tensors made on demand as views of it.

    A GOAT checkpoint holds thousands of small tensors (each expert's A and B per module, twice:
    6,930 for r = 8, E = 8 on SmolLM2-135M), and per-tensor work costs more than the bytes. The
    adapter manager loads beside the running engine, and that time, mostly spent holding the
    GIL, is taken from the batch. So the header is parsed once, in pieces, and checked as
    safetensors checks it (known dtypes, sizes, offsets that tile the data exactly) with array
    operations; the file is memory-mapped (read in place from the page cache: the float32 copies
    the adapter keeps are the only copy made); one kind of module's experts in every layer
    become one strided view (`grid`) and twin copies are compared as whole byte ranges; the
    finite check is one pass over the data. Torch ops run in single-threaded parts (`parts`).
    """

    def __init__(self, path: Path):
        self.path = path
        try:
            with path.open("rb") as f:  # the mapping outlives the file object
                self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise self._unreadable(exc) from None
        if len(self.data) < 8:
            raise self._unreadable("shorter than its 8-byte header length")
        header_len = int.from_bytes(self.data[:8], "little")
        begin = 8 + header_len
        if header_len > _MAX_HEADER or begin > len(self.data):
            raise self._unreadable(f"header length {header_len} past the end of the file")
        raw = self.data[8:begin]
        entries = _CHECKED_HEADERS.get((raw, len(self.data)))
        if entries is None:
            try:
                header = _parse_header(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                raise self._unreadable(f"invalid header: {exc}") from None
            entries = self._check_header(header, begin)
            _CHECKED_HEADERS.put((raw, len(self.data)), entries)
        self.entries = entries  # shared with other checkpoints of this header: never changed
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

    def stack(self, keys: list[list[str]]) -> torch.Tensor:
        """The tensors of `keys` (rows of keys of one dtype and shape) stacked:
        [len(keys), len(keys[0]), *shape]; a view where they lie on a grid (see `grid`), as
        writers lay out the experts of one kind of module in every layer."""
        dtype, shape = self.entries[keys[0][0]][:2]
        grid = self.grid(keys)
        if grid is None:
            return torch.stack([torch.stack([self.tensor(k) for k in row]) for row in keys])
        return grid.view(dtype).view(len(keys), len(keys[0]), *shape)

    def grid(self, keys: list[list[str]]) -> torch.Tensor | None:
        """The bytes of `keys` (rows of keys, all of one dtype and shape) as one uint8 view
        [rows, keys per row, nbytes], when key j of row i starts at start + i * row_step +
        j * key_step (back to back, or interleaved with others: the reference's twin copies),
        aligned for their dtype; None when not."""
        found = [[self.entries[k] for k in row] for row in keys]
        first = found[0][0]
        if len({e[:2] for row in found for e in row}) != 1:
            return None
        starts = np.array([[e[2] for e in row] for row in found], dtype=np.int64)
        rows, cols = starts.shape
        row_step = int(starts[1, 0] - starts[0, 0]) if rows > 1 else 0
        key_step = int(starts[0, 1] - starts[0, 0]) if cols > 1 else 0
        itemsize = first[0].itemsize
        if (row_step < 0 or key_step < 0 or first[2] % itemsize or row_step % itemsize
                or key_step % itemsize
                or not np.array_equal(starts, first[2] + row_step * np.arange(rows)[:, None]
                                      + key_step * np.arange(cols)[None, :])):
            return None
        return self._bytes.as_strided((rows, cols, first[3] - first[2]), (row_step, key_step, 1),
                                      first[2])

    def same(self, keys: list[list[str]], others: list[list[str]]) -> str | None:
        """The first key of `keys` whose tensor is not `others`' counterpart (another dtype,
        shape or bytes); None when all hold the same values. Compared as two whole byte grids
        where each lies on one (see `grid`), else tensor by tensor."""
        pairs = [(k, o) for row, other in zip(keys, others, strict=True)
                 for k, o in zip(row, other, strict=True)]
        bad = next((k for k, o in pairs if self.entries[k][:2] != self.entries[o][:2]), None)
        if bad is not None:
            return bad
        a, b = self.grid(keys), self.grid(others)
        if a is not None and b is not None:
            a, b = _words(a), _words(b)
            if all(torch.equal(a[part], b[part]) for part in parts(a.shape)):
                return None
        return next((k for k, o in pairs
                     if not torch.equal(_words(self._raw(k)), _words(self._raw(o)))), None)

    def _raw(self, key: str) -> torch.Tensor:
        _, _, start, end = self.entries[key]
        return self._bytes[start:end]

    def _view(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        raw = self._bytes[start:end]
        if start % dtype.itemsize:  # writers align tensors; a file that does not gets copied
            raw = raw.clone()
        return raw.view(dtype)

    def _unreadable(self, why: object) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: not a readable safetensors file (truncated or corrupt?): {why}")

    def _check_header(self, header: object, begin: int) -> _Entries:
        """What safetensors checks before it reads a tensor: every entry has a known dtype, a
        shape and [start, end) offsets holding exactly its bytes, and the entries tile the
        data after the header with no gap, overlap or bytes left over. Array operations over
        all entries at once, not Python per tensor."""
        if not isinstance(header, dict):
            raise self._unreadable("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(v, str) for v in metadata.values())):
            raise self._unreadable("__metadata__ is not a map of strings")
        keys = list(header)
        try:
            infos = list(header.values())
            names = [info["dtype"] for info in infos]
            shapes = [info["shape"] for info in infos]
            offsets = [info["data_offsets"] for info in infos]
        except (TypeError, KeyError) as exc:
            raise self._unreadable(f"a header entry lacks dtype, shape or data_offsets: {exc}"
                                   ) from None
        if set(map(type, names)) != {str} or not set(names) <= _FLOAT_DTYPES.keys():
            bad = next(i for i, name in enumerate(names)
                       if type(name) is not str or name not in _FLOAT_DTYPES)
            raise CheckpointError(f"{self.path}: {keys[bad]} has dtype {names[bad]}; expected a "
                                  f"floating point tensor ({', '.join(_FLOAT_DTYPES)})")
        dtypes = list(map(_FLOAT_DTYPES.__getitem__, names))
        if not keys:
            if len(self.data) != begin:
                raise self._unreadable("no tensors, yet bytes after the header")
            return {}
        try:
            starts, ends = _int_pairs(offsets)
            numel = _numels(shapes)
        except (TypeError, ValueError, OverflowError):
            raise self._unreadable("data_offsets or a shape are not lists of non-negative "
                                   "integers (of at most 64 bits)") from None
        itemsize: int | np.ndarray = dtypes[0].itemsize
        if len(set(names)) > 1:
            kinds, which = np.unique(names, return_inverse=True)
            itemsize = np.array([_FLOAT_DTYPES[n].itemsize for n in kinds])[which]
        wrong = np.flatnonzero((numel > len(self.data)) | ((ends - starts) != numel * itemsize))
        if wrong.size:
            raise self._unreadable(f"{keys[wrong[0]]}: data_offsets do not hold its shape")
        order = np.lexsort((ends, starts))  # empty tensors first where they share a start
        tiled = starts[order][0] == 0 and np.array_equal(starts[order][1:], ends[order][:-1])
        if not tiled or ends[order][-1] != len(self.data) - begin:
            raise self._unreadable("tensor offsets leave gaps, overlap, or do not end with "
                                   "the file")
        return dict(zip(keys, zip(dtypes, map(tuple, shapes),
                                  (starts + begin).tolist(), (ends + begin).tolist(),
                                  strict=True), strict=True))

    def _check_finite(self, begin: int) -> None:
        if len(self.data) == begin:
            return
        dtypes = {dtype for dtype, *_ in self.entries.values()}
        if len(dtypes) == 1:  # the usual file: one dtype, its tensors back to back
            if _finite(self._view(begin, len(self.data), dtypes.pop())):
                return
        elif all(_finite(self.tensor(k)) for k in self.entries):
            return
        bad = next(k for k in self.entries if not _finite(self.tensor(k)))
        raise CheckpointError(f"{self.path}: {bad} contains NaN or Inf values")


def _finite(values: torch.Tensor) -> bool:
    """Whether every value is finite: its min and max are (NaN propagates to both), one pass
    that allocates nothing the size of the data (torch.isfinite would)."""
    values = values.reshape(-1)
    ends = [torch.aminmax(values[part]) for part in parts((values.numel(),))]
    return not ends or bool(torch.isfinite(torch.stack([v for pair in ends for v in pair])).all())


def parts(shape: torch.Size | tuple[int, ...]) -> list[slice]:
    """Slices of dim 0 of a tensor of `shape`, each of at most SERIAL_NUMEL elements (or one
    row, where a row holds more)."""
    per_row = math.prod(shape[1:])
    step = max(1, SERIAL_NUMEL // max(per_row, 1))
    return [slice(i, i + step) for i in range(0, shape[0], step)] if shape else [slice(None)]


class _HeaderCache:
    """The last few headers that passed _check_header, by their bytes and the file's length
    (all they depend on). Adapters trained alike from one base (one config, one writer) have
    byte-identical headers: the reader parses and checks one once (half of a SmolLM2-sized
    GOAT adapter's read), then a dictionary lookup (hashing the header's bytes: ~0.3 ms)."""

    def __init__(self, size: int = 4):
        self._size = size
        self._lock = threading.Lock()  # loader threads of one process share it
        self._entries: OrderedDict[tuple[bytes, int], _Entries] = OrderedDict()

    def get(self, key: tuple[bytes, int]) -> _Entries | None:
        with self._lock:
            entries = self._entries.get(key)
            if entries is not None:
                self._entries.move_to_end(key)
            return entries

    def put(self, key: tuple[bytes, int], entries: _Entries) -> None:
        with self._lock:
            self._entries[key] = entries
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


_CHECKED_HEADERS = _HeaderCache()


def _words(raw: torch.Tensor) -> torch.Tensor:
    """uint8 bytes as the widest integers their offset and strides allow: torch.equal compares
    uint8 a thousand times slower than int64 (integers, so NaN bytes are equal bytes)."""
    for dtype in (torch.int64, torch.int32, torch.int16):
        size = dtype.itemsize
        if raw.storage_offset() % size == 0 and raw.shape[-1] % size == 0 and all(
                stride % size == 0 for stride in raw.stride()[:-1]):
            return raw.view(dtype)
    return raw


def _parse_header(raw: bytes) -> object:
    """orjson.loads of a safetensors header, in pieces of about _HEADER_PIECE bytes cut after an
    entry's closing brace (`},"`), merged. A cut that is not between two entries (inside a
    string or a nested value) leaves its piece unbalanced, so that piece fails to parse and the
    header is parsed whole instead: the result is always orjson.loads(raw)'s."""
    if len(raw) <= 2 * _HEADER_PIECE or raw[:1] != b"{":
        return orjson.loads(raw)
    header: dict[str, object] = {}
    start = 1  # just after the header's opening brace
    try:
        while True:
            cut = raw.find(b'},"', start + _HEADER_PIECE)
            if cut < 0:
                piece = orjson.loads(b"{" + raw[start:])  # ends with the header's closing brace
                header.update(piece)
                return header
            header.update(orjson.loads(b"{" + raw[start : cut + 1] + b"}"))
            start = cut + 2
    except ValueError:
        return orjson.loads(raw)


def _int_pairs(offsets: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """[start, end] per entry as int64 arrays; TypeError / ValueError / OverflowError unless
    each is a list of two non-negative integers (not bools, not floats). Type checks by map
    and set, not a Python loop."""
    if set(map(type, offsets)) != {list} or set(map(len, offsets)) != {2}:
        raise TypeError("data_offsets is not a pair")
    flat: list[Any] = list(itertools.chain.from_iterable(offsets))
    if set(map(type, flat)) != {int}:
        raise TypeError("data_offsets are not integers")
    pairs = np.array(flat, dtype=np.int64).reshape(-1, 2)
    if (pairs < 0).any():
        raise ValueError("negative data_offsets")
    return pairs[:, 0], pairs[:, 1]


def _numels(shapes: list[Any]) -> np.ndarray:
    """Elements per shape as an int64 array (Python integers, so a product never wraps);
    TypeError / ValueError / OverflowError unless each shape is a list of non-negative
    integers."""
    if set(map(type, shapes)) != {list}:
        raise TypeError("a shape is not a list")
    flat: list[Any] = list(itertools.chain.from_iterable(shapes))
    if not set(map(type, flat)) <= {int} or (flat and min(flat) < 0):
        raise ValueError("a shape holds something else than non-negative integers")
    if set(map(len, shapes)) == {2}:  # the usual case: all 2-D
        return np.array(list(map(operator.mul, flat[::2], flat[1::2])), dtype=np.int64)
    return np.array(list(map(math.prod, shapes)), dtype=np.int64)
