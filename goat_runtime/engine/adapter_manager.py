"""Adapters by name across three tiers: a store (the adapter directory: a local folder, an S3
prefix or a Hub repository, goat_runtime/adapters/store.py), host memory (an LRU of
loaded, checked adapters with their static terms, bounded by count and bytes) and device slots
(the stacked tensors the routed op reads, one slot per adapter: engine/adapter_slots.py).

Loading from disk runs on one background thread, so the running batch never waits for it, and
the reading and checking itself in a child process (adapters/reader.py), so that it takes none
of the engine thread's GIL (remote adapters are first fetched into a local cache on a small pool
of download threads); the scheduler admits a request once its adapter is on the host, and
`bind` puts a step's adapters in slots before the forward. The same name requested twice while
loading loads once. Every static-component computation runs on that same thread
(StaticComponents is not thread-safe).
"""

import itertools
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from goat_runtime.adapters.binding import linear_shapes, slice_groups, slice_weights
from goat_runtime.adapters.format import (
    CONFIG_FILE,
    Adapter,
    AdapterError,
    InitSignature,
    read_signature,
)
from goat_runtime.adapters.reader import AdapterReader, shared_reader
from goat_runtime.adapters.static import Factors, StaticComponents, most_common_signature
from goat_runtime.adapters.store import FetchError, Location, StoreConfig, open_location
from goat_runtime.engine.adapter_slots import DeviceSlots, HostAdapter
from goat_runtime.engine.outputs import AdapterInfo, EngineError, EngineListener
from goat_runtime.model.layers import FusedLinear

logger = logging.getLogger(__name__)


class AdapterManager:
    def __init__(self, linears: list[FusedLinear], *, adapter_dir: Path | str | None,
                 max_loras: int, max_cpu_adapters: int, max_lora_rank: int,
                 static_cache_dir: Path | None, listener: EngineListener | None = None,
                 store_config: StoreConfig | None = None, max_cpu_memory: int | None = None,
                 max_device_memory: int | None = None, reader: AdapterReader | None = None):
        self.linears = linears
        self.reader = reader or shared_reader()
        self.reader.start()  # beside the rest of start-up (merging, packing), not at a load
        self.store_config = store_config or StoreConfig()
        if listener is not None and self.store_config.events is None:
            self.store_config.events = listener
        # The adapter folder; a remote one is listed now, so that a wrong URL or missing
        # credentials stop the start-up (FetchError) instead of answering 404 to every request.
        self.store = self.locate(adapter_dir) if adapter_dir is not None else None
        if self.store is not None and self.store.remote:
            self.store.adapter_names()
        self.max_loras, self.max_cpu_adapters = max_loras, max_cpu_adapters
        self.max_cpu_memory = max_cpu_memory  # bytes of host adapters (None: count bound only)
        self.max_lora_rank = max_lora_rank
        self.listener = listener
        self.shapes = linear_shapes(linears)
        self.groups = slice_groups(linears)  # the slot images a read returns, one per linear
        self.static = StaticComponents(slice_weights(linears), static_cache_dir)
        self._lock = threading.Lock()  # host/loading maps: read by the server thread too
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU order
        self._loading: dict[str, Future[None]] = {}
        self._read_queued: dict[str, float] = {}  # name -> when its read was queued (monotonic)
        self._failed: dict[str, Exception] = {}
        self._registered: dict[str, Location] = {}  # loaded by path (not from the adapter dir)
        self._refs: Counter[str] = Counter()  # unfinished requests per adapter
        # Loads run torch on one thread each: a team of OpenMP threads of their own beside the
        # engine thread's would make the engine's sleep between parallel regions (see
        # AsyncEngine), for as long as the loader thread lives.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader",
                                            initializer=torch.set_num_threads, initargs=(1,))
        self._downloads = ThreadPoolExecutor(4, thread_name_prefix="adapter-download",
                                             initializer=torch.set_num_threads, initargs=(1,))
        self._load_ids = itertools.count(1)
        # max_loras bounds accelerator slots (with max_device_memory, their bytes) only
        self.slots = DeviceSlots(linears, max_loras, listener, get=self.get, peek=self._peek,
                                 on_change=self._report_memory, max_bytes=max_device_memory,
                                 host_slots=max_cpu_adapters)

    # ---- start-up --------------------------------------------------------------------------

    def merge_static(self, names_and_paths: Iterable[tuple[str, Path]]) -> None:
        """Fold the most common GOAT init signature among these adapters into the base weights;
        the base then keeps a slot of its own to undo it."""
        def adapters() -> Iterator[tuple[InitSignature | None, frozenset[str]]]:
            for name, path in names_and_paths:  # configs only: a store's weights take minutes
                try:
                    yield read_signature(path, self.shapes)
                except AdapterError as exc:
                    logger.warning("merge-static: skipping %s: %s", name, exc)

        chosen = most_common_signature(adapters())
        if chosen is None:
            logger.info("merge-static: no GOAT adapter found, nothing merged")
            return
        signature, modules, count = chosen
        self.static.merge(signature, sorted(modules))
        logger.info("merged the static components of %s (%d adapters)", signature.slug(), count)
        self.slots.set_base(
            HostAdapter(None, self.static.static_terms(None), load_id=0, pinned=True))

    def start_up_adapters(self, pinned: dict[str, Path | str]) -> list[tuple[str, Path]]:
        """The start-up adapters' local folders, for merge_static: the pinned ones (fetched if
        remote: they load next anyway) and the adapter folder's on disk (of a remote store, the
        ones already cached: the others are not downloaded for this)."""
        found = [(name, self.locate(source).fetch()) for name, source in pinned.items()]
        if self.store is not None:
            for name in self.store.adapter_names():
                local = self.store.child(name).local()
                if local is not None:
                    found.append((name, local))
        return found

    # ---- names ------------------------------------------------------------------------------

    def locate(self, source: Path | str) -> Location:
        """The location a path or an s3:// / hf:// URL names (ValueError if malformed)."""
        return open_location(source, self.store_config)

    def source_of(self, name: str) -> Location | None:
        """Where an adapter not loaded yet would come from: the location it was registered
        with, or <adapter_dir>/<name> (no download: a remote store answers from its listing)."""
        if name in self._registered:
            return self._registered[name]
        if self.store is None or "/" in name or name in (".", "..") or not name:
            return None
        try:
            child = self.store.child(name)
            return child if child.has_adapter() else None
        except (ValueError, FetchError):  # an odd name; a store never listed (logged there)
            return None

    def known(self, name: str) -> bool:
        with self._lock:
            if name in self._host or name in self._loading:
                return True
        return self.source_of(name) is not None

    def reads_waiting_since(self) -> float | None:
        """When the oldest read queued for the reader process or in it was queued (monotonic
        seconds; a remote adapter's download before it not counted), None while none is."""
        with self._lock:
            return min(self._read_queued.values(), default=None)

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._host

    def info(self, name: str) -> AdapterInfo | None:
        with self._lock:
            host = self._host.get(name)
            if host is not None and host.adapter is not None:
                return AdapterInfo(name, host.adapter.kind, True,
                                   "device" if self.slots.holds(name) else "host")
        source = self.source_of(name)
        return _unloaded_info(name, source) if source else None

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            infos = {name: AdapterInfo(name, h.adapter.kind, True,
                                       "device" if self.slots.holds(name) else "host")
                     for name, h in self._host.items() if h.adapter is not None}
        if self.store is not None:
            try:
                names = self.store.adapter_names()
            except FetchError as exc:  # a remote store that cannot be listed: the loaded ones
                logger.warning("%s", exc)
                names = []
            for name in names:
                if name not in infos:
                    infos[name] = _unloaded_info(name, self.store.child(name))
        return sorted(infos.values(), key=lambda i: i.name)

    # ---- loading ----------------------------------------------------------------------------

    def request_load(self, name: str, path: Path | str | Location | None = None, *,
                     pinned: bool = False) -> Future[None]:
        """Start loading `name` (from `path`: a folder or a URL; or from the adapter folder)
        unless it is loaded or loading; the future resolves when it is on the host (or fails
        with AdapterError). A remote adapter is fetched first, once however many ask."""
        with self._lock:
            if name in self._host:
                done: Future[None] = Future()
                done.set_result(None)
                return done
            if name in self._loading:
                return self._loading[name]
            self._failed.pop(name, None)
            if path is not None:
                self._registered[name] = (path if isinstance(path, Location)
                                          else self.locate(path))
            source = self.source_of(name)
            if source is None:
                raise EngineError(f"The model `{name}` does not exist.", status=404)
            if source.remote:
                future = self._downloads.submit(self._fetch_and_load, name, source, pinned)
            else:
                future = self._queue_read(name, source.fetch(), pinned)
            self._loading[name] = future
            return future

    def _fetch_and_load(self, name: str, source: Location, pinned: bool) -> None:
        try:
            path = source.fetch()
        except Exception as exc:
            self._load_failed(name, exc)
            raise
        with self._lock:
            future = self._queue_read(name, path, pinned)
        future.result()

    def _queue_read(self, name: str, path: Path, pinned: bool) -> Future[None]:
        """Queue `name`'s read on the loader thread (the caller holds the lock)."""
        self._read_queued[name] = time.monotonic()
        return self._executor.submit(self._load, name, path, pinned)

    def _load_failed(self, name: str, exc: Exception) -> None:
        with self._lock:
            self._loading.pop(name, None)
            self._read_queued.pop(name, None)
            self._failed[name] = exc
            self._registered.pop(name, None)

    def _load(self, name: str, path: Path, pinned: bool) -> None:
        start = time.monotonic()
        try:
            read = self.reader.read(path, self.shapes, name=name, max_rank=self.max_lora_rank,
                                    groups=self.groups)
            adapter = read.adapter
            terms = self.static.static_terms(adapter)
            self.slots.check_fits(name, adapter, terms)  # an accelerator's byte budget
        except Exception as exc:
            self._load_failed(name, exc)
            raise
        host = HostAdapter(adapter, terms, next(self._load_ids), pinned=pinned,
                           nbytes=host_bytes(adapter, terms), images=read.images)
        with self._lock:
            self._host[name] = host
            self._loading.pop(name, None)
            self._read_queued.pop(name, None)
        seconds = time.monotonic() - start
        logger.info("loaded adapter %s (%s, %d bytes) in %.2fs", name, adapter.kind,
                    host.nbytes, seconds)
        if self.listener:
            self.listener.on_adapter_loaded(name, seconds)
            self.listener.on_adapter_location(name, "host")
        self._trim_host(keep=name)  # it waits for its first step: never evicted before it

    def status(self, name: str) -> str:
        """"ready" (on the host), "loading", "failed" or "unknown"."""
        with self._lock:
            if name in self._host:
                return "ready"
            if name in self._loading:
                return "loading"
            if name in self._failed:
                return "failed"
        return "unknown"

    def take_failure(self, name: str) -> Exception | None:
        with self._lock:
            return self._failed.get(name)

    def get(self, name: str | None) -> HostAdapter | None:
        """The host entry of a loaded adapter (None: the base, or an adapter not loaded)."""
        if name is None:
            return self.base
        with self._lock:
            host = self._host.get(name)
            if host is not None:
                self._host.move_to_end(name)
                host.last_used = time.monotonic()
            return host

    def acquire(self, name: str) -> None:
        with self._lock:
            self._refs[name] += 1

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1
            if self._refs[name] <= 0:
                del self._refs[name]
        self._trim_host()

    def unload(self, name: str) -> None:
        """Forget a loaded adapter whose requests have all finished."""
        with self._lock:
            host = self._host.get(name)
            if host is None:
                raise EngineError(f"The adapter `{name}` is not loaded.", status=404)
            if self._refs[name]:
                raise RuntimeError(f"adapter {name} still has {self._refs[name]} requests")
            del self._host[name]
            self._registered.pop(name, None)
        self.slots.drop(name)
        if self.listener:
            self.listener.on_adapter_location(name, None)
        self._report_memory()

    def refs(self, name: str) -> int:
        with self._lock:
            return self._refs[name]

    def _trim_host(self, keep: str | None = None) -> None:
        """Evict least recently used host adapters while there are more than max_cpu_adapters
        or they hold more than max_cpu_memory bytes (never pinned ones, ones with requests,
        ones in a device slot, or `keep`: those may hold the host over its bounds)."""
        evicted = []
        with self._lock:
            excess = len(self._host) - self.max_cpu_adapters
            over = (sum(map(self.slots.host_nbytes, self._host.values()))
                    - self.max_cpu_memory if self.max_cpu_memory is not None else 0)
            for name, host in list(self._host.items()):
                if excess <= 0 and over <= 0:
                    break
                if host.pinned or self._refs[name] or name == keep or (
                        self.slots.holds(name) and not self.slots.slots_on_host):
                    continue
                del self._host[name]
                evicted.append(name)
                excess -= 1
                over -= self.slots.host_nbytes(host)
        for name in evicted:
            if self.listener:
                self.listener.on_adapter_evicted(name, "host")
                self.listener.on_adapter_location(name, None)
        self._report_memory()

    def memory(self) -> dict[str, tuple[int, int]]:
        """Per tier, (adapters resident, bytes): "host", the loaded adapters' tensors and
        static terms (on the CPU, once written, their slots: the only copy); "device", the
        adapters in slots and the slot tensors' bytes (on the CPU the same memory, with the
        free slots)."""
        with self._lock:
            host = (len(self._host), sum(map(self.slots.host_nbytes, self._host.values())))
        slots = self.slots.nbytes()
        owners = self.slots.owners()
        with self._lock:
            resident = sum(n in self._host and self._host[n].load_id == load_id
                           for n, load_id in owners if n is not None)
        return {"host": host, "device": (resident, slots)}

    def _report_memory(self) -> None:
        if self.listener:
            for tier, (count, nbytes) in self.memory().items():
                self.listener.on_adapter_memory(tier, count, nbytes)

    # ---- device slots (engine/adapter_slots.py) ----------------------------------------------

    @property
    def base(self) -> HostAdapter | None:
        """The base's host entry when it needs a slot of its own (merged static terms)."""
        return self.slots.base

    def can_bind(self, names: Collection[str], extra: str) -> bool:
        return self.slots.can_bind(names, extra)

    def bind(self, names: Iterable[str]) -> dict[str | None, int]:
        return self.slots.bind(names)

    def expert_counts_buffer(self) -> torch.Tensor | None:
        return self.slots.expert_counts_buffer()

    def slot_owner(self, slot: int) -> str | None:
        return self.slots.slot_owner(slot)

    def _peek(self, name: str) -> HostAdapter | None:
        """The host entry of `name` without touching its LRU place."""
        with self._lock:
            return self._host.get(name)

    def shutdown(self) -> None:
        self._downloads.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


def host_bytes(adapter: Adapter, terms: dict[str, Factors]) -> int:
    """Bytes an adapter holds in host memory: its factors, routers and static terms."""
    tensors = [t for layer in adapter.layers.values()
               for t in (layer.lora_a, layer.lora_b, layer.router) if t is not None]
    tensors += [t for factors in terms.values() for t in factors]
    return sum(t.nbytes for t in tensors)


def _unloaded_info(name: str, source: Location) -> AdapterInfo:
    """An adapter not in memory: "disk" (a local folder, or a remote one already cached, whose
    kind its config tells) or "remote" (not downloaded yet: kind "unknown")."""
    local = source.local()
    if local is None:
        return AdapterInfo(name, "unknown", False, "remote")
    return AdapterInfo(name, _kind_on_disk(local), False, "disk")


def _kind_on_disk(path: Path) -> str:
    try:
        peft_type = json.loads((path / CONFIG_FILE).read_text()).get("peft_type", "")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return {"GOAT": "goat", "LORA": "lora"}.get(peft_type, "unknown")
