"""While adapters load (the reader process takes a core), a CPU step runs on one intra-op
thread fewer; once none is loading it has all of them again."""

from pathlib import Path

import pytest
import torch

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


def test_loading_is_true_from_the_request_to_the_load(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    assert not engine.adapters.loading()
    future = engine.adapters.request_load("goat0")
    assert engine.adapters.loading()
    future.result()
    assert not engine.adapters.loading()
