"""loadtests.fairness_engine's time-sliced comparison: both engines get the same arrivals and
step only in their own turns, which alternate."""

import itertools
from typing import Any

import pytest

from goat_runtime.engine.engine import LLMEngine
from loadtests.fairness import POLICIES, build_parser
from loadtests.fairness_engine import build_engines, sliced_phase


def args(*extra: str) -> Any:
    return build_parser("fairness_engine", None).parse_args(
        ["--warmup", "0", "--output-len", "8", *extra])


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
