"""The order in which waiting sequences are offered to the scheduler's admission: first come,
first served, or a fair share between tenants (the server's API key ids, `Request.tenant`).

`fair` is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models"
(OSDI 2024): each tenant has a counter of the tokens it was served, prompt tokens weighted
PROMPT_WEIGHT and generated tokens GENERATED_WEIGHT (a generated token costs a step of its own;
the paper's weights). Admission offers next the earliest waiting sequence of the tenant with
the lowest counter. A tenant that becomes active (nothing waiting or running before) has its
counter lifted to the lowest counter of the tenants already active, so that idling earns no
credit; when no tenant is active the counters start again from zero. With one tenant the order
is exactly first come, first served.

Sequences that were admitted before (preempted ones, put back at the front) keep their place
ahead of the rest, as under first come, first served. A tenant is charged from its sequences'
own state (prompt once admitted, output tokens as they grow), read at each admission; the
charge only ever grows, so recomputing a preempted sequence costs its tenant nothing more.
"""

from collections import deque
from collections.abc import Iterable

from goat_runtime.engine.request import Sequence, SequenceStatus

POLICIES = ("fcfs", "fair")
PROMPT_WEIGHT = 1.0
GENERATED_WEIGHT = 2.0


class FirstComeFirstServed:
    def order(self, waiting: deque[Sequence], running: Iterable[Sequence]) -> deque[Sequence]:
        return waiting


class VirtualTokenCounter:
    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        # Every sequence seen waiting or running, until it finishes: what it was charged.
        self._charged: dict[Sequence, float] = {}
        self._active: set[str] = set()

    @staticmethod
    def _served(seq: Sequence) -> float:
        admitted = seq.status is SequenceStatus.RUNNING or bool(seq.output_token_ids)
        prompt = len(seq.request.prompt_token_ids) if admitted else 0
        return PROMPT_WEIGHT * prompt + GENERATED_WEIGHT * len(seq.output_token_ids)

    def _charge(self) -> None:
        for seq, charged in list(self._charged.items()):
            served = self._served(seq)
            if served > charged:
                tenant = seq.request.tenant
                self.counters[tenant] = self.counters.get(tenant, 0.0) + served - charged
                self._charged[seq] = served
            if seq.status is SequenceStatus.FINISHED:
                del self._charged[seq]

    def order(self, waiting: deque[Sequence], running: Iterable[Sequence]) -> deque[Sequence]:
        """`waiting` in the order admission should try it (the scheduler's one call)."""
        for seq in (*waiting, *running):
            self._charged.setdefault(seq, 0.0)
        self._charge()
        active = {seq.request.tenant for seq in (*waiting, *running)}
        if not active:
            self.counters.clear()
        before = [self.counters.get(t, 0.0) for t in self._active & active]
        for tenant in active - self._active:
            floor = min(before) if before else self.counters.get(tenant, 0.0)
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), floor)
        self._active = active

        ordered: deque[Sequence] = deque()
        fresh: dict[str, deque[tuple[int, Sequence]]] = {}
        for position, seq in enumerate(waiting):
            if self._charged[seq] > 0 or seq.request.first_scheduled_time is not None:
                ordered.append(seq)  # admitted before (preempted): keeps its place
            else:
                fresh.setdefault(seq.request.tenant, deque()).append((position, seq))
        if len(fresh) <= 1:  # one tenant: first come, first served
            ordered.extend(seq for queue in fresh.values() for _, seq in queue)
            return ordered
        # Simulate admitting them all: each tentatively charged its prompt, so one step's
        # admissions already alternate between tenants.
        counters = {tenant: self.counters.get(tenant, 0.0) for tenant in fresh}
        while fresh:
            tenant = min(fresh, key=lambda t: (counters[t], fresh[t][0][0]))
            _, seq = fresh[tenant].popleft()
            ordered.append(seq)
            counters[tenant] += PROMPT_WEIGHT * len(seq.request.prompt_token_ids)
            if not fresh[tenant]:
                del fresh[tenant]
        return ordered


def make_policy(name: str) -> FirstComeFirstServed | VirtualTokenCounter:
    if name == "fcfs":
        return FirstComeFirstServed()
    if name == "fair":
        return VirtualTokenCounter()
    raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {name!r}")
