"""loadtests.fairness_engine's time-sliced comparison: both engines get the same arrivals and
step only in their own turns, which alternate; its report gives fair / fcfs per round and the
median, one key and two."""

import itertools
from typing import Any

import pytest

from goat_runtime.engine.engine import LLMEngine
from loadtests import fairness_engine
from loadtests.fairness import POLICIES
from loadtests.fairness_engine import (
    build_engine_parser,
    build_engines,
    sliced_phase,
    sliced_report,
)


def args(*extra: str) -> Any:
    return build_engine_parser().parse_args(["--warmup", "0", "--output-len", "8", *extra])


def test_sliced_engines_take_turns_on_the_same_arrivals(monkeypatch: pytest.MonkeyPatch) -> None:
    engines = build_engines(POLICIES, args())
    added: dict[str, list[str]] = {policy: [] for policy in engines}
    steps: list[str] = []
    for policy, engine in engines.items():
        add, step = engine.add_request, engine.step

        def add_request(request_id: str, *a: Any, policy: str = policy, add: Any = add,
                        **k: Any) -> None:
            added[policy].append(request_id)
            add(request_id, *a, **k)

        def counted_step(policy: str = policy, step: Any = step) -> Any:
            steps.append(policy)
            return step()

        monkeypatch.setattr(engine, "add_request", add_request)
        monkeypatch.setattr(engine, "step", counted_step)
    served = sliced_phase(engines, {"light": 10, "heavy": 100},
                          args("--duration", "1.0", "--slice-ms", "100"), seed=1)
    assert set(served) == set(POLICIES) and all(v > 0 for v in served.values())
    # The same requests in the same order: the engine whose turn came last may have more.
    short, long = sorted(added.values(), key=len)
    assert short and long[: len(short)] == short
    # Turns alternate: runs of one engine's steps, several of each.
    turns = [policy for policy, _ in itertools.groupby(steps)]
    assert len(turns) >= 6 and all(a != b for a, b in itertools.pairwise(turns))
    for engine in engines.values():  # every request aborted at the end
        assert isinstance(engine, LLMEngine) and not engine.requests


def test_sliced_report_gives_each_round_and_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    served = iter([{"fcfs": 100.0, "fair": 99.0}, {"fcfs": 100.0, "fair": 90.0},
                   {"fcfs": 200.0, "fair": 202.0}, {"fcfs": 100.0, "fair": 96.0},
                   {"fcfs": 100.0, "fair": 100.0}, {"fcfs": 50.0, "fair": 47.0}])
    rates: list[dict[str, float]] = []

    def fake_phase(engines: Any, phase_rates: dict[str, float], a: Any, seed: int) -> Any:
        rates.append(phase_rates)
        return next(served)

    monkeypatch.setattr(fairness_engine, "sliced_phase", fake_phase)
    text = sliced_report(dict.fromkeys(POLICIES), args("--light-rate", "12"))
    assert "one key: per round 0.990, 1.010, 1.000; median 1.000" in text
    assert "two keys: per round 0.900, 0.960, 0.940; median 0.940" in text
    # Each engine steps half the time: the rates over wall time are halved.
    assert rates[:2] == [{"heavy": 60.0}, {"light": 6.0, "heavy": 60.0}]
