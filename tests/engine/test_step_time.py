"""The engine reports the wall time of each step that ran sequences (EngineListener.on_step_time),
the figure the churn benchmark reads a step stall from: it covers the forward pass, and steps
that ran nothing (waiting for an adapter load) are not counted."""

import time
from pathlib import Path

import pytest

from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.outputs import EngineListener
from goat_runtime.engine.sampling import SamplingParams
from tests.adapters.adapted_model import FIXTURE
from tests.engine.test_engine import REFERENCE, run


class StepTimes(EngineListener):
    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.seconds: list[float] = []

    def on_step(self, num_seqs: int, num_tokens: int, adapters: list[str]) -> None:
        self.seqs.append(num_seqs)

    def on_step_time(self, seconds: float) -> None:
        self.seconds.append(seconds)


def test_each_step_that_ran_sequences_reports_its_time(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    listener = StepTimes()
    engine = LLMEngine(EngineConfig(
        model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters",
        static_cache_dir=tmp_path / "static", block_size=4, device="cpu", dtype="float32"),
        listener)
    forward = engine._forward

    def slow_forward(scheduled):  # a stall the step time must include
        time.sleep(0.03)
        return forward(scheduled)

    monkeypatch.setattr(engine, "_forward", slow_forward)
    engine.step()  # nothing to run
    assert listener.seqs == [0] and listener.seconds == []
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    prompt = REFERENCE["input_0"].tolist()
    run(engine, [("a", prompt, params, "goat0"), ("b", prompt, params, None)])
    ran = [n for n in listener.seqs if n > 0]  # steps that waited for goat0's load are not
    assert len(ran) >= 3 and len(listener.seconds) == len(ran)
    assert all(0.03 <= s < 10 for s in listener.seconds)
