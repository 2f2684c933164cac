"""Adapters by name across three tiers: a store (the adapter directory: a local folder, an S3
prefix or a Hub repository, goat_runtime/adapters/store.py), host memory (an LRU of
loaded, checked adapters with their static terms) and device slots (the stacked tensors the
routed op reads, one slot per adapter).

On an accelerator there are `max_loras` slots, so a step serves at most that many distinct
adapters and slots are reused LRU. On the CPU the slots are host memory too, so they are not a
bound: every adapter on the host keeps its slot, written once after its load (not per use), the
pool grows (doubling) when all are taken, a slot is reused once its adapter has left the host,
and any number of distinct adapters can share a step.

Loading from disk runs on one background thread, so the running batch never waits for it
(remote adapters are first fetched into a local cache on a small pool of download threads); the
scheduler admits a request once its adapter is on the host, and `bind` puts a step's adapters
in slots before the forward. The same name requested twice while loading loads once. Every
static-component computation runs on that same thread (StaticComponents is not thread-safe).
"""

import itertools
import json
import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from goat_runtime.adapters.binding import linear_shapes, slice_weights
from goat_runtime.adapters.format import CONFIG_FILE, Adapter, AdapterError, load_adapter
from goat_runtime.adapters.slots import allocate_slots, slice_rows, write_slot
from goat_runtime.adapters.static import Factors, StaticComponents, most_common_signature
from goat_runtime.adapters.store import FetchError, Location, StoreConfig, open_location
from goat_runtime.engine.outputs import AdapterInfo, EngineError, EngineListener
from goat_runtime.model.layers import FusedLinear
from goat_runtime.ops import RoutedLoRAWeights

logger = logging.getLogger(__name__)


@dataclass
class HostAdapter:
    adapter: Adapter | None  # None: the base model's own slot (merged static terms undone)
    terms: dict[str, Factors]  # static terms on top of the served weights
    load_id: int  # distinguishes a reload under the same name (prefix-cache keys use it)
    pinned: bool = False
    nbytes: int = 0  # host memory of its tensors and static terms (the byte budget counts it)
    last_used: float = field(default_factory=time.monotonic)

    @property
    def cache_key(self) -> str:
        return f"{self.adapter.name if self.adapter else ''}#{self.load_id}"


class AdapterManager:
    def __init__(self, linears: list[FusedLinear], *, adapter_dir: Path | str | None,
                 max_loras: int, max_cpu_adapters: int, max_lora_rank: int,
                 static_cache_dir: Path | None, listener: EngineListener | None = None,
                 store_config: StoreConfig | None = None, max_cpu_memory: int | None = None):
        self.linears = linears
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
        self.static = StaticComponents(slice_weights(linears), static_cache_dir)
        self._lock = threading.Lock()  # host/loading maps: read by the server thread too
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()  # LRU order
        self._loading: dict[str, Future[None]] = {}
        self._failed: dict[str, Exception] = {}
        self._registered: dict[str, Location] = {}  # loaded by path (not from the adapter dir)
        self._refs: Counter[str] = Counter()  # unfinished requests per adapter
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader")
        self._downloads = ThreadPoolExecutor(4, thread_name_prefix="adapter-download")
        self._load_ids = itertools.count(1)
        # Device slots: slot i holds _slots[i] (a name) or None; the base, when it needs a slot
        # (merged static terms), owns the extra last slot.
        self._slots: list[str | None] = [None] * max_loras
        self._slot_used: list[float] = [0.0] * max_loras
        self._slot_ids: list[int] = [0] * max_loras  # the load_id written in each slot
        self.slots_on_host = linears[0].weight.device.type == "cpu"
        self._value_rows, self._max_experts = 1, 0
        self.base: HostAdapter | None = None
        self._allocate()

    # ---- start-up --------------------------------------------------------------------------

    def merge_static(self, names_and_paths: Iterable[tuple[str, Path]]) -> None:
        """Fold the most common GOAT init signature among these adapters into the base weights;
        the base then keeps a slot of its own to undo it."""
        adapters = []
        for name, path in names_and_paths:
            try:
                adapters.append(load_adapter(path, self.shapes, name=name,
                                             max_rank=self.max_lora_rank))
            except AdapterError as exc:
                logger.warning("merge-static: skipping %s: %s", name, exc)
        chosen = most_common_signature(adapters)
        if chosen is None:
            logger.info("merge-static: no GOAT adapter found, nothing merged")
            return
        signature, modules, count = chosen
        self.static.merge(signature, sorted(modules))
        logger.info("merged the static components of %s (%d adapters)", signature.slug(), count)
        self.base = HostAdapter(None, self.static.static_terms(None), load_id=0, pinned=True)
        self._allocate()

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

    def is_loaded(self, name: str) -> bool:
        with self._lock:
            return name in self._host

    def info(self, name: str) -> AdapterInfo | None:
        with self._lock:
            host = self._host.get(name)
            if host is not None and host.adapter is not None:
                return AdapterInfo(name, host.adapter.kind, True,
                                   "device" if name in self._slots else "host")
        source = self.source_of(name)
        return _unloaded_info(name, source) if source else None

    def infos(self) -> list[AdapterInfo]:
        with self._lock:
            infos = {name: AdapterInfo(name, h.adapter.kind, True,
                                       "device" if name in self._slots else "host")
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
                future = self._executor.submit(self._load, name, source.fetch(), pinned)
            self._loading[name] = future
            return future

    def _fetch_and_load(self, name: str, source: Location, pinned: bool) -> None:
        try:
            path = source.fetch()
        except Exception as exc:
            self._load_failed(name, exc)
            raise
        self._executor.submit(self._load, name, path, pinned).result()

    def _load_failed(self, name: str, exc: Exception) -> None:
        with self._lock:
            self._loading.pop(name, None)
            self._failed[name] = exc
            self._registered.pop(name, None)

    def _load(self, name: str, path: Path, pinned: bool) -> None:
        start = time.monotonic()
        try:
            adapter = load_adapter(path, self.shapes, name=name, max_rank=self.max_lora_rank)
            terms = self.static.static_terms(adapter)
        except Exception as exc:
            self._load_failed(name, exc)
            raise
        host = HostAdapter(adapter, terms, next(self._load_ids), pinned=pinned,
                           nbytes=host_bytes(adapter, terms))
        with self._lock:
            self._host[name] = host
            self._loading.pop(name, None)
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
        self._drop_slot(name)
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
            over = (sum(h.nbytes for h in self._host.values()) - self.max_cpu_memory
                    if self.max_cpu_memory is not None else 0)
            for name, host in list(self._host.items()):
                if excess <= 0 and over <= 0:
                    break
                if host.pinned or self._refs[name] or name == keep or (
                        name in self._slots and not self.slots_on_host):
                    continue
                del self._host[name]
                evicted.append(name)
                excess -= 1
                over -= host.nbytes
        for name in evicted:
            if self.listener:
                self.listener.on_adapter_evicted(name, "host")
                self.listener.on_adapter_location(name, None)
        self._report_memory()

    def memory(self) -> dict[str, tuple[int, int]]:
        """Per tier, (adapters resident, bytes): "host", the loaded adapters' tensors and
        static terms; "device", the adapters in slots and the slot tensors' bytes."""
        with self._lock:
            host = (len(self._host), sum(h.nbytes for h in self._host.values()))
        slots = sum(t.nbytes for linear in self.linears
                    for t in _slot_tensors(_attached(linear)))
        # A snapshot: the engine thread writes them (zip stops at the shorter while one grows)
        owners = list(zip(self._slots, self._slot_ids, strict=False))
        with self._lock:
            resident = sum(n in self._host and self._host[n].load_id == load_id
                           for n, load_id in owners if n is not None)
        return {"host": host, "device": (resident, slots)}

    def _report_memory(self) -> None:
        if self.listener:
            for tier, (count, nbytes) in self.memory().items():
                self.listener.on_adapter_memory(tier, count, nbytes)

    # ---- device slots -----------------------------------------------------------------------

    def can_bind(self, names: Collection[str], extra: str) -> bool:
        """Whether `extra` can join a step whose adapters are `names`: on an accelerator at most
        max_loras distinct adapters per step, as many as there are slots; on the CPU any."""
        return self.slots_on_host or extra in names or len(names) < self.max_loras

    def bind(self, names: Iterable[str]) -> dict[str | None, int]:
        """Put the step's adapters in device slots (evicting least recently used ones outside
        the step); returns name -> slot, with None -> the base's slot (-1 when the base needs
        none)."""
        names = set(names)
        if len(names) > self.max_loras and not self.slots_on_host:
            raise RuntimeError(f"{len(names)} adapters in one step, max_loras is {self.max_loras}")
        now = time.monotonic()
        slots: dict[str | None, int] = {}
        for name in sorted(names):
            slot = self._slot_of(name, self.get(name))
            if slot is None:
                slot = self._free_slot(names)
                self._write(slot, name)
            self._slot_used[slot] = now
            slots[name] = slot
        # The base's slot is the last one (after the writes: a pool that grew moved it).
        return {None: len(self._slots) if self.base else -1, **slots}

    def _peek(self, name: str) -> HostAdapter | None:
        """The host entry of `name` without touching its LRU place."""
        with self._lock:
            return self._host.get(name)

    def _slot_of(self, name: str, host: HostAdapter | None) -> int | None:
        """The slot holding this load of `name`, if any (not an earlier load's stale copy; a
        name is in one slot at most, see _write)."""
        try:
            slot = self._slots.index(name)
        except ValueError:
            return None
        return slot if host is not None and self._slot_ids[slot] == host.load_id else None

    def _free_slot(self, keep: set[str]) -> int:
        if self.slots_on_host:  # slots of adapters gone from the host, else a bigger pool
            for i, owner in enumerate(self._slots):
                if owner is None or self._slot_of(owner, self._peek(owner)) != i:
                    self._slots[i] = None
                    return i
            self._grow_slots()
            return self._free_slot(keep)
        candidates = [i for i, n in enumerate(self._slots) if n is None or n not in keep]
        slot = min(candidates, key=lambda i: (self._slots[i] is not None, self._slot_used[i]))
        old = self._slots[slot]
        if old is not None:
            self._slots[slot] = None
            if self.listener:
                self.listener.on_adapter_evicted(old, "device")
                self.listener.on_adapter_location(old, "host")
        return slot

    def _write(self, slot: int, name: str) -> None:
        host = self.get(name)
        if host is None:
            raise RuntimeError(f"adapter {name} is not loaded")
        value_rows, experts = self._needs(host)
        if value_rows > self._value_rows or experts > self._max_experts:
            # Slots are sized to the largest resident adapter (the kernel reads every value row
            # of a slice), so a bigger one regrows them all.
            before = self._value_rows, self._max_experts
            self._value_rows = max(self._value_rows, value_rows)
            self._max_experts = max(self._max_experts, experts)
            try:
                self._allocate()
            except Exception:  # the old slots are intact (see _allocate): keep their sizes
                self._value_rows, self._max_experts = before
                raise
        self._write_host(slot, host)  # a failure leaves the slot free (taken only below)
        self._drop_slot(name)  # an earlier load's copy (CPU: kept until its slot is reused)
        self._slots[slot], self._slot_ids[slot] = name, host.load_id
        if self.listener:
            self.listener.on_adapter_location(name, "device")
        self._report_memory()

    def _needs(self, host: HostAdapter) -> tuple[int, int]:
        rows, experts = 1, 0
        for linear in self.linears:
            for module in linear.slice_names:
                delta = host.adapter.layers.get(module) if host.adapter else None
                r, e = slice_rows(delta, host.terms.get(module))
                rows, experts = max(rows, r), max(experts, e)
        return rows, experts

    def _write_host(self, slot: int, host: HostAdapter,
                    routed: list[RoutedLoRAWeights] | None = None) -> None:
        """Write `host` into `slot` of the linears' slots (or of `routed`, one per linear)."""
        with torch.no_grad():
            for i, linear in enumerate(self.linears):
                deltas = [host.adapter.layers.get(n) if host.adapter else None
                          for n in linear.slice_names]
                write_slot(routed[i] if routed is not None else _attached(linear), slot, deltas,
                           [host.terms.get(n) for n in linear.slice_names])

    def _allocate(self) -> None:
        """(Re)allocate every linear's slots at the current size and rewrite their contents.
        All new tensors are allocated before any is installed, so that an allocation failure
        leaves the old slots as they were."""
        if self.base is not None:
            rows, experts = self._needs(self.base)
            self._value_rows = max(self._value_rows, rows)
            self._max_experts = max(self._max_experts, experts)
        num_slots = len(self._slots) + (1 if self.base else 0)
        routed = [allocate_slots(num_slots, linear.out_sizes, linear.d_in,
                                 value_rows=self._value_rows, max_experts=self._max_experts,
                                 dtype=linear.weight.dtype, device=linear.weight.device)
                  for linear in self.linears]
        hosts = [self._peek(name) if name else None for name in self._slots]
        hosts = [h if h is not None and h.load_id == load_id else None  # not stale copies
                 for h, load_id in zip(hosts, self._slot_ids, strict=True)]
        for slot, host in enumerate(hosts):
            if host is not None:
                self._write_host(slot, host, routed)
        if self.base is not None:
            self._write_host(len(self._slots), self.base, routed)
        for linear, slots in zip(self.linears, routed, strict=True):
            linear.routed = slots
        self._slots = [name if host is not None else None
                       for name, host in zip(self._slots, hosts, strict=True)]

    def _grow_slots(self) -> None:
        """Double the slot pool (CPU), keeping every slot's contents; all or nothing."""
        extra = len(self._slots)
        self._slots += [None] * extra
        self._slot_used += [0.0] * extra
        self._slot_ids += [0] * extra
        try:
            self._allocate()
        except Exception:
            del self._slots[-extra:], self._slot_used[-extra:], self._slot_ids[-extra:]
            raise
        logger.info("adapter slots grown to %d", len(self._slots))

    def _drop_slot(self, name: str) -> None:
        if name in self._slots:
            self._slots[self._slots.index(name)] = None

    def expert_counts_buffer(self) -> torch.Tensor | None:
        """A zeroed [slots, max experts] int64 tensor for the routed op to count into (None when
        no resident adapter has a router)."""
        if self._max_experts == 0:
            return None
        routed = _attached(self.linears[0])
        return torch.zeros(routed.shrink.shape[0], self._max_experts, dtype=torch.int64,
                           device=routed.shrink.device)

    def slot_owner(self, slot: int) -> str | None:
        return self._slots[slot] if 0 <= slot < self.max_loras else None

    def shutdown(self) -> None:
        self._downloads.shutdown(wait=False, cancel_futures=True)
        self._executor.shutdown(wait=False, cancel_futures=True)


def host_bytes(adapter: Adapter, terms: dict[str, Factors]) -> int:
    """Bytes an adapter holds in host memory: its factors, routers and static terms."""
    tensors = [t for layer in adapter.layers.values()
               for t in (layer.lora_a, layer.lora_b, layer.router) if t is not None]
    tensors += [t for factors in terms.values() for t in factors]
    return sum(t.nbytes for t in tensors)


def _attached(linear: FusedLinear) -> RoutedLoRAWeights:
    """The slots the manager attached to `linear` (in its constructor)."""
    if linear.routed is None:
        raise RuntimeError(f"no adapter slots are attached to {linear.slice_names}")
    return linear.routed


def _slot_tensors(routed: RoutedLoRAWeights) -> list[torch.Tensor]:
    return [routed.shrink, routed.router, routed.expand, routed.slice_meta]


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
