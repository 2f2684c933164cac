"""The scheduler alone, stepped by hand: a sequence waiting for an adapter slot is not passed over
forever, and freeing a slot for it drains one adapter, not the whole batch."""

import itertools
from types import SimpleNamespace

import torch

from goat_runtime.engine.block_allocator import BlockAllocator, block_hash
from goat_runtime.engine.request import Request, Sequence, SequenceStatus
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.engine.scheduler import Scheduler, SchedulerConfig

OUTPUT_LEN = 6


class ResidentAdapters:
    """The part of AdapterManager the scheduler asks: every adapter is loaded, and a step holds
    at most `max_loras` distinct ones."""

    def __init__(self, max_loras: int):
        self.max_loras = max_loras
        self.load_id = 1

    def status(self, name: str) -> str:
        return "ready"

    def can_bind(self, names, extra: str) -> bool:
        return extra in names or len(names) < self.max_loras

    def get(self, name):
        return SimpleNamespace(cache_key=f"{name}#{self.load_id}")


class LostAdapters(ResidentAdapters):
    """Adapters reported ready whose host entry is gone by the time the scheduler asks."""

    def get(self, name):
        return None


def make_scheduler(max_loras: int, max_passed_over: int = 4) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, block_size=4,
                             max_passed_over=max_passed_over)
    return Scheduler(config, BlockAllocator(512), ResidentAdapters(max_loras))


_ids = itertools.count()


def add(scheduler: Scheduler, adapter: str | None) -> Sequence:
    request = Request(f"r{next(_ids)}", [5, 6, 7, 8, 9], SamplingParams(max_tokens=OUTPUT_LEN),
                      adapter)
    seq = Sequence(request, 0, torch.Generator())
    request.sequences.append(seq)
    scheduler.add(seq)
    return seq


def step(scheduler: Scheduler) -> list[Sequence]:
    """One engine step without a model: each scheduled sequence that reaches its end gets a
    token; sequences with OUTPUT_LEN tokens finish. Returns the sequences that ran."""
    items = scheduler.schedule()
    assert not scheduler.faults
    held = {i.seq.adapter for i in items if i.seq.adapter is not None}
    assert len(held) <= scheduler.adapters.max_loras
    for item in items:
        scheduler.computed(item)
        seq = item.seq
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(1)
            if len(seq.output_token_ids) == OUTPUT_LEN:
                scheduler.finish(seq)
    return [i.seq for i in items]


def test_waiting_adapter_gets_a_slot_while_the_other_adapters_keep_running():
    scheduler = make_scheduler(max_loras=2)
    # Two hot adapters fill both slots and keep sending requests; "cold" arrives among them.
    for adapter in ["hot-a", "hot-b"] * 2:
        add(scheduler, adapter)
    step(scheduler)
    add(scheduler, "hot-a")  # hot-a has more running sequences than hot-b from here on
    cold = add(scheduler, "cold")
    drained, admitted_while_draining = set(), set()
    for _ in range(60):
        for adapter in ("hot-a", "hot-b"):
            add(scheduler, adapter)
        before = set(map(id, scheduler.running))
        ran = step(scheduler)
        if scheduler.draining is not None:
            drained.add(scheduler.draining)
            admitted_while_draining |= {s.adapter for s in ran if id(s) not in before}
        if cold.status is not SequenceStatus.WAITING:
            break
    assert cold.status is not SequenceStatus.WAITING, "the cold adapter was passed over forever"
    assert cold.passed_over >= 4
    # One adapter was drained (the one with fewer running sequences) and the other one kept
    # being admitted meanwhile: the batch was not emptied for the waiting sequence.
    assert drained == {"hot-b"}
    assert "hot-a" in admitted_while_draining and "hot-b" not in admitted_while_draining


def test_base_requests_never_wait_for_slots():
    scheduler = make_scheduler(max_loras=1, max_passed_over=0)
    add(scheduler, "a")
    step(scheduler)
    blocked = add(scheduler, "b")
    base = add(scheduler, None)
    ran = step(scheduler)
    assert base in ran and blocked not in ran
    assert scheduler.draining == "a"
    while blocked.status is SequenceStatus.WAITING:
        step(scheduler)
    assert scheduler.draining is None


def run_to_end(scheduler: Scheduler, seq: Sequence) -> None:
    while seq.status is not SequenceStatus.FINISHED:
        step(scheduler)


def test_an_adapter_never_gets_the_base_prefix_cache_key():
    """A sequence of an adapter whose host entry is missing at admission is charged with a
    fault (its request fails) rather than keyed like the base and served the base's K/V."""
    scheduler = make_scheduler(max_loras=2)
    run_to_end(scheduler, add(scheduler, None))  # the prompt's first block, cached for the base
    scheduler.adapters = LostAdapters(2)
    seq = add(scheduler, "x")  # the same prompt
    assert scheduler.schedule() == []
    [(faulted, exc)] = scheduler.take_faults()
    assert faulted is seq and "x is not loaded" in str(exc)
    assert seq.blocks == [] and seq.num_cached_hits == 0


def test_the_prefix_cache_key_is_fixed_at_admission():
    """Blocks are registered under the key of the adapter load the sequence was admitted with,
    even if the adapter is reloaded (a new load id) while it runs."""
    scheduler = make_scheduler(max_loras=2)
    seq = add(scheduler, "x")
    [item] = scheduler.schedule()
    assert seq.cache_key == "x#1"
    scheduler.adapters.load_id = 2
    scheduler.computed(item)
    first = block_hash(None, "x#1", seq.token_ids[:4])
    assert seq.block_hashes == [first]
    assert scheduler.allocator.lookup(first) == seq.blocks[0]
    assert scheduler.allocator.lookup(block_hash(None, "x#2", seq.token_ids[:4])) is None
