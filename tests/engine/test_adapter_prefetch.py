"""Adapters of queued requests load ahead of their turn: a request that cannot run yet (the
sequence cap is full) has its adapter on the host before the running one finishes."""

from pathlib import Path

import pytest

from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.sampling import SamplingParams
from tests.adapters.adapted_model import FIXTURE
from tests.engine.test_engine import REFERENCE


@pytest.mark.slow
def test_queued_requests_adapter_loads_while_another_runs(tmp_path: Path) -> None:
    engine = LLMEngine(EngineConfig(
        model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters",
        static_cache_dir=tmp_path / "static", block_size=4, max_num_seqs=1, device="cpu",
        dtype="float32"))
    prompt = REFERENCE["input_0"].tolist()
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request("running", prompt, long, None)  # the base: nothing to load
    engine.add_request("queued", prompt, SamplingParams(max_tokens=2, temperature=0.0), "goat1")
    engine.step()
    # the step asked for the queued request's adapter (not this test: it only waits for it)
    assert engine.adapters.status("goat1") in ("loading", "ready")
    engine.adapters.request_load("goat1").result()
    running = {s.request.request_id for s in engine.scheduler.running}
    assert running == {"running"}  # its turn has not come
    assert engine.adapters.is_loaded("goat1")
