"""While adapters load (the reader process takes a core), a CPU step runs on one intra-op
thread fewer and takes few prompt tokens (so that it ends soon after the reads do); once none
is loading it has all of them again, and the whole token budget."""

from pathlib import Path

import pytest
import torch

from goat_runtime.engine.engine import LOADING_PREFILL_TOKENS
from goat_runtime.engine.sampling import SamplingParams
from tests.engine.test_engine import make_engine


def test_a_step_leaves_the_reader_a_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    engine = make_engine(tmp_path)
    loading = [False]
    monkeypatch.setattr(engine.adapters, "loading", lambda: loading[0])
    threads: list[int] = []
    forward = engine._forward

    def recording_forward(scheduled):
        threads.append(torch.get_num_threads())
        return forward(scheduled)

    monkeypatch.setattr(engine, "_forward", recording_forward)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    try:
        engine.step()
        loading[0] = True
        engine.step()
        loading[0] = False
        engine.step()
    finally:
        torch.set_num_threads(2)
    assert threads == [2, 1, 2]


def test_a_step_a_thread_short_takes_few_prompt_tokens(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    engine = make_engine(tmp_path, max_num_batched_tokens=400)
    loading = [False]
    monkeypatch.setattr(engine.adapters, "loading", lambda: loading[0])
    steps: list[int] = []  # tokens each step schedules
    schedule = engine.scheduler.schedule

    def recording_schedule(max_tokens: int | None = None):
        scheduled = schedule(max_tokens)
        steps.append(sum(item.num_new_tokens for item in scheduled))
        return scheduled

    monkeypatch.setattr(engine.scheduler, "schedule", recording_schedule)
    params = SamplingParams(max_tokens=4, ignore_eos=True)

    def first_chunk_beside_a_decode(prompt: list[int], loads: bool) -> int:
        """Tokens of the step that starts `prompt` beside one running decode."""
        engine.add_request(f"decode-{prompt[0]}", [5, 6, 7, prompt[0]], params)
        engine.step()  # its prompt: it decodes from now on
        engine.add_request(f"long-{prompt[0]}", prompt, params)
        loading[0] = loads
        try:
            engine.step()
        finally:
            loading[0] = False
            torch.set_num_threads(2)
        tokens = steps[-1]
        while engine.has_work():
            engine.step()
        return tokens

    # one decode token beside the prompt's first chunk (distinct prompts: no prefix-cache hits)
    assert first_chunk_beside_a_decode([9] * 300, loads=True) == 1 + LOADING_PREFILL_TOKENS
    assert first_chunk_beside_a_decode([10] * 300, loads=False) == 1 + 300


def test_loading_is_true_from_the_request_to_the_load(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    assert not engine.adapters.loading()
    future = engine.adapters.request_load("goat0")
    assert engine.adapters.loading()
    future.result()
    assert not engine.adapters.loading()
