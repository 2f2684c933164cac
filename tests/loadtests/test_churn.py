"""The churn benchmark's slot bound: an ideal engine's sequences per step under its closed loop."""

from loadtests.churn_metrics import seqs_per_step, slot_bound


def test_enough_slots_run_every_client():
    assert slot_bound(16, 16, 32, 1.0, 10, num_requests=500) == 32.0
    assert slot_bound(1, 1, 8, 1.0, 10, num_requests=500) == 8.0


def test_one_slot_over_many_uniform_adapters_runs_about_one():
    bound = slot_bound(1000, 1, 4, 0.0, 10, num_requests=500)
    assert 1.0 <= bound < 1.1


def test_more_slots_run_more():
    bounds = [slot_bound(200, n, 32, 1.0, 20, num_requests=3000) for n in (4, 8, 16, 32)]
    assert bounds == sorted(bounds)
    assert bounds[0] < bounds[-1] <= 32.0


def test_seqs_per_step_between_two_scrapes():
    before = {"goat_batch_size_count": 10.0, "goat_batch_size_sum": 50.0}
    after = {"goat_batch_size_count": 30.0, "goat_batch_size_sum": 290.0}
    assert seqs_per_step(before, after) == 12.0
    assert seqs_per_step(after, after) == 0.0  # no step in between



def test_measure_loads_times_every_load_of_every_round():
    import pytest

    from goat_runtime.adapters.format import AdapterError
    from loadtests.churn import measure_loads
    from tests.engine.test_adapter_memory import FIXTURE, base_shapes

    folder = FIXTURE / "adapters"
    stats = measure_loads(folder, ["goat0", "lora0"], base_shapes(), rounds=2)
    assert stats.count == 4 and 0 < stats.percentiles["p50"] <= stats.max
    with pytest.raises(AdapterError):  # the loads are the real, checking ones
        measure_loads(folder, ["goat0"], {}, rounds=1)
