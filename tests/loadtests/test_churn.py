"""The churn benchmark's readings of /metrics: histogram deltas, quantiles, the top bucket, the
median of per-round ratios, and sequences per step."""

import math

import pytest

from loadtests.churn_metrics import (
    histogram_delta,
    histogram_mean,
    median_ratio,
    pooled,
    quantile,
    seqs_per_step,
    top_bucket,
)

INF = math.inf


def scrape(counts: dict[str, float]) -> dict[str, float]:
    """Cumulative bucket samples as loadtests.common.scrape keys them."""
    return {f'h_bucket{{le="{le}"}}': n for le, n in counts.items()}


def test_histogram_delta_is_per_bucket_between_scrapes():
    before = scrape({"0.1": 1, "0.5": 3, "+Inf": 3}) | {"other": 9.0}
    after = scrape({"0.1": 2, "0.5": 7, "+Inf": 8})
    assert histogram_delta(before, after, "h") == [(0.1, 1), (0.5, 3), (INF, 1)]
    assert histogram_delta({}, after, "h") == [(0.1, 2), (0.5, 5), (INF, 1)]


def test_quantile_interpolates_within_the_bucket():
    buckets = [(0.1, 2.0), (0.5, 2.0), (INF, 0.0)]
    assert quantile(buckets, 0.5) == pytest.approx(0.1)
    assert quantile(buckets, 0.75) == pytest.approx(0.3)
    assert quantile([(1.0, 0.0), (INF, 3.0)], 0.5) == 1.0  # in +Inf: the top finite bound
    assert quantile([(1.0, 0.0)], 0.5) is None


def test_top_bucket_bounds_the_maximum():
    assert top_bucket([(0.1, 5.0), (0.2, 0.0), (0.4, 1.0), (0.8, 0.0), (INF, 0.0)]) == (0.2, 0.4)
    assert top_bucket([(0.1, 0.0)]) is None


def test_pooled_adds_bucket_by_bucket():
    assert pooled([[(0.1, 1.0), (INF, 2.0)], [(0.1, 3.0), (INF, 0.0)]]) == [(0.1, 4.0),
                                                                           (INF, 2.0)]


def test_median_of_per_round_ratios():
    median, ratios = median_ratio([(90.0, 100.0), (50.0, 50.0), (30.0, 60.0)])
    assert ratios == [0.9, 1.0, 0.5] and median == 0.9


def test_seqs_per_step_between_two_scrapes():
    before = {"goat_batch_size_count": 10.0, "goat_batch_size_sum": 50.0}
    after = {"goat_batch_size_count": 30.0, "goat_batch_size_sum": 290.0}
    assert seqs_per_step(before, after) == 12.0
    assert seqs_per_step(after, after) == 0.0  # no step in between
    assert histogram_mean(before, after, "goat_batch_adapters") == 0.0  # not in the scrapes
    after["goat_batch_adapters_count"], after["goat_batch_adapters_sum"] = 4.0, 10.0
    assert histogram_mean({}, after, "goat_batch_adapters") == 2.5


def test_the_preloaded_case_loads_what_the_churn_load_uses():
    """(loadgen draws the same requests from one seed for both cases.)"""
    from loadtests.churn import ChurnConfig, load_config, used_adapters
    from loadtests.loadgen import _Run

    config = ChurnConfig(num_requests=40)
    load = load_config(config, "http://127.0.0.1:1", [f"churn-{i}" for i in range(500)])
    drawn = _Run(load, None).workload  # type: ignore[arg-type]
    want = sorted({drawn.next_spec().adapter for _ in range(config.num_requests)})
    assert used_adapters(load) == want
    assert 10 < len(want) < 40  # Zipf: popular ones repeat


def test_measure_loads_times_every_load_of_every_round():
    import pytest

    from goat_runtime.adapters.binding import base_linears
    from goat_runtime.adapters.format import AdapterError
    from goat_runtime.adapters.reader import AdapterReader
    from loadtests.churn import measure_loads
    from tests.engine.test_adapter_memory import FIXTURE

    folder, linears = FIXTURE / "adapters", base_linears(FIXTURE / "base")
    stats = measure_loads(folder, ["goat0", "lora0"], linears, rounds=2)
    assert stats.count == 4 and 0 < stats.percentiles["p50"] <= stats.max
    reader = AdapterReader()
    try:
        stats = measure_loads(folder, ["goat0", "lora0"], linears, rounds=1, reader=reader)
    finally:
        reader.shutdown()
    assert stats.count == 2 and 0 < stats.percentiles["p50"] <= stats.max
    with pytest.raises(AdapterError):  # the loads are the real, checking ones
        measure_loads(folder, ["goat0"], [], rounds=1)
