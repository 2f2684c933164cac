"""The reader process reads at idle priority; once a read has waited LOAD_PATIENCE_S (a busy
engine leaves it no idle core), a CPU step runs on one intra-op thread fewer and takes few
prompt tokens (so that it ends soon after the reads do); once no read waits it has all of them
again, and the whole token budget."""

import os
import time
from pathlib import Path

import pytest
import torch

from goat_runtime.adapters.reader import AdapterReader
from goat_runtime.engine.engine import LOAD_PATIENCE_S, LOADING_PREFILL_TOKENS
from goat_runtime.engine.sampling import SamplingParams
from tests.engine.test_engine import make_engine


def test_a_step_leaves_a_starved_reader_a_core(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    engine = make_engine(tmp_path)
    queued: list[float | None] = [None]
    monkeypatch.setattr(engine.adapters, "reads_waiting_since", lambda: queued[0])
    threads: list[int] = []
    forward = engine._forward

    def recording_forward(scheduled):
        threads.append(torch.get_num_threads())
        return forward(scheduled)

    monkeypatch.setattr(engine, "_forward", recording_forward)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=4, ignore_eos=True))
    try:
        engine.step()  # no read waits
        queued[0] = time.monotonic()
        engine.step()  # a read waits, not yet for long: the reader has the idle cores
        queued[0] = time.monotonic() - 2 * LOAD_PATIENCE_S
        engine.step()  # it has waited too long: a thread for the reader
        queued[0] = None
        engine.step()
    finally:
        torch.set_num_threads(2)
    assert threads == [2, 2, 1, 2]


def test_a_step_a_thread_short_takes_few_prompt_tokens(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    engine = make_engine(tmp_path, max_num_batched_tokens=400)
    queued: list[float | None] = [None]
    monkeypatch.setattr(engine.adapters, "reads_waiting_since", lambda: queued[0])
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
        queued[0] = time.monotonic() - 2 * LOAD_PATIENCE_S if loads else None
        try:
            engine.step()
        finally:
            queued[0] = None
            torch.set_num_threads(2)
        tokens = steps[-1]
        while engine.has_work():
            engine.step()
        return tokens

    # one decode token beside the prompt's first chunk (distinct prompts: no prefix-cache hits)
    assert first_chunk_beside_a_decode([9] * 300, loads=True) == 1 + LOADING_PREFILL_TOKENS
    assert first_chunk_beside_a_decode([10] * 300, loads=False) == 1 + 300


def test_a_read_waits_from_its_queueing_to_its_load(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    assert engine.adapters.reads_waiting_since() is None
    before = time.monotonic()
    future = engine.adapters.request_load("goat0")
    since = engine.adapters.reads_waiting_since()
    assert since is not None and before <= since <= time.monotonic()
    future.result()
    assert engine.adapters.reads_waiting_since() is None


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or len(os.sched_getaffinity(0)) < 2,
                    reason="Linux's idle scheduling class, used where there are cores to spare")
def test_the_reader_process_runs_at_idle_priority() -> None:
    reader = AdapterReader()
    try:
        pid = reader._run("pid", os.getpid)
        assert pid != os.getpid()
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the serving process keeps its own
    finally:
        reader.shutdown()
