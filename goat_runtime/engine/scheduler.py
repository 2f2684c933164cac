"""Continuous batching: which sequences run in the next step, and how many tokens each.

Every step, running sequences go first (oldest first): a decode takes one token, a prompt the
next chunk of it, within a per-step token budget (chunked prefill). When the KV cache cannot
hold a running sequence's next tokens, the newest running sequence is preempted (its blocks
freed, its tokens recomputed later, ahead of everything waiting). Then waiting sequences are
admitted first come, first served while the budget, the sequence cap, the KV cache and the
device adapter slots allow (`AdapterManager.can_bind`: on the CPU slots are host memory and
never block, so admission there is by KV blocks and the token budget alone), in the order the
scheduling policy gives (fairness.py: with `fair`, a fair share of tokens between tenants).
Before all that, the policy may name a waiting sequence of a less-served tenant to favour: it
is admitted in a step of its own (its first chunk alone, so that its first token does not wait
for the other tenants' whole decode batch), after the preemption of the running sequence the
policy names when the sequence cap or the KV cache leaves it no room. A
sequence whose adapter needs a slot while all are held may be passed over by sequences of
resident adapters, but only `max_passed_over` times: then one held adapter, the one with the
fewest running sequences, is drained (no new sequence of it is admitted) until its last one
finishes and its slot goes to the waiting adapter; the others keep the batch full meanwhile. A
sequence whose KV blocks do not fit stops admission at once (it is never passed over). Adapters
still loading from disk do not hold anything up.

An exception while a sequence is given its blocks is charged to it: it is recorded in `faults`
(the engine fails its request) and scheduling goes on for the others.
"""

from collections import Counter, deque
from dataclasses import dataclass

from goat_runtime.engine.adapter_manager import AdapterManager
from goat_runtime.engine.block_allocator import BlockAllocator, block_hash
from goat_runtime.engine.fairness import make_policy
from goat_runtime.engine.request import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enable_prefix_caching: bool = True
    max_passed_over: int = 32
    policy: str = "fcfs"  # the waiting queue's order: fcfs or fair (fairness.py)


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens computed this step, from seq.num_computed_tokens on


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator,
                 adapters: AdapterManager):
        self.config = config
        self.allocator = allocator
        self.adapters = adapters
        self.waiting: deque[Sequence] = deque()
        self.policy = make_policy(config.policy)
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_fairness_preemptions = 0  # of num_preemptions, those made for the policy
        # The held adapter admitting nothing new until it frees its slot for one passed over.
        self.draining: str | None = None
        # Sequences whose scheduling raised, with the exception, until the engine takes them.
        self.faults: list[tuple[Sequence, Exception]] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.policy.add(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------

    def schedule(self, max_tokens: int | None = None) -> list[ScheduledSeq]:
        """The next step's sequences, within the token budget (lowered to `max_tokens` for
        this step where given)."""
        budget = self.config.max_num_batched_tokens
        if max_tokens is not None:
            budget = min(budget, max_tokens)
        scheduled: list[ScheduledSeq] = []
        scheduled_ids: set[int] = set()
        preempted = False
        favoured = self._favour_for_fairness(budget)
        if favoured is not None:
            return favoured
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted below for an older one
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            try:
                while not self._grow(seq, n):
                    # seq itself is not scheduled yet, so there is always a victim
                    victim = next(s for s in reversed(self.running)
                                  if id(s) not in scheduled_ids)
                    self._preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                else:
                    scheduled.append(ScheduledSeq(seq, n))
                    scheduled_ids.add(id(seq))
                    budget -= n
            except Exception as exc:  # charged to this sequence's request
                self.faults.append((seq, exc))
        # A full batch admits nothing: not ordering or walking the waiting queue then keeps a
        # step's cost independent of how long that queue has grown under overload.
        if not preempted and budget > 0 and len(self.running) < self.config.max_num_seqs:
            scheduled += self._admit(budget)
        return scheduled

    def _favour_for_fairness(self, budget: int) -> list[ScheduledSeq] | None:
        """The sequence the policy favours (a less-served tenant's, fairness.py `favoured`),
        admitted in a step of its own when it can be: its first chunk is then not computed
        in the same forward as the other tenants' whole decode batch, which would delay its
        first token by that batch's step time. The others wait one step (one per favoured
        sequence). When the sequence cap or the KV cache leave it no room, the running
        sequence the policy names is preempted for it first; at most one such preemption a
        step. Returns the step's schedule, or None (nothing changed but that preemption):
        schedule as usual. The step of its own costs the batch a step per favoured request
        (on the tiny model, one 16-token prompt alone takes as long as 16 decodes); admitting
        it beside the decodes instead was measured (docs/benchmarks.md section 8, 2026-12-07):
        2-3 % more throughput, but the light key's TTFT beside the heavy key 1.58x of alone
        against 0.88x at the engine, past the 1.5x goal."""
        if not self.running:
            return None  # nothing to put it ahead of: admission takes it
        choice = self.policy.victim(self.waiting, self.running)
        if choice is None:
            return None
        victim, seq = choice
        name = seq.adapter
        if name is not None:
            if name == self.draining or self.adapters.status(name) != "ready":
                return None
            held = {s.adapter for s in self.running if s is not victim and s.adapter is not None}
            if not self.adapters.can_bind(held, name):
                return None
        bs = self.config.block_size
        # Its first chunk's blocks, counting no prefix-cache hits (at worst one preemption
        # too many when hits would have made it fit).
        needed = -(-min(seq.num_tokens, budget) // bs)
        if len(self.running) >= self.config.max_num_seqs or needed > self.allocator.num_free:
            if needed > self.allocator.num_free + len(victim.blocks):
                return None  # the victim's blocks would not be enough either
            self._preempt(victim)
            self.policy.yielded(victim)
            self.num_fairness_preemptions += 1
        try:
            n = self._start(seq, budget)
        except Exception as exc:  # charged to this sequence's request
            self.faults.append((seq, exc))
            return []  # holding what it got until the engine finishes it: not again
        if n == 0:
            return None  # its blocks do not fit after all: admission decides as usual
        self.waiting.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return [ScheduledSeq(seq, n)]

    def _admit(self, budget: int) -> list[ScheduledSeq]:
        admitted: list[ScheduledSeq] = []
        self.waiting = self.policy.order(self.waiting, self.running,
                                         self.config.max_num_seqs - len(self.running))
        held = Counter(s.adapter for s in self.running if s.adapter is not None)
        if self.draining not in held:  # drained: its slot is free for the waiting adapter
            self.draining = None
        kept: deque[Sequence] = deque()
        slot_blocked: list[Sequence] = []
        while self.waiting:
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            seq = self.waiting.popleft()
            name = seq.adapter
            if name is not None and self.adapters.status(name) != "ready":
                kept.append(seq)  # still loading (failures are the engine's to report)
                continue
            if name is not None and not self.adapters.can_bind(held.keys(), name):
                kept.append(seq)
                slot_blocked.append(seq)
                if seq.passed_over >= self.config.max_passed_over and self.draining is None:
                    # The adapter with the fewest running sequences frees a slot soonest.
                    self.draining = min(held, key=held.__getitem__)
                continue
            if name is not None and name == self.draining:
                kept.append(seq)
                continue
            try:
                n = self._start(seq, budget)
            except Exception as exc:  # charged to this sequence's request
                kept.append(seq)  # holding what it got: the engine finishes it
                self.faults.append((seq, exc))
                continue
            if n == 0:  # its KV blocks do not fit: first come, first served
                kept.append(seq)
                break
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if name is not None:
                held[name] += 1
            admitted.append(ScheduledSeq(seq, n))
            budget -= n
            for blocked in slot_blocked:
                blocked.passed_over += 1
        kept.extend(self.waiting)  # the rest, untouched (one C-level copy)
        self.waiting = kept
        return admitted

    def _start(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its cached prefix blocks and the blocks of its first chunk;
        returns the chunk's size, 0 (holding nothing) if the blocks do not fit."""
        # Hits go straight into seq.blocks, so that whatever happens they are freed with it.
        seq.blocks, seq.block_hashes = [], []
        seq.num_computed_tokens = seq.num_cached_hits = 0
        # The key of the adapter's current load, fixed for as long as the sequence holds blocks.
        seq.cache_key = self._cache_key(seq)
        if self.config.enable_prefix_caching and seq.request.params.prompt_logprobs is None:
            bs = self.config.block_size
            tokens = seq.token_ids
            parent = None
            # Never the last token: its logits are needed, so at least one token is computed.
            for i in range((len(tokens) - 1) // bs):
                parent = block_hash(parent, seq.cache_key, tokens[i * bs : (i + 1) * bs])
                block = self.allocator.lookup(parent)
                if block is None:
                    break
                seq.blocks.append(block)
                seq.block_hashes.append(parent)
        seq.num_computed_tokens = seq.num_cached_hits = len(seq.blocks) * self.config.block_size
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if not self._grow(seq, n):
            self._release_blocks(seq)
            seq.num_cached_hits = 0
            return 0
        return n

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Allocate the blocks `seq` needs for `n` more tokens, if the cache has them."""
        needed = -(-(seq.num_computed_tokens + n) // self.config.block_size) - len(seq.blocks)
        if needed > self.allocator.num_free:
            return False
        if needed > 0:
            seq.blocks += self.allocator.allocate(needed)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # ---- after the step ---------------------------------------------------------------------

    def computed(self, item: ScheduledSeq) -> None:
        """The step computed `item`'s tokens: advance it and cache its newly full blocks."""
        seq = item.seq
        seq.num_computed_tokens += item.num_new_tokens
        if not self.config.enable_prefix_caching:
            return
        bs = self.config.block_size
        tokens = seq.token_ids
        if seq.cache_key is None:
            raise RuntimeError(f"sequence {seq.index} of request {seq.request.request_id} has "
                               "no prefix-cache key: it was never admitted")
        while len(seq.block_hashes) < seq.num_computed_tokens // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            digest = block_hash(parent, seq.cache_key, tokens[i * bs : (i + 1) * bs])
            seq.block_hashes.append(digest)
            self.allocator.register(seq.blocks[i], digest)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence from the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        self.policy.finished(seq)

    def _release_blocks(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks, seq.block_hashes = [], []
        seq.num_computed_tokens = 0

    def take_faults(self) -> list[tuple[Sequence, Exception]]:
        faults, self.faults = self.faults, []
        return faults

    def _cache_key(self, seq: Sequence) -> str:
        """The prefix-cache key of the sequence's adapter as loaded now ("name#load_id"); the
        base's, "", only for the base, never as a fallback for an adapter (its K/V differ)."""
        if seq.adapter is None:
            return ""
        host = self.adapters.get(seq.adapter)
        if host is None:
            raise RuntimeError(f"adapter {seq.adapter} is not loaded: its sequences cannot be "
                               "admitted (no prefix-cache key)")
        return host.cache_key
