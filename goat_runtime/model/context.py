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
from dataclasses import dataclass

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
    """Built by `build_step_context` (which checks the layout), read by the layers."""

    slot_mapping: torch.Tensor  # [T] int64: the cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32; pad with 0 (gathered, masked)
    seq_starts: tuple[int, ...]
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    token_adapter_slots: torch.Tensor  # [T] int32, -1: the base model
    logits_indices: torch.Tensor  # [N] int64: flat tokens whose hidden states give logits
    block_size: int
    # Derived once per step (not per layer): whether the adapter op runs, the attention's plan.
    has_adapter_tokens: bool
    prefills: tuple[PrefillSeq, ...]
    decode: DecodeBatch | None
    # [num_slots, E] int64: the routed op counts the experts each slot's routers choose (metrics)
    expert_counts: torch.Tensor | None = None


def _context_slots(block_tables: torch.Tensor, seq: int, length: int,
                   block_size: int) -> torch.Tensor:
    """[length] cache slots of the first `length` tokens of sequence `seq`."""
    num_blocks = -(-length // block_size)
    blocks = block_tables[seq, :num_blocks].long()
    offsets = torch.arange(block_size, device=block_tables.device)
    return (blocks[:, None] * block_size + offsets).flatten()[:length]


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

    The integers go to the device as two tensors (int64 and int32), split into views: each
    tensor made from a list is a host call of its own (and a copy on a GPU), and a decode step
    of the tiny model is only a few milliseconds.
    """
    num_seqs = len(query_lens)
    if not len(context_lens) == len(block_tables) == len(adapter_slots) == num_seqs:
        raise ValueError("query_lens, context_lens, block_tables and adapter_slots must have "
                         "one entry per sequence")
    positions: list[int] = []
    slots: list[int] = []
    starts: list[int] = []
    ints32: list[int] = []  # each token's adapter slot, then the padded block tables
    for q, c, table, a in zip(query_lens, context_lens, block_tables, adapter_slots,
                              strict=True):
        if not 1 <= q <= c:
            raise ValueError(f"a sequence needs 1 <= query_len <= context_len, got {q}, {c}")
        if len(table) * block_size < c:
            raise ValueError(f"a context of {c} tokens needs {-(-c // block_size)} blocks of "
                             f"{block_size}; its block table has {len(table)}")
        starts.append(len(positions))
        if q == 1:  # most sequences of most steps
            positions.append(c - 1)
            slots.append(table[(c - 1) // block_size] * block_size + (c - 1) % block_size)
            ints32.append(a)
            continue
        positions.extend(range(c - q, c))
        slots.extend(table[p // block_size] * block_size + p % block_size
                     for p in range(c - q, c))
        ints32 += [a] * q
    width = max((len(t) for t in block_tables), default=0)
    if num_logits is None:
        num_logits = list(query_lens) if all_logits else [1] * num_seqs
    logits_indices = [i for s, q, k in zip(starts, query_lens, num_logits, strict=True)
                      for i in range(s + q - k, s + q)]
    decodes = [i for i, q in enumerate(query_lens) if q == 1]
    decode_lens = [context_lens[i] for i in decodes]
    ints64 = torch.tensor(positions + slots + logits_indices + [starts[i] for i in decodes]
                          + decode_lens, dtype=torch.int64, device=device)
    # split_with_sizes: Tensor.split is a Python wrapper around it, 10 us a call here.
    positions_t, slot_mapping, logits_t, decode_indices, decode_lens_t = (
        ints64.split_with_sizes([len(positions), len(slots), len(logits_indices),
                                 len(decodes), len(decodes)]))
    for t in block_tables:
        ints32 += t
        if len(t) < width:
            ints32 += [0] * (width - len(t))
    token_adapter_slots, tables = torch.tensor(
        ints32, dtype=torch.int32, device=device).split_with_sizes(
        [len(positions), num_seqs * width])
    tables = tables.view(num_seqs, width)
    decode = None
    if decodes:
        decode = DecodeBatch(
            token_indices=decode_indices,
            block_tables=tables if len(decodes) == num_seqs else tables[decodes],
            context_lens=decode_lens_t, max_context_len=max(decode_lens))
    prefills = tuple(
        PrefillSeq(s, q, c, None if c == q else _context_slots(tables, i, c, block_size))
        for i, (s, q, c) in enumerate(zip(starts, query_lens, context_lens, strict=True))
        if q > 1)
    ctx = StepContext(
        slot_mapping=slot_mapping, block_tables=tables, seq_starts=tuple(starts),
        query_lens=tuple(query_lens), context_lens=tuple(context_lens),
        token_adapter_slots=token_adapter_slots, logits_indices=logits_t,
        block_size=block_size, has_adapter_tokens=any(a >= 0 for a in adapter_slots),
        prefills=prefills, decode=decode)
    return positions_t, ctx


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
