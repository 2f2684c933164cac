"""The per-request sampler: penalties against hand computations, the filters' masks, greedy,
seeded reproducibility, batch invariance, min_tokens, logprobs and prompt logprobs."""

import math
import random

import pytest
import torch

from goat_runtime.engine.sampler import (
    SampledTokens,
    SamplingRow,
    _apply_penalties,
    make_generator,
    prompt_logprobs,
    sample,
)
from goat_runtime.engine.sampling import SamplingParams


def row(params: SamplingParams | None = None, *, prompt=(), output=(), seed: int | None = 0,
        index: int = 0, eos=frozenset()) -> SamplingRow:
    return SamplingRow(params or SamplingParams(), list(prompt), list(output),
                       make_generator(seed, index), frozenset(eos))


def draws(logits: torch.Tensor, params: SamplingParams, count: int, **kwargs) -> list[int]:
    """`count` independent draws from one row's logits (as a batch of rows seeded 0..count-1)."""
    rows = [row(params, seed=seed, **kwargs) for seed in range(count)]
    return sample(logits.expand(count, -1).contiguous(), rows).token_ids


def probs_logits(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log().unsqueeze(0)


# --- greedy -------------------------------------------------------------------------------------

def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(8, 1000)
    result = sample(logits, [row(SamplingParams(temperature=0.0), seed=i) for i in range(8)])
    assert isinstance(result, SampledTokens)
    assert result.token_ids == logits.argmax(dim=-1).tolist()
    assert result.logprobs == [None] * 8


def test_greedy_ties_go_to_the_lowest_index():
    logits = torch.zeros(1, 10)
    logits[0, [7, 3, 9]] = 5.0
    assert sample(logits, [row(SamplingParams(temperature=0.0))]).token_ids == [3]


def test_top_k_one_is_greedy():
    torch.manual_seed(1)
    logits = torch.randn(16, 500) * 2
    rows = [row(SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(16)]
    assert sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_logits_are_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(3, 50)
    before = logits.clone()
    params = SamplingParams(temperature=0.7, top_p=0.8, min_p=0.1, repetition_penalty=1.5,
                            presence_penalty=1.0, frequency_penalty=1.0, min_tokens=4)
    sample(logits, [row(params, prompt=[1, 2], output=[3, 3], eos={4}) for _ in range(3)])
    assert torch.equal(logits, before)


# --- penalties ----------------------------------------------------------------------------------

def test_repetition_penalty_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    rows = [row(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[1, 4])]
    # tokens 0, 1, 4 seen (prompt and output): positive / 2, negative * 2; others unchanged
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0, -4.0, 1.0]])
    assert torch.equal(_apply_penalties(logits, rows), expected)


def test_frequency_and_presence_penalties_match_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    # the prompt does not count; token 1 three times, token 3 once in the output
    rows = [row(params, prompt=[0, 2, 4], output=[1, 3, 1, 1])]
    expected = torch.tensor([[1.0, 2.0 - 3 * 0.5 - 0.25, 3.0, 4.0 - 0.5 - 0.25, 5.0]])
    torch.testing.assert_close(_apply_penalties(logits, rows), expected)


def test_negative_frequency_and_presence_penalties_encourage_repeats():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    params = SamplingParams(frequency_penalty=-1.0, presence_penalty=-0.5)
    expected = torch.tensor([[1.0, 1.0 + 2.0 + 0.5, 1.0]])
    assert torch.equal(_apply_penalties(logits, [row(params, output=[1, 1])]), expected)


def test_penalties_apply_per_row_repetition_first():
    logits = torch.tensor([[4.0, -4.0, 1.0], [4.0, -4.0, 1.0], [4.0, -4.0, 1.0]])
    rows = [
        row(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), prompt=[1], output=[0]),
        row(SamplingParams(), prompt=[0, 1], output=[0, 1]),  # no penalty: untouched
        row(SamplingParams(presence_penalty=1.0), prompt=[2], output=[2, 2]),
    ]
    expected = torch.tensor([[4.0 / 2 - 1.0, -8.0, 1.0],
                             [4.0, -4.0, 1.0],
                             [4.0, -4.0, 0.0]])
    assert torch.equal(_apply_penalties(logits, rows), expected)


def test_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[0.0, 2.0, 1.5, 0.0]])
    plain = SamplingParams(temperature=0.0)
    penalized = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(logits, [row(plain, output=[1])]).token_ids == [1]
    assert sample(logits, [row(penalized, output=[1])]).token_ids == [2]
    assert sample(logits, [row(penalized, prompt=[1])]).token_ids == [2]  # prompt counts too


def test_history_token_outside_vocabulary_raises():
    with pytest.raises(ValueError, match="in \\[0, 4\\)"):
        sample(torch.zeros(1, 4), [row(SamplingParams(repetition_penalty=1.2), prompt=[7])])


# --- min_tokens ---------------------------------------------------------------------------------

def test_min_tokens_suppresses_eos_and_stop_token_ids():
    logits = torch.full((1, 8), -5.0)
    logits[0, 2] = 10.0  # EOS
    logits[0, 5] = 9.0  # stop token id
    logits[0, 6] = 1.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,))
    assert sample(logits, [row(params, output=[1, 1], eos={2})]).token_ids == [6]
    assert sample(logits, [row(params, output=[1, 1, 1], eos={2})]).token_ids == [2]
    # ignore_eos: EOS does not stop, so it is not suppressed; stop ids still are
    ignoring = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(5,), ignore_eos=True)
    assert sample(logits, [row(ignoring, output=[1], eos={2})]).token_ids == [2]
    logits[0, 2] = -5.0
    assert sample(logits, [row(ignoring, output=[1], eos={2})]).token_ids == [6]


def test_min_tokens_never_draws_suppressed_tokens():
    logits = probs_logits(0.45, 0.45, 0.05, 0.05)
    params = SamplingParams(min_tokens=2, stop_token_ids=(1,))
    tokens = draws(logits, params, 400, output=[0], eos={0})
    assert set(tokens) == {2, 3}


# --- temperature and filters --------------------------------------------------------------------

def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]])
    params = SamplingParams(temperature=0.7)
    tokens = draws(logits, params, 4000)
    expected = torch.softmax(logits[0] / 0.7, dim=-1)
    observed = torch.bincount(torch.tensor(tokens), minlength=4).float() / len(tokens)
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)


def test_top_k_keeps_the_k_most_likely():
    logits = probs_logits(0.1, 0.4, 0.05, 0.3, 0.15)
    tokens = draws(logits, SamplingParams(top_k=2), 1000)
    assert set(tokens) == {1, 3}


def test_top_p_keeps_the_smallest_head_holding_p():
    logits = probs_logits(0.15, 0.5, 0.05, 0.3)
    tokens = draws(logits, SamplingParams(top_p=0.7), 1000)
    assert set(tokens) == {1, 3}  # 0.5 < 0.7 <= 0.5 + 0.3
    tokens = draws(logits, SamplingParams(top_p=0.5), 200)
    assert set(tokens) == {1}


def test_top_p_applies_to_what_top_k_kept():
    logits = probs_logits(0.3, 0.25, 0.25, 0.2)
    # top_k=2 keeps 0.3 and 0.25 (renormalised 0.545, 0.455); top_p=0.5 then keeps only the first
    tokens = draws(logits, SamplingParams(top_k=2, top_p=0.5), 300)
    assert set(tokens) == {0}


def test_top_p_with_a_nucleus_wider_than_the_ranked_window():
    torch.manual_seed(3)
    vocab = 4096
    logits = torch.randn(1, vocab) * 0.5  # flat: the nucleus holds thousands of tokens
    top_p = 0.6
    ranked, order = torch.softmax(logits[0], -1).sort(descending=True)
    nucleus_size = int(torch.searchsorted(ranked.cumsum(0), torch.tensor([top_p]))) + 1
    assert nucleus_size > 1000
    allowed = set(order[:nucleus_size].tolist())
    tokens = draws(logits, SamplingParams(top_p=top_p), 600)
    assert set(tokens) <= allowed
    assert len(set(tokens)) > 200


def test_min_p_drops_tokens_less_likely_than_min_p_times_the_top():
    logits = probs_logits(0.6, 0.3, 0.07, 0.03)
    tokens = draws(logits, SamplingParams(min_p=0.1), 2000)
    assert set(tokens) == {0, 1, 2}  # 0.03 < 0.1 * 0.6 < 0.07


def test_min_p_with_temperature():
    logits = probs_logits(0.6, 0.3, 0.06, 0.04)
    # at temperature 0.5 the probabilities become ∝ p^2: 0.36, 0.09, 0.0036, 0.0016
    tokens = draws(logits, SamplingParams(temperature=0.5, min_p=0.05), 2000)
    assert set(tokens) == {0, 1}


def test_filters_never_draw_outside_their_mask_at_full_vocabulary():
    torch.manual_seed(4)
    vocab = 49152
    logits = torch.randn(1, vocab) * 3
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.02)
    probs = torch.softmax(logits[0] / 0.8, dim=-1)
    top50 = set(probs.topk(50).indices.tolist())
    above_min_p = set((probs >= 0.02 * probs.max()).nonzero().squeeze(1).tolist())
    tokens = draws(logits, params, 256)
    assert set(tokens) <= top50 & above_min_p


# --- generators, reproducibility, batch invariance ----------------------------------------------

def test_make_generator_is_deterministic_in_seed_and_index():
    def state(seed, index):
        return torch.rand(4, generator=make_generator(seed, index)).tolist()

    assert state(7, 0) == state(7, 0)
    assert state(7, 0) != state(7, 1)
    assert state(7, 0) != state(8, 0)
    assert state(-3, 2) == state(-3, 2)
    assert state(2**80, 0) == state(2**80, 0)  # any Python int
    assert state(None, 0) != state(None, 0)
    with pytest.raises(ValueError):
        make_generator(1, -1)


def test_seeded_generation_is_reproducible():
    torch.manual_seed(5)
    steps = [torch.randn(1, 300) for _ in range(20)]
    params = SamplingParams(temperature=1.0, top_p=0.95)

    def run(seed, index):
        generator = make_generator(seed, index)
        out: list[int] = []
        for logits in steps:
            out += sample(logits, [SamplingRow(params, [1], list(out), generator)]).token_ids
        return out

    assert run(123, 0) == run(123, 0)
    assert run(123, 0) != run(123, 1)


def random_params(rng: random.Random) -> SamplingParams:
    kind = rng.randrange(6)
    if kind == 0:
        return SamplingParams(temperature=0.0, repetition_penalty=rng.choice([1.0, 1.3]))
    return SamplingParams(
        temperature=rng.choice([0.3, 0.7, 1.0, 1.6]),
        top_k=rng.choice([0, 0, 5, 40, 1000]),
        top_p=rng.choice([1.0, 1.0, 0.9, 0.5, 0.99]),
        min_p=rng.choice([0.0, 0.0, 0.05]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.2]),
        presence_penalty=rng.choice([0.0, 0.5]),
        frequency_penalty=rng.choice([0.0, -0.3]),
        min_tokens=rng.choice([0, 0, 5]),
        stop_token_ids=rng.choice([(), (3,)]),
        logprobs=rng.choice([None, 0, 3]),
    )


@pytest.mark.parametrize(("vocab", "batch", "trial"), [(2048, 48, 0), (2048, 48, 1),
                                                         (49152, 16, 2)])
@pytest.mark.slow
def test_batch_invariance(vocab, batch, trial):
    """A row's token depends only on its own logits, params, history and generator: sampled
    alone, or in a batch of different rows (at any position), with the same seed."""
    rng = random.Random(trial)
    torch.manual_seed(trial)
    scales = torch.tensor([rng.choice([0.3, 1.0, 3.0, 8.0]) for _ in range(batch)])
    logits = torch.randn(batch, vocab) * scales.unsqueeze(1)
    specs = []
    for i in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        output = [rng.randrange(vocab) for _ in range(rng.randrange(0, 10))]
        specs.append((random_params(rng), prompt, output, 1000 * trial + i))

    def make(i):
        params, prompt, output, seed = specs[i]
        return SamplingRow(params, prompt, output, make_generator(seed, 0), frozenset({2}))

    batched = sample(logits, [make(i) for i in range(batch)])
    for i in range(batch):
        alone = sample(logits[i:i + 1], [make(i)])
        assert alone.token_ids[0] == batched.token_ids[i], i
        assert alone.logprobs[0] == batched.logprobs[i], i
    # another order of the same rows
    order = list(range(batch))
    rng.shuffle(order)
    shuffled = sample(logits[order], [make(i) for i in order])
    assert shuffled.token_ids == [batched.token_ids[i] for i in order]


# --- logprobs -----------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_the_chosen_token_first():
    torch.manual_seed(6)
    logits = torch.randn(3, 200)
    params = [
        SamplingParams(temperature=0.5, repetition_penalty=1.8, presence_penalty=2.0, logprobs=5),
        SamplingParams(temperature=0.0, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    rows = [row(p, prompt=list(range(50)), output=list(range(50, 60)), seed=i)
            for i, p in enumerate(params)]
    result = sample(logits, rows)
    raw = torch.log_softmax(logits, dim=-1)

    first = result.logprobs[0]
    chosen = result.token_ids[0]
    assert next(iter(first)) == chosen
    top5 = raw[0].topk(5)
    assert set(top5.indices.tolist()) | {chosen} == set(first)
    for token, value in first.items():
        assert value == pytest.approx(raw[0, token].item(), abs=1e-6)

    assert result.logprobs[1] == {result.token_ids[1]: pytest.approx(raw[1].max().item())}
    assert result.logprobs[2] is None


def test_logprobs_top_n_are_the_n_largest():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    result = sample(logits, [row(SamplingParams(temperature=0.0, logprobs=3))])
    assert result.token_ids == [1]
    assert list(result.logprobs[0]) == [1, 3, 4]  # chosen first, then by rank
    for token, value in result.logprobs[0].items():
        assert value == pytest.approx(math.log([0.05, 0.4, 0.1, 0.3, 0.15][token]), abs=1e-6)


# --- prompt logprobs ----------------------------------------------------------------------------

def test_prompt_logprobs():
    torch.manual_seed(7)
    next_tokens = [9, 1, 9, 0, 9]  # ranks 7, 4, 4, 3 and 1
    logits = torch.randn(len(next_tokens), 12)
    result, ranks = prompt_logprobs(logits, next_tokens, 2)
    assert len(result) == len(ranks) == len(next_tokens)
    raw = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(result):
        assert next(iter(entry)) == next_tokens[i]  # the prompt's own token first
        top = raw[i].topk(2).indices.tolist()
        assert set(entry) == {next_tokens[i], *top}
        for token, value in entry.items():
            assert value == pytest.approx(raw[i, token].item(), abs=1e-6)
        # the rank over the whole vocabulary: 1 + the tokens more likely
        assert ranks[i] == 1 + int((raw[i] > raw[i, next_tokens[i]]).sum())
    assert not all(r <= 2 for r in ranks) and any(r <= 2 for r in ranks)  # both cases covered
    alone, alone_ranks = prompt_logprobs(logits, next_tokens, 0)
    assert alone[0] == {9: pytest.approx(raw[0, 9].item())} and alone_ranks == ranks


def test_prompt_logprob_ranks_of_ties_follow_the_top_list():
    """A prompt token tied with others takes its place in the top list (vLLM's dict keeps the
    top list's rank for it); outside the list, every token at least as likely counts."""
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, -1.0]] * 2)
    _, ranks = prompt_logprobs(logits, [2, 4], 3)
    top = torch.log_softmax(logits[0], -1).topk(3).indices.tolist()
    assert ranks == [top.index(2) + 1, 5]
    _, ranks = prompt_logprobs(logits, [2, 4], 1)
    assert ranks[0] == (1 if top[0] == 2 else 3)


@pytest.mark.parametrize("logits, tokens", [(torch.zeros(2, 5), [1, 2, 3]),
                                            (torch.zeros(2, 5), [1, 5]),
                                            (torch.zeros(5), [1])])
def test_prompt_logprobs_rejects_mismatched_logits(logits, tokens):
    with pytest.raises(ValueError):
        prompt_logprobs(logits, tokens, 1)


def test_sample_rejects_mismatched_logits():
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 5), [row()])
    assert sample(torch.zeros(0, 5), []) == SampledTokens([], [])
