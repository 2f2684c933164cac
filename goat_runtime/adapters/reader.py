"""Adapters read and checked in a child process, so that the serving process only receives the
finished values, laid out as its slots hold them (one slots.SlotImage per fused linear).

Reading a GOAT checkpoint is thousands of small Python operations (its safetensors header alone
has ~7,000 entries). On a thread of the serving process they hold the GIL in turns with the
engine thread, which takes it back after every torch op of a step and so waits at each one: a
convoy that made 130 ms steps take 1.4 s while adapters loaded (docs/benchmarks.md section 7),
however the reading itself was cut up. In a process of its own the reading takes none of the
serving process's GIL, and at idle priority no core a step is using; what comes back is a short
description and the slot images' values in one file, mapped and split into views: a memory file
of the serving process's ScratchPool, written again once its images are released, or where
there is no memfd a new scratch file per read (in memory, /dev/shm, where there is one).

The child is spawned, not forked (the serving process has threads that a fork would copy in
whatever state they are in), so a program that starts an engine must guard its main module
(`if __name__ == "__main__":`), as multiprocessing asks. One reader process per serving
process, shared by its engines and started with the first; a reader that dies (a file that
crashes a parser) fails that read with AdapterError and is started again for the next one: the
server keeps serving.
"""

import ctypes
import ctypes.util
import gc
import logging
import math
import multiprocessing
import os
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import torch

from goat_runtime.adapters.checkpoint import work_uncut
from goat_runtime.adapters.format import AdaptedLinear, Adapter, AdapterError, load_adapter
from goat_runtime.adapters.slots import SlotImage, slot_images

T = TypeVar("T")


@dataclass(frozen=True)
class PackedAdapter:
    """An Adapter without its values, as it crosses the process boundary: per module its
    top_k, scale and whether it has a router, the shapes of its tensors (A, B, then the router,
    module by module), and the shapes of its slot images' tensors (shrink, router, expand,
    slice_meta, linear by linear), whose values travel back to back in one buffer of 4-byte
    elements (float32; slice_meta's int32)."""

    adapter: Adapter  # its layers emptied
    modules: tuple[tuple[str, int, float, bool], ...]  # module, top_k, scale, has a router
    shapes: tuple[tuple[int, ...], ...]
    image_shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(map(math.prod, self.image_shapes))


@dataclass
class ReadAdapter:
    """What a read returns: the adapter, its tensors on the meta device (their shapes: what
    sizing and accounting read), and its values as one SlotImage per fused linear of `groups`."""

    adapter: Adapter
    images: list[SlotImage]


def pack(adapter: Adapter, groups: Sequence[Sequence[str]],
         base_linears: dict[str, tuple[int, int]]) -> tuple[PackedAdapter, list[torch.Tensor]]:
    """The adapter's description and its slot images' tensors (one image per group of slice
    names: a fused linear's), whose values concatenated are what `unpack` takes."""
    covered = {n for group in groups for n in group}
    if not covered.issuperset(adapter.layers):
        raise AdapterError(f"{adapter.path}: modules outside the served linears: "
                           f"{sorted(set(adapter.layers) - covered)}")
    images = slot_images([([adapter.layers.get(n) for n in group],
                           [base_linears[n][0] for n in group], base_linears[group[0]][1])
                          for group in groups])
    shell = Adapter(adapter.name, adapter.path, adapter.kind, {}, adapter.signature,
                    adapter.base_model_name_or_path)
    modules = tuple((module, layer.top_k, layer.scale, layer.router is not None)
                    for module, layer in adapter.layers.items())
    shapes = tuple(tuple(t.shape) for layer in adapter.layers.values()
                   for t in (layer.lora_a, layer.lora_b, layer.router) if t is not None)
    tensors = [t for image in images for t in image.tensors()]
    return (PackedAdapter(shell, modules, shapes, tuple(tuple(t.shape) for t in tensors)),
            tensors)


def unpack(packed: PackedAdapter, values: torch.Tensor) -> ReadAdapter:
    """The adapter again (its tensors meta tensors) and its slot images, views of `values`
    (which lives as long as they)."""
    shapes = iter(packed.shapes)
    # One meta tensor per shape, shared (they hold no values and are never written): making
    # one per tensor was 2 ms of GIL-holding work for a GOAT adapter's 630 on the serving side.
    made: dict[tuple[int, ...], torch.Tensor] = {}

    def take() -> torch.Tensor:
        shape = next(shapes)
        meta = made.get(shape)
        if meta is None:
            meta = made[shape] = torch.empty(shape, device="meta")
        return meta

    layers = {}
    for module, top_k, scale, routed in packed.modules:
        a, b = take(), take()
        layers[module] = AdaptedLinear(a, b, take() if routed else None, top_k, scale)
    shell = packed.adapter
    adapter = Adapter(shell.name, shell.path, shell.kind, layers, shell.signature,
                      shell.base_model_name_or_path)
    pieces = [piece.view(shape) for piece, shape in zip(
        torch.split(values, [math.prod(s) for s in packed.image_shapes]), packed.image_shapes,
        strict=True)]
    images = [SlotImage(pieces[i], pieces[i + 1], pieces[i + 2], pieces[i + 3].view(torch.int32))
              for i in range(0, len(pieces), 4)]
    return ReadAdapter(adapter, images)


def _read_to_file(path: Path, base_linears: dict[str, tuple[int, int]], name: str,
                  max_rank: int, groups: Sequence[Sequence[str]], scratch: list[Path],
                  reuse: str | None) -> tuple[PackedAdapter, Path | None]:
    """In the reader process: load_adapter, packed into slot images, their values written into
    `reuse` (a file of the serving process's ScratchPool) or, without one or where it cannot
    be opened, into a new file in the first of the `scratch` folders that takes it (a pipe
    would pickle megabytes twice). Returns the new file, None where `reuse` took the values."""
    adapter = load_adapter(path, base_linears, name=name, max_rank=max_rank)
    packed, tensors = pack(adapter, groups, base_linears)
    buffers = [t.numpy() for t in tensors]
    if reuse is not None:
        try:
            _write_all(Path(reuse), buffers, new=False)
            return packed, None
        except OSError:  # no /proc to open it by: a new file, as without a pool
            pass
    for folder in scratch:
        file = folder / f"goat-serve-reader-{os.getpid()}-{uuid.uuid4().hex}.f32"
        try:
            _write_all(file, buffers)
            return packed, file
        except OSError:  # full (a container's small /dev/shm): the next folder
            file.unlink(missing_ok=True)
            if folder == scratch[-1]:
                raise
    raise AssertionError("unreachable: scratch is never empty")


def _write_all(file: Path, buffers: list[np.ndarray], *, new: bool = True) -> None:
    """The buffers back to back into a new file (`new`), or over the start of an existing one,
    a few system calls (writev) for all."""
    buffers = [b for b in buffers if b.size]  # (an empty one has no bytes, nor a cast view)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL if new else os.O_WRONLY
    fd = os.open(file, flags, 0o600)
    try:
        for i in range(0, len(buffers), _IOV_MAX):
            views = [b.data.cast("B") for b in buffers[i:i + _IOV_MAX]]
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
    finally:
        os.close(fd)


_IOV_MAX = 1024  # Linux's most buffers per writev


def _scratch_folders() -> list[Path]:
    """Where values pass between the processes: memory (/dev/shm) where there is one, else the
    temporary folder."""
    shm = Path("/dev/shm")
    memory = [shm] if shm.is_dir() and os.access(shm, os.W_OK) else []
    return [*memory, Path(tempfile.gettempdir())]


def _map(path: Path, file: str, packed: PackedAdapter, *, exact: bool) -> torch.Tensor:
    """The values the reader process wrote at the start of `file` (all of it where `exact`),
    mapped, not read into a buffer: no copy, and once the slot is written and the views are
    released the pages go back with the mapping (a read buffer went to malloc's heap, which
    kept it: RSS grew 22 MB an adapter for 14 MB of slot)."""
    size = os.stat(file).st_size
    if size < 4 * packed.numel or (exact and size != 4 * packed.numel):
        raise AdapterError(f"{path}: the reader process passed {size} bytes for "
                           f"{packed.numel} 4-byte values")
    return torch.from_file(file, shared=True, size=packed.numel, dtype=torch.float32)


class ScratchPool:
    """Memory files (memfd) the reader process writes values into, each used again once the
    images mapped from it are released (after their slot write). A new file's pages are
    allocated and zeroed by the kernel as the values are written into them (6.0 ms for a
    SmolLM2-sized GOAT adapter's 14.6 MB); a used file's pages are there already (2.7 ms).
    Released files are kept up to `keep_bytes` in all; the rest are closed. At most `max_files`
    are in use at once (each holds a file descriptor open: on an accelerator the host keeps an
    adapter's images as long as the adapter); past them, and where there is no memfd (not
    Linux), `take` gives None: a new scratch file for that read. Files have no name (nothing
    is left behind by a server that is killed); the reader opens them through /proc."""

    def __init__(self, keep_bytes: int = 64 << 20, max_files: int = 16):
        self._lock = threading.Lock()
        self._free: list[int] = []
        self._in_use = 0
        self._keep_bytes, self._max_files = keep_bytes, max_files
        self._closed = False
        memfd_create = getattr(os, "memfd_create", None)
        usable = memfd_create is not None and Path(f"/proc/{os.getpid()}/fd").is_dir()
        self._memfd_create = memfd_create if usable else None

    def take(self) -> int | None:
        """A file descriptor for the next read's values (a released file, else a new one)."""
        with self._lock:
            if self._free:
                self._in_use += 1
                return self._free.pop()
            if self._closed or self._in_use >= self._max_files or self._memfd_create is None:
                return None
            self._in_use += 1
        return cast(int, self._memfd_create("goat-serve-scratch", os.MFD_CLOEXEC))

    def give_back(self, fd: int) -> None:
        """`fd`'s values are no longer read: the next read may write over them."""
        with self._lock:
            self._in_use -= 1
            kept = sum(os.fstat(f).st_size for f in self._free)
            if not self._closed and kept + os.fstat(fd).st_size <= self._keep_bytes:
                self._free.append(fd)
                return
        os.close(fd)

    def close(self) -> None:
        """Close the released files; files still in use close when they are given back."""
        with self._lock:
            free, self._free, self._closed = self._free, [], True
        for fd in free:
            os.close(fd)


def _start_reader(parent: int) -> None:
    # One core, at the lowest priority: the reader reads on what the engine leaves idle, and
    # never slows a step (the engine gives it a thread when it starves: LLMEngine._share_cores).
    torch.set_num_threads(1)
    work_uncut()
    _lowest_priority()
    _keep_freed_memory()
    # Torch's import leaves ~100k objects that every full collection in a read walks again:
    # frozen out of the cyclic GC once, the reads skip them.
    gc.collect()
    gc.freeze()
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch",
                     daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """End this process once the process that started it has gone (killed, it never shuts
    its pool down): an orphaned reader would wait for work forever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _keep_freed_memory() -> None:
    """Have glibc keep what a read frees for the next read, instead of handing it back to the
    system and faulting fresh pages in again: a read allocates tens of MB (the file, its
    values, the slot images), which by default go to mmap or are trimmed off the heap when
    freed. With this a bf16 SmolLM2-sized read took 34-35 ms instead of 44 (its load 18 ms
    instead of 20, its slot images 4 instead of 12-17 ms: laid out in big tensors, they paid
    for each of their pages; docs/benchmarks.md section 2). The reader keeps up to _KEPT_FREE
    bytes of freed memory. Elsewhere than glibc: nothing to do."""
    libc = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)  # from the heap, which is kept
        mallopt(_M_TRIM_THRESHOLD, _KEPT_FREE)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit systems
_KEPT_FREE = 256 << 20


def _lowest_priority() -> None:
    """Where there are cores to spare, this process runs only when one is otherwise idle
    (Linux's SCHED_IDLE; elsewhere nice 19). Not on one core: an engine there has no thread to
    give a starved reader, which would read only while the engine idles (it then takes its
    share of the core, as any process). One-way: an unprivileged process cannot raise it again."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (cores or 1) < 2:
        return
    idle = getattr(os, "SCHED_IDLE", None)
    try:
        if idle is not None:
            os.sched_setscheduler(0, idle, os.sched_param(0))
        else:
            os.nice(19)
    except OSError as exc:  # a sandbox that forbids it: the reader keeps normal priority
        logging.getLogger(__name__).warning("the adapter reader keeps normal priority: %s", exc)


class AdapterReader:
    """load_adapter, run in the reader process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._scratch = _scratch_folders()
        self._files = ScratchPool()

    def start(self) -> None:
        """Start the reader process now (it imports torch: about a second), not at the first
        read."""
        self._executor().submit(int)

    def read(self, path: Path, base_linears: dict[str, tuple[int, int]], *, name: str,
             max_rank: int, groups: Sequence[Sequence[str]]) -> ReadAdapter:
        """load_adapter(path, base_linears, name=name, max_rank=max_rank), read in the reader
        process, its values laid out as slot images of the fused linears whose slice names
        `groups` lists; its AdapterError is raised here."""
        fd = self._files.take()
        try:
            packed, file = self._run(f"{path}", _read_to_file, path, base_linears, name,
                                     max_rank, groups, self._scratch,
                                     None if fd is None else f"/proc/{os.getpid()}/fd/{fd}")
            if file is None:  # in the pool's file, which may hold more (an earlier read's)
                if fd is None:
                    raise AdapterError(f"{path}: the reader process passed no values")
                values = _map(path, f"/proc/self/fd/{fd}", packed, exact=False)
                # The images (views of `values`) keep it alive; once they are all released,
                # so is the file.
                weakref.finalize(values, self._files.give_back, fd)
                fd = None
            else:
                try:
                    values = _map(path, str(file), packed, exact=True)
                finally:
                    file.unlink(missing_ok=True)  # the mapping keeps its pages
        finally:
            if fd is not None:
                self._files.give_back(fd)
        return unpack(packed, values)

    def _run(self, what: str, fn: Callable[..., T], *args: object) -> T:
        """fn(*args) in the reader process (a fresh one if the last has died since)."""
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
                    initializer=_start_reader, initargs=(os.getpid(),))
            return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.shutdown(wait=True, cancel_futures=True)

    def shutdown(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self._files.close()


_shared = AdapterReader()


def shared_reader() -> AdapterReader:
    """The serving process's one reader (its engines share it)."""
    return _shared
