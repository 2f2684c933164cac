"""loadtests.load_stall on a tiny model: the batch keeps decoding while adapters load, every
load finishes, and the figures it prints are the ones it measured."""

import statistics
from pathlib import Path

import pytest

from benchmarks.random_model import SMOLLM2_135M
from loadtests.load_stall import StallConfig, report, run

TINY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
        "max_position_embeddings": 4096}


@pytest.mark.slow
def test_load_stall_on_a_tiny_model(tmp_path: Path) -> None:
    config = StallConfig(work_dir=tmp_path, loads=6, batch=2, resident=2, quiet_steps=5,
                         model_config=TINY, rank=4, num_experts=2,
                         static_cache_dir=tmp_path / "static")
    result = run(config)
    assert len(result.quiet) == 5 and result.loading  # it stepped while loads were in flight
    assert min(result.quiet + result.loading) > 0
    assert result.stall == max(result.loading) - statistics.median(result.quiet)
    assert result.loads_per_s > 0
    assert result.load.count == result.servable.count == 5
    assert 0 < result.load.percentiles["p50"] <= result.load.max
    assert 0 < result.servable.percentiles["p50"] <= result.servable.max
    text = report(config, result)
    assert f"longest stall: {result.stall * 1e3:.1f} ms" in text
    assert f"steps during loads ({len(result.loading)})" in text
