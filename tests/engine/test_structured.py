"""Structured outputs in the engine, on the fixture (its word-level vocabulary has no JSON
characters, so choices, regexes and grammars over its words; JSON on SmolLM2 is in
tests/e2e): constrained and free requests over different adapters in one batch, n > 1 with
seeds, max_tokens, stop strings, the grammar cache, invalid and too slow constraints."""

import time
from pathlib import Path

import pytest
import torch

from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.sampler import SamplingRow, sample
from goat_runtime.engine.sampling import Constraint, SamplingParams, SamplingParamsError
from goat_runtime.engine.structured import token_bitmask
from tests.engine.test_engine import GREEDY, PROMPTS, REFERENCE, make_engine, run

EOS = 2  # the fixture's </s>
CHOICE = Constraint("choice", '["w7w8", "w9"]')
WORDS_10_TO_19 = Constraint("regex", "(w1[0-9])+")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    return make_engine(tmp_path_factory.mktemp("structured"))


def test_constrained_and_free_requests_in_one_batch(engine):
    sampled = SamplingParams(n=4, seed=3, max_tokens=8, constraint=CHOICE)
    results = run(engine, [
        ("choice", PROMPTS[0], sampled, "goat0"),
        ("free", PROMPTS[1], GREEDY, "goat1"),
        ("regex", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=5,
                                             constraint=WORDS_10_TO_19), "lora0"),
        ("grammar", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, constraint=(
            Constraint("grammar", 'root ::= "w5" ("w6" | "w7") "w8"'))), None)])
    choice = results["choice"]
    assert all(t in ([7, 8, EOS], [9, EOS]) for t in choice["tokens"]), choice
    assert choice["finish"] == ["stop"] * 4
    # the free request next to them gets its reference tokens: masks touch only their rows
    assert results["free"]["tokens"][0] == REFERENCE["goat1_greedy_1"].tolist()
    regex = results["regex"]
    assert regex["finish"] == ["length"]  # truncated by max_tokens
    assert len(regex["tokens"][0]) == 5 and all(10 <= t <= 19 for t in regex["tokens"][0])
    grammar = results["grammar"]["tokens"][0]
    assert grammar[0] == 5 and grammar[1] in (6, 7) and grammar[2:] == [8, EOS]


def test_seeded_constrained_outputs_are_reproducible(engine):
    params = SamplingParams(n=3, seed=11, max_tokens=6, constraint=WORDS_10_TO_19)
    first = run(engine, [("a", PROMPTS[1], params, "goat1")])["a"]["tokens"]
    again = run(engine, [("b", PROMPTS[1], params, "goat1"),
                         ("c", PROMPTS[0], GREEDY, None)])["b"]["tokens"]
    assert first == again
    assert len({tuple(t) for t in first}) > 1  # the n completions differ


def test_stop_string_ends_a_constrained_output(engine):
    forced = Constraint("choice", '["w7w8"]')
    result = run(engine, [("s", PROMPTS[0], SamplingParams(
        temperature=0.0, max_tokens=8, stop=("w8",), constraint=forced), None)])["s"]
    assert result["finish"] == ["stop"] and result["tokens"][0] == [7, 8]
    assert "w8" not in result["text"][0]


def test_grammars_are_cached_per_constraint(engine):
    grammar = engine.grammars.compile(Constraint("regex", "w3w4"))
    assert engine.grammars.compile(Constraint("regex", "w3w4")) is grammar
    assert engine.grammars.compile(Constraint("regex", "w3w5")) is not grammar


@pytest.mark.parametrize("constraint, message", [
    (Constraint("regex", "(w1", param="structured_outputs"), "Invalid regex"),
    (Constraint("json", '{"type": "nonsense"}', param="response_format"), "Invalid JSON schema"),
    (Constraint("json", "{not json", param="response_format"), "Invalid JSON schema"),
    (Constraint("choice", '["w7", 3]'), "choice must be a non-empty list of strings"),
    (Constraint("grammar", "root ::= undefined_rule"), "Invalid grammar"),
])
def test_invalid_constraints_are_refused_by_name(engine, constraint, message):
    with pytest.raises(SamplingParamsError, match=message) as info:
        engine.add_request("bad", PROMPTS[0], SamplingParams(constraint=constraint))
    assert info.value.param == constraint.param
    assert not engine.has_work()


def test_a_slow_compile_is_refused_within_the_time_limit(tmp_path, monkeypatch):
    engine = make_engine(Path(tmp_path), grammar_compile_timeout=0.001)
    # A compile that outlasts the limit for sure. A real slow regex (6-20 ms) was accepted
    # in about one run of twelve here: xgrammar holds the GIL for stretches of 4-5 ms while it
    # compiles, so the waiting thread could look again only after the compile had ended.
    compile_now = engine.grammars._compile
    monkeypatch.setattr(engine.grammars, "_compile",
                        lambda constraint: time.sleep(0.3) or compile_now(constraint))
    slow = Constraint("regex", "(w3|w4|w5){1,30}w6")
    with pytest.raises(SamplingParamsError, match=r"took longer than 0\.001 s"):
        engine.add_request("slow", PROMPTS[0], SamplingParams(constraint=slow))
    assert not engine.has_work()
    engine.grammars.shutdown()


def test_min_tokens_with_a_constraint_is_refused():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(min_tokens=2, max_tokens=4, constraint=CHOICE)
    assert info.value.param == "min_tokens"


def test_bitmask_masks_only_constrained_rows(engine):
    """One mask for the batch: the constrained row can only pick an allowed token even where
    the logits favour another; the free row is sampled from its logits untouched."""
    matcher = engine.grammars.matcher(engine.grammars.compile(Constraint("choice", '["w9"]')))
    vocab = engine.vocab_size
    logits = torch.zeros(2, vocab)
    logits[:, 42] = 10.0  # both rows' favourite
    bitmask = token_bitmask([matcher, None], vocab)
    rows = [SamplingRow(SamplingParams(temperature=0.0, logprobs=1), [3], [],
                        torch.Generator()) for _ in range(2)]
    result = sample(logits, rows, bitmask)
    assert result.token_ids == [9, 42]
    assert logits[0, 42] == 10.0  # the input is not modified
    assert result.logprobs[0][9] == pytest.approx(0.0)  # the mask is seen by the logprobs
    assert sample(logits, rows, token_bitmask([None, matcher], vocab)).token_ids == [42, 9]
    assert token_bitmask([None, None], vocab) is None
