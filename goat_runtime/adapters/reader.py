"""Adapters read and checked in a child process, so that the serving process only receives the
finished float32 values.

Reading a GOAT checkpoint is thousands of small Python operations (its safetensors header alone
has ~7,000 entries). On a thread of the serving process they hold the GIL in turns with the
engine thread, which takes it back after every torch op of a step and so waits at each one: a
convoy that made 130 ms steps take 1.4 s while adapters loaded (docs/benchmarks.md section 7),
however the reading itself was cut up. In a process of its own the reading takes none of the
serving process's GIL; what comes back is one buffer of float32 values and a short manifest,
turned into tensors (views of that buffer) in about a millisecond.

One reader process per serving process, shared by its engines and started at the first read; a
reader that dies (a file that crashes a parser) fails that read with AdapterError and is started
again for the next one: the server keeps serving.
"""

import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from goat_runtime.adapters.format import AdaptedLinear, Adapter, AdapterError, load_adapter

T = TypeVar("T")


@dataclass(frozen=True)
class _Layer:
    """Where one module's tensors lie in the packed buffer (element offsets and shapes)."""

    module: str
    a: tuple[int, tuple[int, ...]]
    b: tuple[int, tuple[int, ...]]
    router: tuple[int, tuple[int, ...]] | None
    top_k: int
    scale: float


@dataclass(frozen=True)
class PackedAdapter:
    """An Adapter as it crosses the process boundary: every tensor's float32 values back to back
    in one array (one pickled buffer, not hundreds of tensors) and where each lies."""

    adapter: Adapter  # its layers emptied: they travel in `layers` and `values`
    layers: tuple[_Layer, ...]
    values: np.ndarray  # float32, 1-D


def pack(adapter: Adapter) -> PackedAdapter:
    tensors: list[torch.Tensor] = []
    offset = 0

    def place(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
        nonlocal offset
        tensors.append(t.reshape(-1))
        start, offset = offset, offset + t.numel()
        return start, tuple(t.shape)

    layers = tuple(
        _Layer(module, place(layer.lora_a), place(layer.lora_b),
               None if layer.router is None else place(layer.router), layer.top_k, layer.scale)
        for module, layer in adapter.layers.items())
    values = (torch.cat(tensors) if tensors else torch.empty(0)).to(torch.float32).numpy()
    shell = Adapter(adapter.name, adapter.path, adapter.kind, {}, adapter.signature,
                    adapter.base_model_name_or_path)
    return PackedAdapter(shell, layers, values)


def unpack(packed: PackedAdapter) -> Adapter:
    """The Adapter again, its tensors views of the one buffer (which lives as long as they)."""
    values = torch.from_numpy(packed.values)

    def view(where: tuple[int, tuple[int, ...]]) -> torch.Tensor:
        start, shape = where
        return values[start:start + int(np.prod(shape))].view(shape)

    a = packed.adapter
    layers = {layer.module: AdaptedLinear(
        view(layer.a), view(layer.b), None if layer.router is None else view(layer.router),
        layer.top_k, layer.scale) for layer in packed.layers}
    return Adapter(a.name, a.path, a.kind, layers, a.signature, a.base_model_name_or_path)


def _read_packed(path: Path, base_linears: dict[str, tuple[int, int]], name: str,
                 max_rank: int) -> PackedAdapter:
    """In the reader process: load_adapter, packed."""
    return pack(load_adapter(path, base_linears, name=name, max_rank=max_rank))


def _start_reader() -> None:
    # The reader's ops run on one core: the engine's threads use the others.
    torch.set_num_threads(1)


class AdapterReader:
    """load_adapter, run in the reader process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._in_flight = 0

    @property
    def reading(self) -> bool:
        """Whether a read is in flight (the reader process is using a core)."""
        return self._in_flight > 0

    def start(self) -> None:
        """Start the reader process now (it imports torch: about a second), not at the first
        read."""
        self._executor().submit(int)

    def read(self, path: Path, base_linears: dict[str, tuple[int, int]], *, name: str,
             max_rank: int) -> Adapter:
        """load_adapter(path, base_linears, name=name, max_rank=max_rank), read in the reader
        process; its AdapterError is raised here."""
        packed: PackedAdapter = self._run(f"{path}", _read_packed, path, base_linears, name,
                                          max_rank)
        return unpack(packed)

    def _run(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in the reader process (a fresh one if the last has died since)."""
        with self._lock:
            self._in_flight += 1
        try:
            return self._call(what, fn, *args)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _call(self, what: str, fn: Callable[..., T], *args: object) -> T:
        pool = self._executor()
        try:
            future = pool.submit(fn, *args)
        except BrokenProcessPool:  # it died after an earlier read: start another
            self._discard(pool)
            pool = self._executor()
            future = pool.submit(fn, *args)
        try:
            return future.result()
        except BrokenProcessPool:
            self._discard(pool)
            raise AdapterError(f"{what}: the adapter reader process died while reading this "
                               f"adapter (a corrupt file?)") from None

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: the serving process has threads (engine, server, torch's) that a
                # forked child would inherit in whatever state they were.
                self._pool = ProcessPoolExecutor(
                    1, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_reader)
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=False, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_shared = AdapterReader()


def shared_reader() -> AdapterReader:
    """The serving process's one reader (its engines share it)."""
    return _shared
