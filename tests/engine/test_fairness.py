"""The fair share (engine/fairness.py) through the scheduler, stepped by hand: with one tenant it
admits exactly as first come, first served; with two, a light tenant is not stuck behind a
heavy one's backlog, backlogged tenants get equal tokens (not equal requests), a tenant that
was idle earns no credit (its counter is lifted), and a less-served tenant that finds the batch
full takes the newest slot of the most-served one (one preemption a step at most)."""

import itertools
import random
import weakref
from collections import Counter, deque
from collections.abc import Iterator

import pytest
import torch

from goat_runtime.engine.block_allocator import BlockAllocator
from goat_runtime.engine.fairness import VirtualTokenCounter, make_policy
from goat_runtime.engine.request import Request, Sequence, SequenceStatus
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.engine.scheduler import Scheduler, SchedulerConfig
from tests.engine.test_scheduler import ResidentAdapters

_ids = itertools.count()
SEEN: "weakref.WeakKeyDictionary[Scheduler, set[str]]" = weakref.WeakKeyDictionary()


def make(policy: str, max_num_seqs: int = 2, blocks: int = 512) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64,
                             block_size=4, policy=policy)
    return Scheduler(config, BlockAllocator(blocks), ResidentAdapters(4))


def add(scheduler: Scheduler, tenant: str, prompt_len: int = 5, output_len: int = 4,
        first: int = 5) -> Sequence:
    """A request of `tenant`, prompt `first`, `first` + 1, ...: the same prompts share prefix
    cache blocks."""
    request = Request(f"{tenant}-{next(_ids)}", list(range(first, first + prompt_len)),
                      SamplingParams(max_tokens=output_len), None, tenant=tenant)
    seq = Sequence(request, 0, torch.Generator())
    request.sequences.append(seq)
    scheduler.add(seq)
    return seq


def step(scheduler: Scheduler) -> list[str]:
    """One step without a model; returns the request ids admitted (first scheduled) in it."""
    admitted = []
    seen = SEEN.setdefault(scheduler, set())
    for item in scheduler.schedule():
        seq = item.seq
        if seq.request.request_id not in seen:
            seen.add(seq.request.request_id)
            admitted.append(seq.request.request_id)
        scheduler.computed(item)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(1)
            if len(seq.output_token_ids) == seq.request.params.max_tokens:
                scheduler.finish(seq)
    return admitted


def admission_order(scheduler: Scheduler, steps: int = 200) -> list[str]:
    order: list[str] = []
    for _ in range(steps):
        order += step(scheduler)
        if not scheduler.has_work():
            break
    return order


def test_one_tenant_is_first_come_first_served() -> None:
    traces = {}
    for policy in ("fcfs", "fair"):
        # A small KV cache: sequences are preempted and recomputed, which must not reorder
        # either. The trace: every step's (request, tokens) in the order scheduled.
        scheduler = make(policy, max_num_seqs=3, blocks=7)
        plan = [(3 + (i * 7) % 11, 6 + (i * 5) % 9) for i in range(12)]
        index: dict[str, int] = {}
        trace: list[list[tuple[int, int]]] = []
        for i, (prompt, output) in enumerate(plan):
            index[add(scheduler, "only", prompt, output).request.request_id] = i
            if i % 3 == 2:
                trace.append(traced_step(scheduler, index))
        while scheduler.has_work():
            trace.append(traced_step(scheduler, index))
        assert scheduler.num_preemptions > 0
        traces[policy] = trace
    assert traces["fcfs"] == traces["fair"]


def traced_step(scheduler: Scheduler, index: dict[str, int]) -> list[tuple[int, int]]:
    items = scheduler.schedule()
    for item in items:
        seq = item.seq
        scheduler.computed(item)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(1)
            if len(seq.output_token_ids) == seq.request.params.max_tokens:
                scheduler.finish(seq)
    return [(index[i.seq.request.request_id], i.num_new_tokens) for i in items]


def first_light(policy: str) -> int:
    """Admissions before the light tenant's one request, sent after 20 of the heavy one's."""
    scheduler = make(policy)
    for _ in range(20):
        add(scheduler, "heavy")
    step(scheduler)
    add(scheduler, "light")
    order = admission_order(scheduler)
    return next(i for i, rid in enumerate(order) if rid.startswith("light"))


def test_a_light_tenant_does_not_wait_behind_a_heavy_backlog() -> None:
    assert first_light("fcfs") >= 18
    assert first_light("fair") == 0  # the next admission


def test_backlogged_tenants_share_tokens_not_requests() -> None:
    scheduler = make("fair", max_num_seqs=2)
    for _ in range(40):
        add(scheduler, "long", prompt_len=20, output_len=4)  # 20 + 2 * 4 = 28 per request
        add(scheduler, "short", prompt_len=3, output_len=2)  # 3 + 2 * 2 = 7 per request
    served: Counter[str] = Counter()
    counted: Counter[str] = Counter()
    for _ in range(30):
        for rid in step(scheduler):
            counted[rid.split("-")[0]] += 1
    policy = scheduler.policy
    assert isinstance(policy, VirtualTokenCounter)
    served.update(policy.counters)
    # Four short requests for each long one, and the counters within one request's cost.
    assert counted["short"] >= 3 * counted["long"] > 0
    assert abs(served["long"] - served["short"]) <= 28 + 7


def test_an_idle_tenant_earns_no_credit() -> None:
    scheduler = make("fair")
    for _ in range(10):
        add(scheduler, "early")
    for _ in range(12):
        step(scheduler)  # early is served alone: its counter grows
    policy = scheduler.policy
    assert isinstance(policy, VirtualTokenCounter) and policy.counters["early"] > 0
    for _ in range(10):
        add(scheduler, "late")
    order = [rid.split("-")[0] for rid in admission_order(scheduler)]
    first = order[:8]
    # Lifted to early's counter, late alternates with it instead of taking every slot first.
    assert 3 <= first.count("late") <= 5, order


def test_policy_names() -> None:
    with pytest.raises(ValueError, match="fcfs, fair"):
        make_policy("lottery")


def test_a_preempted_sequence_keeps_its_place_at_the_front() -> None:
    policy = VirtualTokenCounter()
    requests = [Request(f"{t}-{i}", [5, 6, 7], SamplingParams(max_tokens=4), None, tenant=t)
                for i, t in enumerate(["heavy", "heavy", "light"])]
    seqs = [Sequence(r, 0, torch.Generator()) for r in requests]
    for seq in seqs:
        policy.add(seq)
    seqs[0].status = SequenceStatus.RUNNING
    seqs[0].output_token_ids += [1, 1]
    policy.order(deque(seqs[1:]), [seqs[0]], room=2)  # charges heavy 3 + 2 * 2
    assert policy.counters == {"heavy": 7.0, "light": 0.0}
    seqs[0].status = SequenceStatus.WAITING  # preempted: back at the front
    order = policy.order(deque([seqs[0], seqs[1], seqs[2]]), [], room=3)
    assert [s.request.request_id for s in order] == ["heavy-0", "light-2", "heavy-1"]
    for seq in seqs:
        policy.finished(seq)
    assert policy.counters == {}  # nobody active: counters start again


def full_of_heavy(max_num_seqs: int = 4) -> tuple[Scheduler, list[Sequence]]:
    """A batch full of the heavy tenant's long sequences, more of them waiting."""
    scheduler = make("fair", max_num_seqs=max_num_seqs)
    heavy = [add(scheduler, "heavy", output_len=40) for _ in range(3 * max_num_seqs)]
    for _ in range(3):
        step(scheduler)
    assert [s.status for s in heavy[:max_num_seqs]] == [SequenceStatus.RUNNING] * max_num_seqs
    return scheduler, heavy


def test_a_light_tenant_takes_the_newest_heavy_slot_at_once() -> None:
    scheduler, heavy = full_of_heavy()
    light = add(scheduler, "light")
    # Without preemption it would wait ~37 steps for a heavy sequence to finish.
    assert step(scheduler) == [light.request.request_id]
    assert scheduler.num_fairness_preemptions == 1
    assert heavy[3].status is SequenceStatus.WAITING and heavy[3].num_computed_tokens == 0
    assert [s.status for s in heavy[:3]] == [SequenceStatus.RUNNING] * 3
    # The preempted one queues at the head of its own tenant's queue, behind the light one.
    assert list(scheduler.waiting)[:2] == [heavy[3], heavy[4]]
    admission_order(scheduler, steps=400)
    assert not scheduler.has_work()


def scheduled(scheduler: Scheduler) -> list[tuple[str, int]]:
    """One step as traced_step, as (tenant, tokens) in the order scheduled."""
    index = {s.request.request_id: s.request.tenant
             for s in [*scheduler.waiting, *scheduler.running]}
    return [(index[rid], n) for rid, n in traced_step(scheduler, {r: r for r in index})]


def test_a_favoured_first_chunk_gets_a_step_of_its_own() -> None:
    scheduler, _ = full_of_heavy()
    light = add(scheduler, "light", prompt_len=6, first=100)
    # Its prompt alone, not beside the heavy tenant's decodes (after preempting one of them).
    assert scheduled(scheduler) == [("light", 6)]
    assert scheduler.num_fairness_preemptions == 1
    assert light.status is SequenceStatus.RUNNING and light.num_computed_tokens == 6
    # The next step is an ordinary one: everyone running decodes, the light one too.
    assert scheduled(scheduler) == [("heavy", 1)] * 3 + [("light", 1)]


def test_a_favoured_sequence_with_room_gets_a_step_of_its_own_unpreempted() -> None:
    scheduler, heavy = full_of_heavy(max_num_seqs=5)
    for seq in heavy[3:5]:
        scheduler.finish(seq)  # two slots free, the heavy backlog waiting for them
    add(scheduler, "light", prompt_len=7, first=100)
    assert scheduled(scheduler) == [("light", 7)]
    assert scheduler.num_fairness_preemptions == 0
    # Then the heavy backlog takes the other free slot beside the decodes, as usual.
    step = scheduled(scheduler)
    assert step[:4] == [("heavy", 1)] * 3 + [("light", 1)]
    assert [tenant for tenant, _ in step[4:]] == ["heavy"]


def test_fairness_preemption_evens_slots_one_a_step() -> None:
    scheduler, heavy = full_of_heavy()
    light = [add(scheduler, "light", output_len=40) for _ in range(6)]
    runs = []
    for _ in range(3):
        step(scheduler)
        runs.append(Counter(s.request.tenant for s in scheduler.running))
    # One preemption a step, until the light tenant runs as many sequences as the heavy one
    # (then slots turn over as sequences finish, lowest counter first).
    assert runs == [Counter(heavy=3, light=1)] + [Counter(heavy=2, light=2)] * 2
    assert scheduler.num_fairness_preemptions == 2
    for _ in range(1000):
        before = scheduler.num_fairness_preemptions
        step(scheduler)
        assert scheduler.num_fairness_preemptions - before <= 1
        if not scheduler.has_work():
            break
    assert all(s.status is SequenceStatus.FINISHED for s in light + heavy)


def test_one_tenant_never_preempts_for_fairness() -> None:
    scheduler = make("fair", max_num_seqs=4)
    for _ in range(12):
        add(scheduler, "only", output_len=40)
    admission_order(scheduler, steps=1000)
    assert not scheduler.has_work() and scheduler.num_fairness_preemptions == 0


def victim_by_definition(policy: VirtualTokenCounter, waiting: deque[Sequence],
                         running: list[Sequence]) -> tuple[Sequence, Sequence] | None:
    """`victim` as its docstring defines it, walking the whole waiting queue: the earliest
    waiting sequence of the least-served waiting tenant (ties: the earliest head), and the
    newest running sequence of the most-served tenant above it that runs 2+ more."""
    if len(policy._unfinished) <= 1 or not waiting:
        return None
    policy._charge_running(running)
    heads: dict[str, Sequence] = {}
    for seq in waiting:
        heads.setdefault(seq.request.tenant, seq)
    tenant = min(heads, key=lambda t: policy.counters.get(t, 0.0))
    floor = policy.counters.get(tenant, 0.0)
    newest: dict[str, Sequence] = {}
    runs: Counter[str] = Counter()
    for seq in running:
        if seq.status is SequenceStatus.RUNNING:
            newest[seq.request.tenant] = seq
            runs[seq.request.tenant] += 1
    above = [t for t in newest if t != tenant and policy.counters.get(t, 0.0) > floor
             and runs[t] >= runs[tenant] + 2]
    if not above:
        return None
    top = max(above, key=lambda t: policy.counters.get(t, 0.0))
    return newest[top], heads[tenant]


def random_run(seed: int, blocks: int) -> Iterator[tuple[Scheduler, VirtualTokenCounter,
                                                         random.Random]]:
    """300 steps of a fair scheduler (6 sequences, `blocks` KV blocks) through random arrivals,
    preemptions and finishes of three tenants of different weights; yields before each step,
    the batch as that step sees it (statuses included: the policy charges them)."""
    rng = random.Random(seed)
    scheduler = make("fair", max_num_seqs=6, blocks=blocks)
    policy = scheduler.policy
    assert isinstance(policy, VirtualTokenCounter)
    for _ in range(300):
        for tenant, rate in (("heavy", 0.9), ("medium", 0.3), ("light", 0.08)):
            if rng.random() < rate:
                add(scheduler, tenant, rng.randrange(2, 12), rng.randrange(1, 9))
        yield scheduler, policy, rng
        step(scheduler)


@pytest.mark.parametrize("seed", range(6))
def test_victim_skips_the_waiting_queue_but_chooses_as_defined(seed: int) -> None:
    """Under overload `victim` runs every step over a long waiting queue; it reads which
    tenants wait from its counts instead of walking the queue, and must still name exactly
    what walking it would name."""
    named = 0
    for scheduler, policy, _ in random_run(seed, blocks=60):
        expected = victim_by_definition(policy, scheduler.waiting, scheduler.running)
        got = policy.victim(scheduler.waiting, scheduler.running)
        assert got == expected
        named += got is not None
    assert named >= 5  # the comparison covered favoured sequences, not only None


def test_a_full_batch_asks_for_no_order() -> None:
    """Admission cannot take anything while the batch is full: the waiting queue, hundreds
    long under overload, is then neither ordered nor walked."""
    scheduler = make("fair", max_num_seqs=2)
    for i in range(40):
        add(scheduler, "heavy" if i % 4 else "light", output_len=20)
    asked: list[int] = []
    order = scheduler.policy.order
    scheduler.policy.order = lambda waiting, running, room: asked.append(len(running)) or order(
        waiting, running, room)
    for _ in range(30):
        step(scheduler)
    assert asked and all(n < 2 for n in asked)
    assert len(asked) <= 10  # of 30 steps: only those where a sequence had finished


def order_by_definition(policy: VirtualTokenCounter, waiting: deque[Sequence],
                        running: list[Sequence], room: int) -> list[Sequence]:
    """The first `room` of `order` as the module docstring defines them, walking the whole
    waiting queue: sequences admitted before (at the front, not yielded) first, then by
    counter, each pick tentatively charged its prompt (ties: the tenant whose head came
    first)."""
    policy._charge_running(running)
    if len(policy._unfinished) <= 1:
        return list(waiting)[:room]
    front: list[Sequence] = []
    queues: dict[str, list[Sequence]] = {}
    for seq in waiting:
        if seq in policy._charged and seq not in policy._yielded and not queues:
            front.append(seq)
        else:
            queues.setdefault(seq.request.tenant, []).append(seq)
    counters = {t: policy.counters.get(t, 0.0) for t in queues}
    heads = {t: 0 for t in queues}
    picked = front[:room]
    while len(picked) < room and any(heads[t] < len(q) for t, q in queues.items()):
        tenant = min((t for t in queues if heads[t] < len(queues[t])),
                     key=lambda t: (counters[t], list(queues).index(t)))
        seq = queues[tenant][heads[tenant]]
        heads[tenant] += 1
        counters[tenant] += len(seq.request.prompt_token_ids)
        picked.append(seq)
    return picked


@pytest.mark.parametrize("seed", range(6))
def test_order_walks_part_of_the_queue_but_orders_as_defined(seed: int) -> None:
    """`order` stops walking the waiting queue once it holds `room` of each tenant's; its
    first `room` must still be what walking all of it gives, and the rest all the others
    (a small KV cache: sequences preempted for room keep their place at the front)."""
    compared = preempted = 0
    for scheduler, policy, rng in random_run(seed, blocks=40):
        room = rng.randrange(1, 7)
        waiting, running = deque(scheduler.waiting), list(scheduler.running)
        expected = order_by_definition(policy, waiting, running, room)
        got = policy.order(waiting, running, room)
        assert list(got)[:room] == expected
        assert Counter(map(id, got)) == Counter(map(id, waiting))
        compared += len({s.request.tenant for s in expected}) > 1
        preempted = scheduler.num_preemptions
    assert compared >= 20  # orders that mixed tenants, not only one tenant's queue
    assert preempted > 0  # and sequences admitted before, at the front
