"""Device slots: the stacked tensors the routed op reads, one slot per adapter, written from
the host entries the adapter manager (engine/adapter_manager.py) keeps.

On an accelerator there are `max_loras` slots, so a step serves at most that many distinct
adapters and slots are reused LRU. On the CPU the slots are host memory too, so they are not a
bound: every adapter on the host keeps its slot, written once after its load (not per use), the
pool grows (doubling) when all are taken, a slot is reused once its adapter has left the host,
and any number of distinct adapters can share a step. Once written, the slot is the adapter's
only copy: its host tensors are released (`release_host_copies`; the pool's regrowth copies
slots, not host tensors), so host memory holds each adapter once. The base, when it needs a slot
(merged static terms), owns the extra last slot.
"""

import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import torch

from goat_runtime.adapters.format import Adapter
from goat_runtime.adapters.slots import allocate_slots, slice_rows, write_slot
from goat_runtime.adapters.static import Factors
from goat_runtime.engine.outputs import EngineListener
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
    in_slot: bool = False  # CPU: its slot is its only copy (its tensors are meta tensors)

    @property
    def cache_key(self) -> str:
        return f"{self.adapter.name if self.adapter else ''}#{self.load_id}"


class DeviceSlots:
    """The linears' slots and which adapter load each holds. `get` returns a loaded adapter's
    host entry and marks it used, `peek` returns it without that, `on_change` is called after
    a slot is written (the manager reports its memory)."""

    def __init__(self, linears: list[FusedLinear], max_loras: int,
                 listener: EngineListener | None, *,
                 get: Callable[[str], HostAdapter | None],
                 peek: Callable[[str], HostAdapter | None], on_change: Callable[[], None]):
        self.linears, self.max_loras, self.listener = linears, max_loras, listener
        self._get, self._peek, self._on_change = get, peek, on_change
        # Slot i holds _slots[i] (a name) or None.
        self._slots: list[str | None] = [None] * max_loras
        self._slot_used: list[float] = [0.0] * max_loras
        self._slot_ids: list[int] = [0] * max_loras  # the load_id written in each slot
        self.slots_on_host = linears[0].weight.device.type == "cpu"
        self._value_rows, self._max_experts = 1, 0
        self.base: HostAdapter | None = None
        self._allocate()

    def set_base(self, base: HostAdapter) -> None:
        """Give the base a slot of its own (its static terms undo the merged ones)."""
        self.base = base
        self._allocate()

    def holds(self, name: str) -> bool:
        """Whether some slot holds `name` (possibly an earlier load of it)."""
        return name in self._slots

    def owners(self) -> list[tuple[str | None, int]]:
        """(name, load_id) per slot; a snapshot: the engine thread writes them (zip stops at the
        shorter while one grows)."""
        return list(zip(self._slots, self._slot_ids, strict=False))

    def nbytes(self) -> int:
        """Bytes of the slot tensors of every linear."""
        return sum(t.nbytes for linear in self.linears
                   for t in _slot_tensors(_attached(linear)))

    def host_nbytes(self, host: HostAdapter) -> int:
        """Host memory of a host entry: its tensors, or on the CPU once written its slot (all
        slots have one size: the largest resident adapter's)."""
        return self._per_slot if host.in_slot else host.nbytes

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
            slot = self._slot_of(name, self._get(name))
            if slot is None:
                slot = self._free_slot(names)
                self._write(slot, name)
            self._slot_used[slot] = now
            slots[name] = slot
        # The base's slot is the last one (after the writes: a pool that grew moved it).
        return {None: len(self._slots) if self.base else -1, **slots}

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
        host = self._get(name)
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
        self.drop(name)  # an earlier load's copy (CPU: kept until its slot is reused)
        self._slots[slot], self._slot_ids[slot] = name, host.load_id
        if self.slots_on_host:  # the slot is host memory and never rewritten from the host
            release_host_copies(host)
        if self.listener:
            self.listener.on_adapter_location(name, "device")
        self._on_change()

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
            if host is not None and host.in_slot:  # CPU: the old slot is the only copy
                for linear, new in zip(self.linears, routed, strict=True):
                    copy_slot(_attached(linear), new, slot)
            elif host is not None:
                self._write_host(slot, host, routed)
        if self.base is not None:
            self._write_host(len(self._slots), self.base, routed)
        for linear, slots in zip(self.linears, routed, strict=True):
            linear.routed = slots
        self._per_slot = self.nbytes() // num_slots  # one slot of every linear
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

    def drop(self, name: str) -> None:
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


def release_host_copies(host: HostAdapter) -> None:
    """Replace a host entry's factors, routers and static terms by meta tensors of their shapes
    (what slot sizing reads), freeing their memory: on the CPU, once written, its slot is the
    adapter's only copy."""
    meta = torch.device("meta")
    if host.adapter is not None:
        for layer in host.adapter.layers.values():
            layer.lora_a, layer.lora_b = layer.lora_a.to(meta), layer.lora_b.to(meta)
            layer.router = None if layer.router is None else layer.router.to(meta)
    host.terms = {m: (c.to(meta), d.to(meta)) for m, (c, d) in host.terms.items()}
    host.in_slot = True


def copy_slot(old: RoutedLoRAWeights, new: RoutedLoRAWeights, slot: int) -> None:
    """Copy `slot` of `old` into the same slot of `new`, whose slots are at least as large (more
    value rows or router rows: the extra ones stay zero, which the op reads as no term)."""
    rows, experts = old.num_value_rows, old.max_experts
    new.shrink[slot, :, :rows] = old.shrink[slot]
    new.router[slot, :, :experts] = old.router[slot]
    new.expand[slot, :rows] = old.expand[slot]
    new.slice_meta[slot] = old.slice_meta[slot]


def _attached(linear: FusedLinear) -> RoutedLoRAWeights:
    """The slots attached to `linear` (by DeviceSlots' constructor)."""
    if linear.routed is None:
        raise RuntimeError(f"no adapter slots are attached to {linear.slice_names}")
    return linear.routed


def _slot_tensors(routed: RoutedLoRAWeights) -> list[torch.Tensor]:
    return [routed.shrink, routed.router, routed.expand, routed.slice_meta]
