"""While the adapter reader process reads (it takes a core), a CPU step runs on one intra-op
thread fewer; with no read in flight it has all of them again."""

from pathlib import Path

import pytest
import torch

from goat_runtime.adapters.reader import AdapterReader
from goat_runtime.engine.sampling import SamplingParams
from tests.engine.test_engine import make_engine


class Reading(AdapterReader):
    """A reader whose `reading` the test sets."""

    def __init__(self) -> None:
        super().__init__()
        self.busy = False

    @property
    def reading(self) -> bool:
        return self.busy


def test_a_step_leaves_the_reader_a_core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(2)
    engine = make_engine(tmp_path)
    reader = Reading()
    monkeypatch.setattr(engine.adapters, "reader", reader)
    threads: list[int] = []
    forward = engine._forward

    def recording_forward(scheduled):
        threads.append(torch.get_num_threads())
        return forward(scheduled)

    monkeypatch.setattr(engine, "_forward", recording_forward)
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    try:
        engine.step()
        reader.busy = True
        engine.step()
        reader.busy = False
        engine.step()
    finally:
        torch.set_num_threads(2)
    assert threads == [2, 1, 2]
