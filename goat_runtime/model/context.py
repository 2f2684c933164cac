"""The per-step batch metadata, installed for one forward pass with `with step_context(ctx):`.

The model's forward takes only (input_ids, positions); everything else a layer needs about the
batch (where each token's K/V goes, each sequence's cached context, each token's adapter slot,
which hidden states become logits) is read from the installed `StepContext`. A step is a flat
batch of T tokens: the new (query) tokens of sequence i are the contiguous run
[seq_starts[i], seq_starts[i] + query_lens[i]), and are the last query_lens[i] of its
context_lens[i] tokens (context = tokens already in the cache + these new ones).

The model owns this contract (what its layers read); whoever runs it (the engine, tests,
benchmarks) builds a context per step with `build_step_context` and installs it.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class PrefillSeq:
    """One sequence with several query tokens, attended on its own."""

    start: int  # first flat token
    query_len: int
    context_len: int
    context_slots: torch.Tensor | None  # [context_len] int64 cache slots; None: no cached prefix


@dataclass(frozen=True)
class DecodeBatch:
    """All sequences with one query token, attended together (`paged_decode_attention`)."""

    token_indices: torch.Tensor  # [S] int64 flat token of each sequence
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int64
    max_context_len: int


@dataclass
class StepContext:
    slot_mapping: torch.Tensor  # [T] int64: the cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32; pad with 0 (gathered, masked)
    seq_starts: tuple[int, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    token_adapter_slots: torch.Tensor  # [T] int32, -1: the base model
    logits_indices: torch.Tensor  # [N] int64: flat tokens whose hidden states give logits
    block_size: int
    # [num_slots, E] int64: the routed op counts the experts each slot's routers choose (metrics)
    expert_counts: torch.Tensor | None = None
    # Derived once per step (not per layer): the attention's gather plan.
    has_adapter_tokens: bool = field(init=False)
    prefills: tuple[PrefillSeq, ...] = field(init=False)
    decode: DecodeBatch | None = field(init=False)

    def __post_init__(self) -> None:
        num_seqs = len(self.query_lens)
        if not (len(self.seq_starts) == len(self.context_lens) == num_seqs
                == self.block_tables.shape[0]):
            raise ValueError("seq_starts, query_lens, context_lens and block_tables must have "
                             "one entry per sequence")
        for q, c in zip(self.query_lens, self.context_lens, strict=True):
            if not 1 <= q <= c:
                raise ValueError(f"a sequence needs 1 <= query_len <= context_len, got {q}, {c}")
            if -(-c // self.block_size) > self.block_tables.shape[1]:
                raise ValueError(f"context of {c} tokens exceeds the block table width "
                                 f"{self.block_tables.shape[1]} x block_size {self.block_size}")
        # One host sync per step, so the linears never sync to skip the adapter op.
        self.has_adapter_tokens = bool((self.token_adapter_slots >= 0).any())
        self.prefills = tuple(
            PrefillSeq(s, q, c, None if c == q else self._context_slots([i], c)[0])
            for i, (s, q, c) in enumerate(
                zip(self.seq_starts, self.query_lens, self.context_lens, strict=True))
            if q > 1)
        decodes = [i for i, q in enumerate(self.query_lens) if q == 1]
        self.decode = self._decode_batch(decodes) if decodes else None

    def _context_slots(self, seqs: list[int], length: int) -> torch.Tensor:
        """[len(seqs), length] cache slots of the first `length` tokens of the sequences."""
        device = self.block_tables.device
        num_blocks = -(-length // self.block_size)
        blocks = self.block_tables[seqs, :num_blocks].long()
        offsets = torch.arange(self.block_size, device=device)
        return (blocks[:, :, None] * self.block_size + offsets).flatten(1)[:, :length]

    def _decode_batch(self, seqs: list[int]) -> DecodeBatch:
        device = self.block_tables.device
        lens = [self.context_lens[i] for i in seqs]
        all_seqs = len(seqs) == self.block_tables.shape[0]  # a pure decode step: no copy
        return DecodeBatch(
            token_indices=torch.tensor([self.seq_starts[i] for i in seqs], device=device),
            block_tables=self.block_tables if all_seqs else self.block_tables[seqs],
            context_lens=torch.tensor(lens, dtype=torch.int64, device=device),
            max_context_len=max(lens),
        )


def build_step_context(query_lens: Sequence[int], context_lens: Sequence[int],
                       block_tables: Sequence[Sequence[int]], adapter_slots: Sequence[int],
                       block_size: int, device: torch.device | str = "cpu", *,
                       all_logits: bool = False,
                       num_logits: Sequence[int] | None = None) -> tuple[torch.Tensor, StepContext]:
    """(positions [T], StepContext) for sequences laid out one after another in the flat batch.

    adapter_slots: each sequence's adapter slot (-1: base), repeated over its query tokens.
    all_logits: logits for every token (prompt logprobs), not only each sequence's last one.
    num_logits: per sequence, how many of its last query tokens give logits (0: none, as for a
      prompt chunk that is not the last); overrides all_logits.
    """
    positions: list[int] = []
    slots: list[int] = []
    starts: list[int] = []
    token_slots: list[int] = []
    for q, c, table, a in zip(query_lens, context_lens, block_tables, adapter_slots,
                              strict=True):
        if len(table) * block_size < c:
            raise ValueError(f"a context of {c} tokens needs {-(-c // block_size)} blocks of "
                             f"{block_size}; its block table has {len(table)}")
        starts.append(len(positions))
        for p in range(c - q, c):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        token_slots += [a] * q
    width = max((len(t) for t in block_tables), default=0)
    padded = [list(t) + [0] * (width - len(t)) for t in block_tables]
    if num_logits is None:
        num_logits = list(query_lens) if all_logits else [1] * len(query_lens)
    logits_indices = [i for s, q, k in zip(starts, query_lens, num_logits, strict=True)
                      for i in range(s + q - k, s + q)]
    ctx = StepContext(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(len(padded),
                                                                                  width),
        seq_starts=tuple(starts),
        query_lens=tuple(query_lens),
        context_lens=tuple(context_lens),
        token_adapter_slots=torch.tensor(token_slots, dtype=torch.int32, device=device),
        logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=device),
        block_size=block_size,
    )
    return torch.tensor(positions, dtype=torch.int64, device=device), ctx


_current: StepContext | None = None


@contextmanager
def step_context(ctx: StepContext) -> Iterator[StepContext]:
    """Install `ctx` for one forward pass. Steps never nest: a second install is a bug."""
    global _current
    if _current is not None:
        raise RuntimeError("a step context is already installed; step contexts do not nest")
    _current = ctx
    try:
        yield ctx
    finally:
        _current = None


def get_step_context() -> StepContext:
    if _current is None:
        raise RuntimeError("no step context installed; run the model inside "
                           "`with step_context(ctx):`")
    return _current
