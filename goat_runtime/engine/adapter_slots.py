"""Device slots: the stacked tensors the routed op reads, one slot per adapter, written from
the host entries the adapter manager (engine/adapter_manager.py) keeps.

On an accelerator the slots are a pool, reused LRU, and a step serves at most as many distinct
adapters as it has slots: `max_loras`, or with a byte budget (`--max-gpu-adapter-memory`) as
many as the budget holds at one slot's bytes, at most `max_loras`. A slot is sized to the
largest rank and expert count in the pool (one stacked tensor per linear), so its
bytes change as adapters come and go: before a step's adapters are written the pool is resized
for them and the count recomputed within the budget (`_fit`).

On the CPU the slots are host memory too, so they are not a bound: every adapter on the host
keeps its slot, written once after its load (not per use), the pool starts with a slot for
each adapter the host LRU keeps (--max-cpu-adapters) and grows (doubling) only when requests
hold more, a slot is reused once its adapter has left the host, and any number of distinct
adapters can share a step. Once written, the slot is the adapter's only copy: its host tensors
are released (`release_host_copies`; the pool's regrowth copies slots, not host tensors), so
host memory holds each adapter once. The base, when it needs a slot (merged static terms), owns
the extra last slot.
"""

import ctypes
import ctypes.util
import functools
import logging
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, cast

import torch

from goat_runtime.adapters.format import Adapter, AdapterError
from goat_runtime.adapters.slots import (
    SlotImage,
    allocate_slots,
    slice_rows,
    slot_image,
    write_image,
)
from goat_runtime.adapters.static import Factors
from goat_runtime.engine.outputs import EngineListener
from goat_runtime.model.layers import FusedLinear
from goat_runtime.ops import RoutedLoRAWeights

logger = logging.getLogger(__name__)


class SlotBudgetError(ValueError):
    """The accelerator's adapter slot budget cannot hold the slots asked of it (a flag to
    change, not a bug): start-up reports it in one line."""


@dataclass
class HostAdapter:
    adapter: Adapter | None  # None: the base model's own slot (merged static terms undone)
    terms: dict[str, Factors]  # static terms on top of the served weights
    load_id: int  # distinguishes a reload under the same name (prefix-cache keys use it)
    pinned: bool = False
    nbytes: int = 0  # host memory of its tensors and static terms (the byte budget counts it)
    last_used: float = field(default_factory=time.monotonic)
    in_slot: bool = False  # CPU: its slot is its only copy (its tensors are meta tensors)
    # Its values laid out for the slots, one image per linear (the reader process makes
    # them); None: laid out from `adapter` at each write (the base's slot, tests).
    images: list[SlotImage] | None = None

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
                 peek: Callable[[str], HostAdapter | None], on_change: Callable[[], None],
                 max_bytes: int | None = None, slots_on_host: bool | None = None,
                 host_slots: int = 0):
        """max_loras: the accelerator's most slots; max_bytes: the accelerator pool's bytes
        (None: max_loras slots whatever their size); slots_on_host: whether slots are host
        memory, by default where the linears' weights are (False on CPU tensors: the
        accelerator's pool logic, for tests); host_slots: the host pool's first size (the host
        LRU's bound), at least max_loras."""
        self.linears, self.max_loras, self.listener = linears, max_loras, listener
        self._get, self._peek, self._on_change = get, peek, on_change
        self.slots_on_host = (linears[0].weight.device.type == "cpu" if slots_on_host is None
                              else slots_on_host)
        self.max_bytes = None if self.slots_on_host else max_bytes
        if max_bytes is not None and self.slots_on_host:
            logger.info("the adapter slot budget (%d bytes) is for accelerators: on the CPU "
                        "slots are host memory", max_bytes)
        self.cost = slot_cost(linears)
        self._needs_cache: dict[str, tuple[int, Needs]] = {}  # name -> (load_id, its needs)
        self._base_needs: tuple[HostAdapter, Needs] | None = None
        self._value_rows, self._max_experts = 1, 0
        self.base: HostAdapter | None = None
        # On the host, slots for every adapter the LRU keeps, so that the pool rarely grows:
        # growing copies every slot on the engine thread (64 SmolLM2-sized GOAT slots: 1-2 s
        # of one step). Unwritten slots are unset memory, untouched until written.
        count = (max(max_loras, host_slots) if self.slots_on_host
                 else self._count_at(Needs(1, 0)))
        if count < 1:
            raise SlotBudgetError(self._too_small(Needs(1, 0), "an adapter slot"))
        # Slot i holds _slots[i] (a name) or None.
        self._slots: list[str | None] = [None] * count
        self._slot_used: list[float] = [0.0] * count
        self._slot_ids: list[int] = [0] * count  # the load_id written in each slot
        self._allocate()

    def set_base(self, base: HostAdapter) -> None:
        """Give the base a slot of its own (its static terms undo the merged ones); on an
        accelerator with a byte budget it takes its share of the budget."""
        self.base = base
        if self.slots_on_host:
            self._allocate()
        else:
            needs = self._step_needs(())
            self._resize(Needs(max(needs.rows, self._value_rows),
                               max(needs.experts, self._max_experts)), set())

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
        """Whether `extra` can join a step whose adapters are `names`: on the CPU always; on an
        accelerator while the step's distinct adapters are no more than the slots a pool sized
        for them has (max_loras, or what the byte budget holds at the size the largest of them
        needs). A lone adapter always may: one too large for the budget fails in `bind`."""
        if self.slots_on_host or extra in names:
            return True
        wanted = {*names, extra}
        return len(wanted) <= max(1, self._count_at(self._step_needs(wanted)))

    def bind(self, names: Iterable[str]) -> dict[str | None, int]:
        """Put the step's adapters in device slots (evicting least recently used ones outside
        the step); returns name -> slot, with None -> the base's slot (-1 when the base needs
        none)."""
        names = set(names)
        if not self.slots_on_host:
            self._fit(names)
            if len(names) > len(self._slots):
                raise RuntimeError(f"{len(names)} adapters in one step, the device pool has "
                                   f"{len(self._slots)} slots")
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

    def _needs(self, host: HostAdapter) -> "Needs":
        rows, experts = 1, 0
        for linear in self.linears:
            for module in linear.slice_names:
                delta = host.adapter.layers.get(module) if host.adapter else None
                r, e = slice_rows(delta, host.terms.get(module))
                rows, experts = max(rows, r), max(experts, e)
        return Needs(rows, experts)

    def _write_host(self, slot: int, host: HostAdapter,
                    routed: list[RoutedLoRAWeights] | None = None) -> None:
        """Write `host` into `slot` of the linears' slots (or of `routed`, one per linear)."""
        with torch.no_grad():
            for i, linear in enumerate(self.linears):
                if host.images is not None:
                    image = host.images[i]
                else:
                    image = slot_image([host.adapter.layers.get(n) if host.adapter else None
                                        for n in linear.slice_names],
                                       linear.out_sizes, linear.d_in)
                write_image(routed[i] if routed is not None else _attached(linear), slot, image,
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
        # CPU: unwritten slots left unset take no memory until written (a pool doubled from
        # 512 to 1,024 SmolLM2-sized slots zeroed 15 GB at once, beside the old 7.5).
        routed = [allocate_slots(num_slots, linear.out_sizes, linear.d_in,
                                 value_rows=self._value_rows, max_experts=self._max_experts,
                                 dtype=linear.weight.dtype, device=linear.weight.device,
                                 zeroed=not self.slots_on_host)
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
        if self.listener:
            self.listener.on_adapter_slots(len(self._slots), self.slot_bytes(),
                                           not self.slots_on_host)

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
        return self._slots[slot] if 0 <= slot < len(self._slots) else None

    # ---- the accelerator's pool: slots counted within a byte budget ---------------------------

    def num_slots(self) -> int:
        """Adapter slots in the pool (the base's own not counted)."""
        return len(self._slots)

    def slot_bytes(self) -> int:
        """Bytes one slot takes at the pool's current size."""
        return self.cost.nbytes(Needs(self._value_rows, self._max_experts))

    def check_fits(self, name: str, adapter: Adapter, terms: dict[str, Factors]) -> None:
        """Raise AdapterError if an accelerator pool with a byte budget cannot hold `adapter`
        in even one slot (beside the base's), so that its load fails with the reason instead
        of its requests waiting for a slot that can never be."""
        if self.slots_on_host or self.max_bytes is None:
            return
        needs = self._step_needs(())
        own = self._needs(HostAdapter(adapter, terms, load_id=0))
        needs = Needs(max(needs.rows, own.rows), max(needs.experts, own.experts))
        if self._count_at(needs) < 1:
            raise AdapterError(self._too_small(needs, f"adapter {name}'s slot"))

    def _count_at(self, needs: "Needs") -> int:
        """Adapter slots of this size the pool has: max_loras, or fewer where the byte budget
        (less the base's slot, if any) holds fewer."""
        if self.max_bytes is None:
            return self.max_loras
        held = self.max_bytes // self.cost.nbytes(needs) - (1 if self.base else 0)
        return min(self.max_loras, held)

    def _too_small(self, needs: "Needs", what: str) -> str:
        beside = " beside the base model's own slot" if self.base else ""
        return (f"--max-gpu-adapter-memory ({self.max_bytes} bytes) cannot hold {what}"
                f"{beside}: one takes {self.cost.nbytes(needs)} bytes ({needs.rows} value rows "
                f"and {needs.experts} router rows per slice, all linears)")

    def _needs_of(self, name: str) -> "Needs":
        """The slot size a loaded adapter needs (cached per load; (1, 0) if not loaded)."""
        host = self._peek(name)
        if host is None:
            return Needs(1, 0)
        cached = self._needs_cache.get(name)
        if cached is None or cached[0] != host.load_id:
            cached = self._needs_cache[name] = (host.load_id, self._needs(host))
        return cached[1]

    def _needs_of_base(self) -> "Needs":
        """The base's slot size (computed once: admission asks for it per waiting sequence)."""
        if self.base is None:
            return Needs(1, 0)
        if self._base_needs is None or self._base_needs[0] is not self.base:
            self._base_needs = (self.base, self._needs(self.base))
        return self._base_needs[1]

    def _step_needs(self, names: Iterable[str]) -> "Needs":
        """The slot size a step of these adapters (and the base's slot, if any) needs."""
        needs = [self._needs_of_base()] if self.base else []
        needs += [self._needs_of(name) for name in names]
        return Needs(max((n.rows for n in needs), default=1),
                     max((n.experts for n in needs), default=0))

    def _fit(self, names: set[str]) -> None:
        """Size the pool for a step of `names` before any of them is written: grown to fit
        them beside the adapters it holds where the budget leaves enough slots, else sized
        for the step alone (the others leave the pool, least recently used first)."""
        step = self._step_needs(names)
        grown = Needs(max(step.rows, self._value_rows), max(step.experts, self._max_experts))
        target = grown if self._count_at(grown) >= len(names) else step
        if target != (self._value_rows, self._max_experts):
            self._resize(target, names)

    def _resize(self, needs: "Needs", keep: set[str]) -> None:
        """Reallocate the pool with slots of `needs` and as many as the budget then holds,
        keeping the adapters in `keep`, then the most recently used ones that still fit; all
        or nothing. Raises SlotBudgetError if the budget holds fewer slots than `keep` needs."""
        count = self._count_at(needs)
        if count < max(1, len(keep)):
            raise SlotBudgetError(self._too_small(needs, f"{max(1, len(keep))} adapter slots"
                                                  if len(keep) > 1 else "an adapter slot"))
        held = {i: name for i, name in enumerate(self._slots) if name is not None
                and self._slot_of(name, self._peek(name)) == i}
        fitting = [i for i, name in held.items() if self._needs_of(name).rows <= needs.rows
                   and self._needs_of(name).experts <= needs.experts]
        fitting.sort(key=lambda i: (self._slots[i] not in keep, -self._slot_used[i]))
        kept = fitting[:count]
        before = (self._slots, self._slot_used, self._slot_ids, self._value_rows,
                  self._max_experts)
        free = count - len(kept)
        self._slots = [self._slots[i] for i in kept] + [None] * free
        self._slot_used = [self._slot_used[i] for i in kept] + [0.0] * free
        self._slot_ids = [self._slot_ids[i] for i in kept] + [0] * free
        self._value_rows, self._max_experts = needs
        try:
            self._allocate()
        except Exception:  # the old tensors are still attached (see _allocate)
            (self._slots, self._slot_used, self._slot_ids, self._value_rows,
             self._max_experts) = before
            raise
        for i, name in held.items():
            if i not in kept and self.listener:
                self.listener.on_adapter_evicted(name, "device")
                self.listener.on_adapter_location(name, "host")
        logger.info("adapter slots: %d of %d bytes (%d value rows, %d router rows per slice)",
                    count, self.slot_bytes(), *needs)
        self._on_change()


class Needs(NamedTuple):
    """A slot's size: value rows (experts' and static rows) and router rows per slice."""
    rows: int
    experts: int


@dataclass(frozen=True)
class SlotCost:
    """The bytes one slot takes in all the linears' slot tensors: linear in its value rows and
    router rows (allocate_slots' layout, measured once on the meta device)."""
    fixed: int
    per_row: int
    per_expert: int

    def nbytes(self, needs: Needs) -> int:
        return self.fixed + needs.rows * self.per_row + needs.experts * self.per_expert


def slot_cost(linears: list[FusedLinear]) -> SlotCost:
    def measure(rows: int, experts: int) -> int:
        return sum(t.nbytes for linear in linears for t in _slot_tensors(allocate_slots(
            1, linear.out_sizes, linear.d_in, value_rows=rows, max_experts=experts,
            dtype=linear.weight.dtype, device="meta")))

    fixed = measure(0, 0)
    return SlotCost(fixed, measure(1, 0) - fixed, measure(0, 1) - fixed)


def release_host_copies(host: HostAdapter) -> None:
    """Replace a host entry's factors, routers and static terms by meta tensors of their shapes
    (what slot sizing reads) and drop its images, freeing their memory: on the CPU, once
    written, its slot is the adapter's only copy."""
    meta = torch.device("meta")
    if host.adapter is not None:
        for layer in host.adapter.layers.values():
            if layer.lora_a.is_meta:  # a read's adapter: its values came as images
                continue
            layer.lora_a, layer.lora_b = layer.lora_a.to(meta), layer.lora_b.to(meta)
            layer.router = None if layer.router is None else layer.router.to(meta)
    host.terms = {m: (c.to(meta), d.to(meta)) for m, (c, d) in host.terms.items()}
    host.images = None
    host.in_slot = True
    _return_freed_memory()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None  # glibc only
    return cast(Callable[[int], int] | None, trim)


def _return_freed_memory() -> None:
    """Hand the pages malloc keeps free back to the system. glibc keeps a freed adapter's
    temporaries (static terms, slot writes) in its heap once big frees have raised its
    thresholds: with 100 adapters RSS grew 26.5 MB an adapter against 18.8 MB of slot pool,
    18.9 MB with this. About 1 ms a load, the GIL released (ctypes)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def copy_slot(old: RoutedLoRAWeights, new: RoutedLoRAWeights, slot: int) -> None:
    """Copy `slot` of `old` into the same slot of `new`, whose slots are at least as large (more
    value rows or router rows: the extra ones are zeroed, which the op reads as no term)."""
    rows, experts = old.num_value_rows, old.max_experts
    new.shrink[slot, :, :rows] = old.shrink[slot]
    new.shrink[slot, :, rows:].zero_()  # `new` may be unset (allocate_slots(zeroed=False))
    new.router[slot, :, :experts] = old.router[slot]
    new.router[slot, :, experts:].zero_()
    new.expand[slot, :rows] = old.expand[slot]
    new.expand[slot, rows:].zero_()
    new.slice_meta[slot] = old.slice_meta[slot]


def _attached(linear: FusedLinear) -> RoutedLoRAWeights:
    """The slots attached to `linear` (by DeviceSlots' constructor)."""
    if linear.routed is None:
        raise RuntimeError(f"no adapter slots are attached to {linear.slice_names}")
    return linear.routed


def _slot_tensors(routed: RoutedLoRAWeights) -> list[torch.Tensor]:
    return [routed.shrink, routed.router, routed.expand, routed.slice_meta]
