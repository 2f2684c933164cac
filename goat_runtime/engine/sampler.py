"""Per-request token sampling for a batch of rows (one row per running completion).

Every row carries its own torch.Generator, and a row's draw reads only that generator and that
row's processed logits: a seeded request gets the same tokens whatever else shares the batch
(batch invariance). To keep that true the sampling path uses only per-row kernels (softmax,
cumsum, topk, element-wise ops) and never a batch-shaped random tensor; a draw is one uniform
per row mapped through the row's cumulative distribution, which costs one pass over the
vocabulary instead of a vocabulary-sized random tensor per row. The arithmetic is vectorised
across rows and the work of a penalty or filter that no row uses is skipped, since this runs at
every decode step.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from goat_runtime.engine.outputs import TokenLogprobs
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.engine.structured import apply_token_bitmask

# Temperatures below this sample greedily, as vLLM does: dividing logits by them overflows.
GREEDY_TEMPERATURE = 1e-5
# top_p first looks for its nucleus among this many most likely tokens (a partial sort is far
# cheaper than a full one); rows whose nucleus is wider are redone with a wider window.
_TOP_P_WINDOW = 256


def make_generator(seed: int | None, index: int, device: torch.device | str = "cpu"
                   ) -> torch.Generator:
    """The generator of completion `index` of a request.

    With a seed it depends on (seed, index) only, so a request's n completions differ from each
    other yet each one is reproducible; without a seed it is seeded from os.urandom, so that
    unseeded requests do not share (or leak) the process's global random state.
    """
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if seed is None:
        value = int.from_bytes(os.urandom(8), "little") >> 1
    elif isinstance(seed, int):
        digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
        value = int.from_bytes(digest, "little") >> 1  # 63 bits: valid for manual_seed
    else:
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    generator = torch.Generator(device=device)
    generator.manual_seed(value)
    return generator


@dataclass
class SamplingRow:
    """What sampling one completion's next token needs. Token sequences may be lists or 1-D
    integer tensors (a tensor avoids a conversion per step for long prompts)."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator
    # Suppressed (with params.stop_token_ids) while fewer than params.min_tokens tokens have
    # been generated, unless params.ignore_eos (EOS then does not stop, so needs no suppressing).
    eos_token_ids: frozenset[int] = frozenset()


@dataclass
class SampledTokens:
    token_ids: list[int]
    # Per row: None when params.logprobs is None, else the chosen token's logprob and the top
    # params.logprobs alternatives, from the raw log_softmax of the logits (before penalties
    # and temperature, as vLLM reports by default). The chosen token comes first.
    logprobs: list[TokenLogprobs | None]


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow],
           token_bitmask: torch.Tensor | None = None) -> SampledTokens:
    """Choose the next token of every row. `logits` [N, V] (N = len(rows)) is not modified.
    `token_bitmask` [N, ceil(V / 32)] int32 (structured outputs, engine/structured.py) masks
    the tokens each row's grammar forbids, for every row at once, before anything else (the
    logprobs then see the mask, as vLLM's do)."""
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be [len(rows)={len(rows)}, vocab], "
                         f"got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if not rows:
        return SampledTokens([], [])
    original = logits
    logits = logits.float()  # no copy when already float32
    if token_bitmask is not None:
        logits = logits.clone() if logits.data_ptr() == original.data_ptr() else logits
        apply_token_bitmask(logits, token_bitmask)
    work = _apply_penalties(logits, rows)
    greedy = [i for i, row in enumerate(rows) if _is_greedy(row.params)]
    drawn = [i for i, row in enumerate(rows) if not _is_greedy(row.params)]
    if not drawn:
        tokens = work.argmax(dim=-1)  # ties go to the lowest index
    elif not greedy:
        tokens = _draw(work, rows)
    else:
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy_index = torch.tensor(greedy, device=logits.device)
        drawn_index = torch.tensor(drawn, device=logits.device)
        tokens[greedy_index] = work[greedy_index].argmax(dim=-1)
        tokens[drawn_index] = _draw(work[drawn_index], [rows[i] for i in drawn])
    token_ids = tokens.tolist()
    return SampledTokens(token_ids, _token_logprobs(logits, rows, token_ids))


def prompt_logprobs(logits: torch.Tensor, next_token_ids: Sequence[int], num: int
                    ) -> tuple[list[TokenLogprobs], list[int]]:
    """Logprobs of prompt tokens (echo, prompt_logprobs), for a run of prompt positions: row i
    of `logits` [m, V] is the position that predicts next_token_ids[i]; each entry holds that
    token's logprob (first) and the top `num` alternatives at the position, in rank order.
    Also returns each prompt token's rank as vLLM reports it: its place among the top `num`
    if it is one of them, else the number of tokens at least as likely (itself included).
    The engine calls it once per few rows of a prefill chunk, so no [len(prompt), V] tensor
    ever exists."""
    targets = [int(t) for t in next_token_ids]
    if logits.dim() != 2 or logits.shape[0] != len(targets):
        raise ValueError(f"logits must be [{len(targets)}, vocab] for {len(targets)} prompt "
                         f"tokens, got {tuple(logits.shape)}")
    if not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be a non-negative integer, got {num!r}")
    vocab = logits.shape[1]
    if any(not 0 <= t < vocab for t in targets):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    lp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, dtype=torch.long, device=logits.device)
    actual_t = lp.gather(1, index[:, None])
    ranks = (lp >= actual_t).sum(dim=-1).tolist()
    actual = actual_t.squeeze(1).tolist()
    top_values, top_ids = lp.topk(num, dim=-1) if num else (None, None)
    result: list[TokenLogprobs] = []
    for j, value in enumerate(actual):
        entry = {targets[j]: value}
        if top_ids is not None and top_values is not None:
            ids = top_ids[j].tolist()
            if targets[j] in ids:
                ranks[j] = ids.index(targets[j]) + 1
            for token, alt in zip(ids, top_values[j].tolist(), strict=True):
                entry.setdefault(token, alt)
        result.append(entry)
    return result, ranks


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < GREEDY_TEMPERATURE or params.top_k == 1


def _token_keys(seqs: list[tuple[int, Sequence[int]]], vocab: int) -> torch.Tensor:
    """Flat indices row * vocab + token of the given (row, tokens) pairs, into a [N, V] view.
    Lists are gathered into one tensor (a tensor per short list costs more than the list)."""
    parts: list[torch.Tensor] = []
    pending: list[int] = []
    lengths: list[int] = []
    for _, seq in seqs:
        if isinstance(seq, torch.Tensor):
            if pending:
                parts.append(torch.tensor(pending, dtype=torch.long))
                pending = []
            parts.append(seq.to(device="cpu", dtype=torch.long).reshape(-1))
            lengths.append(parts[-1].numel())
        else:
            pending.extend(seq)
            lengths.append(len(seq))
    if pending or not parts:
        parts.append(torch.tensor(pending, dtype=torch.long))
    tokens = torch.cat(parts) if len(parts) > 1 else parts[0]
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(f"token ids in a row's history must be in [0, {vocab})")
    row_ids = torch.tensor([row for row, _ in seqs]).repeat_interleave(torch.tensor(lengths))
    return row_ids * vocab + tokens


def _apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, frequency and presence penalties and min_tokens suppression, on a copy of
    `logits` (or `logits` itself when no row uses any). Each touches only the history's
    entries, not whole rows."""
    repetition = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    additive = [i for i, row in enumerate(rows)
                if row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0]
    suppress = [i for i, row in enumerate(rows)
                if len(row.output_token_ids) < row.params.min_tokens]
    if not (repetition or additive or suppress):
        return logits
    vocab = logits.shape[1]
    device = logits.device
    work = logits.clone(memory_format=torch.contiguous_format)
    flat = work.view(-1)
    if repetition:
        # transformers/vLLM: over prompt and output tokens, positive logits are divided by the
        # penalty and negative ones multiplied (both move away from the token when > 1).
        keys = torch.unique(_token_keys(
            [(i, rows[i].prompt_token_ids) for i in repetition]
            + [(i, rows[i].output_token_ids) for i in repetition], vocab)).to(device)
        penalty = torch.tensor([row.params.repetition_penalty for row in rows], device=device)
        penalty = penalty[keys // vocab]
        values = flat[keys]
        flat[keys] = torch.where(values > 0, values / penalty, values * penalty)
    if additive:
        # OpenAI: logit - frequency_penalty * count - presence_penalty * (count > 0), over the
        # output tokens only.
        keys, counts = torch.unique(
            _token_keys([(i, rows[i].output_token_ids) for i in additive], vocab),
            return_counts=True)
        keys, counts = keys.to(device), counts.to(device)
        frequency = torch.tensor([row.params.frequency_penalty for row in rows], device=device)
        presence = torch.tensor([row.params.presence_penalty for row in rows], device=device)
        row_of = keys // vocab
        flat[keys] = flat[keys] - (frequency[row_of] * counts + presence[row_of])
    if suppress:
        keys_list = []
        for i in suppress:
            row = rows[i]
            banned = set(row.params.stop_token_ids)
            if not row.params.ignore_eos:
                banned |= row.eos_token_ids
            # ids outside the vocabulary cannot be sampled anyway
            keys_list += [i * vocab + t for t in banned if 0 <= t < vocab]
        if keys_list:
            flat[torch.tensor(keys_list, device=device)] = float("-inf")
    return work


def _draw(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """One random token per row: temperature, top_k, top_p and min_p, then the row's own
    uniform draw mapped through the row's cumulative distribution (inverse transform)."""
    device = logits.device
    temperatures = [row.params.temperature for row in rows]
    if any(t != 1.0 for t in temperatures):
        logits = logits / torch.tensor(temperatures, device=device).unsqueeze(1)
    probs = torch.softmax(logits, dim=-1)
    threshold = _filter_thresholds(probs, rows)
    if threshold is not None:
        probs.masked_fill_(probs < threshold.unsqueeze(1), 0.0)
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1]
    uniform = torch.cat([torch.rand(1, generator=row.generator, device=row.generator.device)
                         for row in rows]).to(device)
    # Strictly below the total, so that the search lands on a token of positive probability
    # (the first whose cumulative sum exceeds the target) even when u * total rounds up.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    tokens = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    return tokens


def _filter_thresholds(probs: torch.Tensor, rows: Sequence[SamplingRow]
                       ) -> torch.Tensor | None:
    """Per row, the probability below which top_k, top_p and min_p drop a token (None when no
    row filters). Thresholds keep ties, so they do not depend on how ties are ordered."""
    num_rows, vocab = probs.shape
    top_k = [row.params.top_k if 0 < row.params.top_k < vocab else 0 for row in rows]
    top_p = [row.params.top_p for row in rows]
    min_p = [row.params.min_p for row in rows]
    ranked = [i for i in range(num_rows) if top_k[i] or top_p[i] < 1.0]
    filtered = [i for i in range(num_rows) if min_p[i] > 0.0]
    if not ranked and not filtered:
        return None
    threshold = torch.zeros(num_rows, device=probs.device)
    if ranked:
        ranked_thresholds = _top_k_top_p_thresholds(
            _select(probs, ranked), [top_k[i] for i in ranked], [top_p[i] for i in ranked])
        threshold[_index(ranked, probs)] = ranked_thresholds
    if filtered:
        # min_p: drop tokens less likely than min_p times the most likely one (renormalising
        # after top_k/top_p scales both sides alike, so the order of filters does not matter).
        index = _index(filtered, probs)
        scale = torch.tensor([min_p[i] for i in filtered], device=probs.device)
        min_p_thresholds = _select(probs, filtered).amax(dim=-1) * scale
        threshold[index] = torch.maximum(threshold[index], min_p_thresholds)
    return threshold


def _top_k_top_p_thresholds(probs: torch.Tensor, top_k: list[int], top_p: list[float]
                            ) -> torch.Tensor:
    """Per row of probs [R, V]: the smallest probability kept by top_k (0 = off), then by top_p
    (1.0 = off) over what top_k kept. Ranks only the most likely tokens (a full sort of the
    vocabulary costs far more): the top_k of a row with top_k, else a fixed window; rows whose
    nucleus is wider than the window go to _wide_top_p. Which way a row goes depends on that
    row alone, never on the others' top_k (batch invariance)."""
    num_rows, vocab = probs.shape
    device = probs.device
    window = min(vocab, _TOP_P_WINDOW)
    limits = [top_k[i] or window for i in range(num_rows)]
    width = max(limits)
    values = probs.topk(width, dim=-1).values  # descending
    limit = torch.tensor(limits, device=device)
    p = torch.tensor(top_p, device=device)
    # The window holds every token the row may keep: the row's top_k, or the whole vocabulary.
    complete = torch.tensor([bool(k) or window == vocab for k in top_k], device=device)
    threshold_k = values.gather(1, (limit - 1).unsqueeze(1)).squeeze(1)
    threshold_k = torch.where(torch.tensor([bool(k) for k in top_k], device=device),
                              threshold_k, 0.0)
    kept = values.masked_fill(torch.arange(width, device=device) >= limit.unsqueeze(1), 0.0)
    cumulative = kept.cumsum(dim=-1)
    # The nucleus is the shortest head of the ranking holding top_p of the mass top_k kept (of
    # the whole distribution, 1, without top_k).
    mass = torch.where(complete, cumulative[:, -1], 1.0)
    cut = torch.searchsorted(cumulative, (p * mass).unsqueeze(1)).squeeze(1)
    uses_p = p < 1.0
    found = cut < limit
    # Not found in a complete window: rounding kept the sum under top_p, so the nucleus is all
    # the window holds (threshold 0, or top_k's).
    threshold_p = torch.where(uses_p & found,
                              values.gather(1, cut.clamp(max=width - 1).unsqueeze(1)).squeeze(1),
                              0.0)
    threshold = torch.maximum(threshold_k, threshold_p)
    wide = (uses_p & ~found & ~complete).nonzero().squeeze(1)
    if wide.numel():
        threshold[wide] = _wide_top_p(probs[wide], p[wide])
    return threshold


def _wide_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """top_p thresholds of rows (without top_k) whose nucleus is too wide to rank: bucket the
    probabilities by their float exponent and top 3 mantissa bits (eighth-octaves; the bit
    patterns of non-negative floats order like their values), find the bucket where the mass
    from the top crosses top_p, and rank only that bucket's tokens."""
    num_rows = probs.shape[0]
    num_buckets = 1024  # 1.0 is bucket 1016
    buckets = (probs.contiguous().view(torch.int32) >> 20).long()
    mass = torch.zeros(num_rows, num_buckets, device=probs.device)
    mass.scatter_add_(1, buckets, probs)
    from_top = mass.flip(1).cumsum(dim=1)
    crossing = torch.searchsorted(from_top, top_p.unsqueeze(1)).squeeze(1).tolist()
    thresholds = []
    for row, position in enumerate(crossing):
        if position >= num_buckets:  # rounding kept the total under top_p: keep everything
            thresholds.append(0.0)
            continue
        above = from_top[row, position - 1] if position else 0.0
        bucket = num_buckets - 1 - position
        ranked = probs[row][buckets[row] == bucket].sort(descending=True).values
        cut = torch.searchsorted(ranked.cumsum(0) + above, top_p[row:row + 1])
        thresholds.append(float(ranked[cut.clamp(max=ranked.numel() - 1)]))
    return torch.tensor(thresholds, device=probs.device)


def _index(indices: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(indices, dtype=torch.long, device=like.device)


def _select(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Rows `indices` of `tensor`, without a copy when that is every row in order."""
    if indices == list(range(tensor.shape[0])):
        return tensor
    return tensor[_index(indices, tensor)]


def _token_logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow], token_ids: list[int]
                    ) -> list[TokenLogprobs | None]:
    result: list[TokenLogprobs | None] = [None] * len(rows)
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not wanted:
        return result
    logprobs = torch.log_softmax(_select(logits, wanted), dim=-1)
    chosen_ids = torch.tensor([token_ids[i] for i in wanted], device=logits.device)
    chosen = logprobs.gather(1, chosen_ids.unsqueeze(1)).squeeze(1).tolist()
    num = max(rows[i].params.logprobs or 0 for i in wanted)
    top_values: list[list[float]] = [[] for _ in wanted]
    top_ids: list[list[int]] = [[] for _ in wanted]
    if num:
        values, ids = logprobs.topk(num, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(wanted):
        entry = {token_ids[i]: chosen[j]}
        count = rows[i].params.logprobs or 0
        for token, value in zip(top_ids[j][:count], top_values[j][:count], strict=True):
            entry.setdefault(token, value)
        result[i] = entry
    return result
