"""The order in which waiting sequences are offered to the scheduler's admission: first come,
first served, or a fair share between tenants (the server's API key ids, `Request.tenant`).

`fair` is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models"
(OSDI 2024): each tenant has a counter of the tokens it was served, prompt tokens weighted
PROMPT_WEIGHT and generated tokens GENERATED_WEIGHT (a generated token costs a step of its own;
the paper's weights). Admission offers next the earliest waiting sequence of the tenant with
the lowest counter. A tenant that becomes active (nothing waiting or running before) has its
counter lifted to the lowest counter of the tenants already active, so that idling earns no
credit; when no tenant is active the counters start again from zero. With one active tenant
the waiting queue is left as it is: exactly first come, first served.

The scheduler tells the policy of each sequence it adds and finishes, and asks for the order
once per admission. A sequence is charged from its own state (its prompt once admitted, its
output tokens as they grow) while it runs and when it finishes; the charge only ever grows, so
recomputing a preempted sequence costs its tenant nothing more. Sequences admitted before
(preempted ones, at the front of the queue) keep their place ahead of the rest. The cost per
step: a pass over the running sequences; with several active tenants, when the batch has room
(the scheduler asks for no order when it is full), a heap over tenants for as many sequences
as the batch has room for, fed by a walk of the waiting queue that stops once it holds that
many of each tenant's (how many each has waiting is known from the counts): under overload
the queue is hundreds long, and walking all of it at every admission cost 1 % of the
throughput (docs/benchmarks.md section 8).

Ordering alone leaves a light tenant waiting until one of a heavy tenant's running sequences
finishes (the paper's VTC never preempts). So `victim` names, once per step, a waiting
sequence of a less-served tenant to favour and a running sequence to preempt for it if the
batch is full: the newest sequence of the most-served running tenant whose counter is above
the waiting tenant's and that runs at least two sequences more than it. The scheduler admits
the favoured sequence in a step of its own (its first token then waits for its own prompt,
not for the heavy tenant's whole decode batch: that batch waits one step instead), so at most
one such preemption and one such step per step. The last condition bounds both: they only
even out the running sequences between two tenants, never swap them back and forth (after it
the waiting tenant still runs no more than the other), and one tenant alone never gets either.
A sequence preempted for fairness queues at the head of its own tenant's queue, not ahead of
everyone.
"""

import heapq
from collections import deque
from itertools import islice

from goat_runtime.engine.request import Sequence, SequenceStatus

POLICIES = ("fcfs", "fair")
PROMPT_WEIGHT = 1.0
GENERATED_WEIGHT = 2.0


class FirstComeFirstServed:
    """The queue as it arrived: it keeps no counters, so there is nothing to record when
    sequences come and go, and it never preempts."""

    def add(self, seq: Sequence) -> None:
        """Nothing to count."""

    def finished(self, seq: Sequence) -> None:
        """Nothing to count."""

    def order(self, waiting: deque[Sequence], running: list[Sequence],
              room: int) -> deque[Sequence]:
        return waiting

    def victim(self, waiting: deque[Sequence],
               running: list[Sequence]) -> tuple[Sequence, Sequence] | None:
        return None

    def yielded(self, seq: Sequence) -> None:
        """Never asked: `victim` names none."""


class VirtualTokenCounter:
    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        self._unfinished: dict[str, int] = {}  # tenant -> its sequences waiting or running
        self._present: set[Sequence] = set()
        self._charged: dict[Sequence, float] = {}  # sequences admitted and not finished
        self._yielded: set[Sequence] = set()  # preempted for fairness, not yet readmitted

    def add(self, seq: Sequence) -> None:
        tenant = seq.request.tenant
        if not self._unfinished.get(tenant):  # newly active: lifted, no credit for idling
            active = [self.counters.get(t, 0.0) for t, n in self._unfinished.items() if n]
            floor = min(active) if active else 0.0
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._unfinished[tenant] = self._unfinished.get(tenant, 0) + 1
        self._present.add(seq)

    def finished(self, seq: Sequence) -> None:
        if seq not in self._present:
            return
        self._present.discard(seq)
        self._charge(seq, admitted=bool(seq.output_token_ids) or seq in self._charged)
        self._charged.pop(seq, None)
        self._yielded.discard(seq)
        tenant = seq.request.tenant
        self._unfinished[tenant] -= 1
        if not self._unfinished[tenant]:
            del self._unfinished[tenant]
            if not self._unfinished:
                self.counters.clear()  # nobody active: everyone starts again from zero

    def _charge(self, seq: Sequence, admitted: bool) -> None:
        served = GENERATED_WEIGHT * len(seq.output_token_ids)
        if admitted:
            served += PROMPT_WEIGHT * len(seq.request.prompt_token_ids)
        delta = served - self._charged.get(seq, 0.0)
        if delta > 0:
            tenant = seq.request.tenant
            self.counters[tenant] = self.counters.get(tenant, 0.0) + delta
            self._charged[seq] = served

    def order(self, waiting: deque[Sequence], running: list[Sequence],
              room: int) -> deque[Sequence]:
        """`waiting` in the order admission should try it, for `room` more running sequences:
        the first `room` by counter, then the rest (ordered again at the next admission)."""
        self._charge_running(running)
        if len(self._unfinished) <= 1:  # one tenant: first come, first served
            return waiting
        # A tenant's unfinished sequences are running or waiting, so how many of each tenant's
        # the walk can find is known: it stops once it holds `room` of each tenant's (or all
        # of them), not at the end of a queue hundreds long under overload.
        runs = _runs(running)
        missing = sum(min(room, max(0, n - runs.get(t, 0))) for t, n in self._unfinished.items())
        found: dict[str, int] = {}
        ordered: deque[Sequence] = deque()
        queues: dict[str, deque[Sequence]] = {}
        walked = 0
        for seq in waiting:
            if missing <= 0:
                break
            walked += 1
            tenant = seq.request.tenant
            if found.get(tenant, 0) < room:
                found[tenant] = found.get(tenant, 0) + 1
                missing -= 1
            # Preempted for KV room, at the front: keeps its place (not if it yielded).
            if seq in self._charged and seq not in self._yielded and not queues:
                ordered.append(seq)
            else:
                queues.setdefault(tenant, deque()).append(seq)
        rest = islice(waiting, walked, None)
        if len(queues) <= 1:
            ordered.extend(seq for queue in queues.values() for seq in queue)
            ordered.extend(rest)
            return ordered
        # Simulate admitting them, each tentatively charged its prompt, so that one step's
        # admissions already alternate; ties go to the tenant whose head came first.
        heap = [(self.counters.get(tenant, 0.0), i, tenant) for i, tenant in enumerate(queues)]
        heapq.heapify(heap)
        for _ in range(room):
            if not heap:
                break
            counter, i, tenant = heapq.heappop(heap)
            queue = queues[tenant]
            seq = queue.popleft()
            ordered.append(seq)
            if queue:
                counter += PROMPT_WEIGHT * len(seq.request.prompt_token_ids)
                heapq.heappush(heap, (counter, i, tenant))
        for _, _, tenant in sorted(heap):  # the rest: lowest counter's first
            ordered.extend(queues[tenant])
        ordered.extend(rest)
        return ordered

    def _charge_running(self, running: list[Sequence]) -> None:
        # _charge(seq, admitted=True) for each, inlined: this runs at every admission.
        charged, counters = self._charged, self.counters
        for seq in running:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            served = (GENERATED_WEIGHT * len(seq.output_token_ids)
                      + PROMPT_WEIGHT * len(seq.request.prompt_token_ids))
            delta = served - charged.get(seq, 0.0)
            if delta > 0:
                tenant = seq.request.tenant
                counters[tenant] = counters.get(tenant, 0.0) + delta
                charged[seq] = served
        if self._yielded:
            self._yielded.difference_update(running)

    def victim(self, waiting: deque[Sequence],
               running: list[Sequence]) -> tuple[Sequence, Sequence] | None:
        """(a running sequence to preempt if need be, the waiting one to favour), or None:
        the earliest waiting sequence of the least-served waiting tenant, and the newest
        sequence of the most-served running tenant above it that runs 2+ sequences more.
        `running`: the scheduler's running sequences (all of them RUNNING), oldest first."""
        if len(self._unfinished) <= 1 or not waiting:
            return None
        runs = _runs(running)
        # This runs every step, and under overload the waiting queue is hundreds long: which
        # tenants wait is known from the counts without walking it, and nothing is charged or
        # walked unless some tenant runs two more sequences than a waiting one (in a steady
        # overload the light tenant's requests are favoured as they come, so mostly only the
        # heavy one waits).
        waiters = [t for t, n in self._unfinished.items() if n > runs.get(t, 0)]
        if not waiters or max(runs.values(), default=0) < min(runs.get(t, 0)
                                                               for t in waiters) + 2:
            return None
        self._charge_running(running)
        floor = min(self.counters.get(t, 0.0) for t in waiters)
        lowest = {t for t in waiters if self.counters.get(t, 0.0) == floor}
        head = next((seq for seq in waiting if seq.request.tenant in lowest), None)
        if head is None:
            return None
        tenant = head.request.tenant  # ties: earliest head
        above = [t for t in runs if self.counters.get(t, 0.0) > floor
                 and runs[t] >= runs.get(tenant, 0) + 2]
        if not above:
            return None
        top = max(above, key=lambda t: self.counters.get(t, 0.0))
        return next(seq for seq in reversed(running) if seq.request.tenant == top), head

    def yielded(self, seq: Sequence) -> None:
        """`seq` was preempted for fairness: it queues with its tenant, not at the front."""
        self._yielded.add(seq)


def _runs(running: list[Sequence]) -> dict[str, int]:
    """Running sequences per tenant (a plain loop: building a Counter costs 3x as much here,
    and this runs every step)."""
    runs: dict[str, int] = {}
    for seq in running:
        tenant = seq.request.tenant
        runs[tenant] = runs.get(tenant, 0) + 1
    return runs


def make_policy(name: str) -> FirstComeFirstServed | VirtualTokenCounter:
    if name == "fcfs":
        return FirstComeFirstServed()
    if name == "fair":
        return VirtualTokenCounter()
    raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {name!r}")
