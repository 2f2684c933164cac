"""Prompt logprobs (echo) through chunked prefill and preemption: computed chunk by chunk, and a
sequence preempted in the middle of its prompt gives the same answer as one that was not."""

import random

import pytest
import torch

from goat_runtime.engine import engine as engine_module
from goat_runtime.engine.sampling import SamplingParams
from tests.engine.test_engine import (
    NAMES,
    PROMPTS,
    REFERENCE,
    make_engine,
    reference_key,
    run,
    step_all,
)


def echo(num: int = 2, max_tokens: int = 4) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                          prompt_logprobs=num, logprobs=num)


def assert_same_logprobs(got: list, expected: list, tol: float = 1e-5) -> None:
    assert len(got) == len(expected) and got[0] is None and expected[0] is None
    for pos, (a, b) in enumerate(zip(got[1:], expected[1:], strict=True), start=1):
        assert list(a) == list(b), pos  # the prompt's token, then the same top-N in order
        for token in a:
            assert a[token] == pytest.approx(b[token], abs=tol), (pos, token)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_preempted_mid_prompt_same_prompt_logprobs(tmp_path, name):
    """Chunks of 4 tokens; the sequence is preempted after two chunks of its 33-token prompt,
    then prefilled again from the start: its prompt logprobs match the reference's and those of
    a run without preemption, and its tokens are the reference greedy ones."""
    prompt = PROMPTS[2]
    key = reference_key(name)
    engine = make_engine(tmp_path, max_num_batched_tokens=4)
    alone = run(engine, [("alone", prompt, echo(3, 12), name)])["alone"]

    engine.add_request("preempted", prompt, echo(3, 12), name)
    outputs = []
    while engine.requests["preempted"].sequences[0].num_computed_tokens < 8:
        outputs += engine.step()
    seq = engine.requests["preempted"].sequences[0]
    assert 0 < len(engine.requests["preempted"].prompt_entries) < len(prompt)
    engine.scheduler._preempt(seq)
    assert seq.num_computed_tokens == 0
    outputs += list(step_all(engine))
    got = next(o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None)
    ranks = next(o.prompt_logprob_ranks for o in outputs if o.prompt_logprobs is not None)
    tokens = [t for o in outputs for d in o.outputs for t in d.token_ids]

    assert engine.scheduler.num_preemptions == 1
    assert tokens == alone["tokens"][0] == REFERENCE[f"{key}_greedy_2"].tolist()
    assert_same_logprobs(got, alone["prompt_logprobs"])
    expected = torch.log_softmax(REFERENCE[f"{key}_logits_2"], dim=-1)
    for pos in range(1, len(prompt)):
        assert got[pos][prompt[pos]] == pytest.approx(expected[pos - 1, prompt[pos]].item(),
                                                      abs=1e-4)
        # the rank over the vocabulary: 1 + the tokens more likely (up to the reference's
        # rounding)
        row, value = expected[pos - 1], expected[pos - 1, prompt[pos]]
        assert 1 + (row > value + 1e-4).sum() <= ranks[pos] <= (row >= value - 1e-4).sum(), pos
    assert ranks[0] is None and ranks == alone["prompt_ranks"]
    assert len(set(ranks[1:])) > 3  # a spread of ranks, not all top
    assert engine.allocator.num_free == engine.num_blocks or engine.config.enable_prefix_caching


@pytest.mark.slow
def test_echo_burst_under_kv_pressure(tmp_path):
    """The issue's burst: 10 echo + logprobs requests of 200-350 prompt tokens over the base
    and two adapters, on a KV cache too small to hold them all (prefill chunks of 256, so
    sequences are preempted mid-prompt). Every request completes with the answer it has alone."""
    rng = random.Random(3)
    names = [None, "goat0", "lora0"]
    requests = [(f"r{i}", [rng.randrange(3, 320) for _ in range(rng.randint(200, 350))],
                 echo(2, 16), names[i % 3]) for i in range(10)]
    small = make_engine(tmp_path, kv_cache_memory=1 << 20, max_num_batched_tokens=256,
                        enable_prefix_caching=False)
    assert small.num_blocks * small.block_size < sum(len(p) for _, p, _, _ in requests)
    burst = run(small, requests)
    assert small.scheduler.num_preemptions > 0
    assert small.allocator.num_free == small.num_blocks

    roomy = make_engine(tmp_path, enable_prefix_caching=False)
    for request in requests:
        alone = run(roomy, [request])[request[0]]
        got = burst[request[0]]
        assert got["tokens"] == alone["tokens"], request[0]
        assert_same_logprobs(got["prompt_logprobs"], alone["prompt_logprobs"], tol=1e-4)


@pytest.mark.slow
def test_prompt_logits_bounded_per_chunk(tmp_path, monkeypatch):
    """No more than PROMPT_LOGITS_ROWS rows of prompt logits exist at once, however long the
    prompt chunk: the model's logits are asked for a few rows at a time."""
    engine = make_engine(tmp_path, max_num_batched_tokens=512)
    monkeypatch.setattr(engine_module, "PROMPT_LOGITS_ROWS", 16)
    sizes: list[int] = []
    compute = engine_module.prompt_logprobs

    def recording(logits, next_token_ids, num):
        sizes.append(logits.shape[0])
        return compute(logits, next_token_ids, num)

    monkeypatch.setattr(engine_module, "prompt_logprobs", recording)
    prompt = [random.Random(5).randrange(3, 320) for _ in range(300)]
    result = run(engine, [("long", prompt, echo(5), None)])["long"]
    assert len(result["prompt_logprobs"]) == len(prompt)
    assert max(sizes) == 16 and sum(sizes) == len(prompt) - 1
