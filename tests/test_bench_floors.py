"""The benchmarks' arithmetic (benchmarks/floors.py): bytes a decode step reads, floors, and the
median of per-round ratios. Fast, no timing asserts: the figures are checked against the sizes
of the real tensors of the tiny fixture engine."""

import pytest
import torch

from benchmarks.floors import (
    StepBytes,
    adapter_bytes,
    base_weight_bytes,
    decode_floor_tok_s,
    format_ratio,
    measure_bandwidth,
    median_of_ratios,
    step_bytes,
)
from goat_runtime.model.kv_cache import block_bytes
from tests.engine.test_engine import make_engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return make_engine(tmp_path_factory.mktemp("floors"), max_loras=4)  # merged by default


def test_base_weight_bytes_are_every_projection_and_the_lm_head(engine):
    config = engine.model.config
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * i + i * h  # qkv, o, gate_up, down
    expected = 4 * (layers * per_layer + config.vocab_size * h)  # fp32
    assert base_weight_bytes(engine.model.fused_linears(), engine.model.lm_head) == expected


def test_kv_bytes_per_token_match_the_cache(engine):
    """What the floor charges per context token is what the attached cache holds per token."""
    per_token = block_bytes(engine.model.config, 1, torch.float32)
    held = 0
    for layer in engine.model.layers:
        attn = layer.self_attn.attn
        held += sum(t.numel() * t.element_size() for t in (attn.k_cache, attn.v_cache))
    assert held == per_token * engine.num_blocks * engine.block_size


def test_adapter_bytes_count_rows_router_and_static_term(engine):
    manager = engine.adapters
    manager.request_load("goat0").result()
    manager.request_load("lora0").result()
    goat, lora, base = manager.get("goat0"), manager.get("lora0"), manager.get(None)
    rows = sum(a.lora_a.numel() + a.lora_b.numel() + a.router.numel()
               for a in goat.adapter.layers.values())
    static = sum(c.numel() + dd.numel() for c, dd in goat.terms.values())
    assert adapter_bytes(goat.adapter.layers, goat.terms, 4) == 4 * (rows + static)
    assert goat.terms == {}  # merged by default: the shared signature reads no static rows
    lora_rows = sum(a.lora_a.numel() + a.lora_b.numel() for a in lora.adapter.layers.values())
    undo = sum(c.numel() + dd.numel() for c, dd in lora.terms.values())
    assert undo > 0  # a LoRA adapter on a merged server carries the undo term
    assert adapter_bytes(lora.adapter.layers, lora.terms, 4) == 4 * (lora_rows + undo)
    assert base is not None and adapter_bytes({}, base.terms, 2) == 2 * undo


def test_step_bytes_and_floor():
    step = step_bytes(1000, [10, 20, 30], context_tokens=7, kv_bytes_per_token=100)
    assert step == StepBytes(weights=1000, adapters=60, kv=700)
    assert step.total == 1760
    assert step.seconds(880.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        step.seconds(0.0)


def test_median_of_ratios_is_per_round():
    rounds = [{"a": 90.0, "b": 100.0}, {"a": 60.0, "b": 50.0}, {"a": 70.0, "b": 100.0},
              {"a": 1.0}]  # the last round lacks b: skipped
    median, ratios = median_of_ratios(rounds, "a", "b")
    assert ratios == pytest.approx([0.9, 1.2, 0.7])
    assert median == pytest.approx(0.9)  # not 220 / 250 = 0.88, the ratio of the sums
    assert format_ratio(median, ratios) == "0.900x (0.900, 1.200, 0.700)"
    with pytest.raises(ValueError, match="no round"):
        median_of_ratios(rounds, "a", "c")


def test_measure_bandwidth_counts_read_and_write(monkeypatch):
    ticks = iter([0.0, 0.5] * 3)  # every copy takes 0.5 s
    monkeypatch.setattr("benchmarks.floors.time.perf_counter", lambda: next(ticks))
    assert measure_bandwidth(buffer_bytes=1 << 20, repeats=3) == pytest.approx(2 * (1 << 20) / 0.5)


def test_decode_floor_sums_the_growing_kv_reads():
    # 2 sequences, prompt 3, output 4: steps t = 1, 2, 3 read contexts 2 x (4, 5, 6) = 30.
    tok_s = decode_floor_tok_s(100, 10, sequences=2, prompt=3, output=4, bandwidth=1000.0)
    assert tok_s == pytest.approx(2 * 3 * 1000.0 / (3 * 100 + 30 * 10))
    with pytest.raises(ValueError):
        decode_floor_tok_s(100, 10, sequences=2, prompt=3, output=1, bandwidth=1.0)


def test_each_http_run_is_beside_its_in_process_twin_in_alternating_order():
    from benchmarks.bench_engine import HTTP, round_order

    cases = {f"{kind} ({engine})": (engine, adapters) for engine in ("default", "unmerged")
             for kind, adapters in (("base", [None]), ("16 GOAT", ["g0", "g1"]))}
    first, second = round_order(cases, True, 0), round_order(cases, True, 1)
    assert [label for label, _, _ in first] == [
        "base (default)", "base (HTTP)", "16 GOAT (default)", "16 GOAT (HTTP)",
        "base (unmerged)", "16 GOAT (unmerged)"]
    assert [label for label, _, _ in second] == [
        "base (HTTP)", "base (default)", "16 GOAT (HTTP)", "16 GOAT (default)",
        "base (unmerged)", "16 GOAT (unmerged)"]
    assert ("16 GOAT (HTTP)", HTTP, ["g0", "g1"]) in first
    assert [where for _, where, _ in round_order(cases, False, 1)] == [
        "default", "default", "unmerged", "unmerged"]
