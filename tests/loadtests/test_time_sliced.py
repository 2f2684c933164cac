"""loadtests.time_sliced: the report's ratios per round and median with the rates shared and the
first turn rotating (with and without the control); and process groups that really run one at
a time in their turns."""

import itertools
import subprocess
import sys
import time
from pathlib import Path

from loadtests.fairness import POLICIES, build_parser
from loadtests.time_sliced import CONTROL, participants, policy_of, sliced_report, take_turns

# Prints time.time() every millisecond: when it ran.
TICKER = "import time\nwhile True:\n    print(time.time(), flush=True)\n    time.sleep(0.001)"


def test_the_report_gives_each_round_and_the_median() -> None:
    served = iter([{"fcfs": 100.0, "fair": 99.0}, {"fcfs": 100.0, "fair": 90.0},
                   {"fcfs": 200.0, "fair": 202.0}, {"fcfs": 100.0, "fair": 96.0},
                   {"fcfs": 100.0, "fair": 100.0}, {"fcfs": 50.0, "fair": 47.0}])
    calls: list[tuple[list[str], dict[str, float], int]] = []

    def run_sliced(order: list[str], rates: dict[str, float], seed: int) -> dict[str, float]:
        calls.append((order, rates, seed))
        return next(served)

    args = build_parser("fairness", None).parse_args(["--light-rate", "12",
                                                      "--no-sliced-control"])
    assert participants(POLICIES, args) == list(POLICIES)
    text = sliced_report(run_sliced, POLICIES, args)
    assert "one key: per round 0.990, 1.010, 1.000; median 1.000" in text
    assert "two keys: per round 0.900, 0.960, 0.940; median 0.940" in text
    assert "time-sliced round 1, one key: tok/s of its own turns fcfs 200, fair 202" in text
    # Each policy is served half the time: the rates over wall time are halved.
    assert [rates for _, rates, _ in calls[:2]] == [{"heavy": 60.0}, {"light": 6.0, "heavy": 60.0}]
    # The first turn alternates between rounds; both plans of a round share its seed.
    assert [(order, seed) for order, _, seed in calls[::2]] == [
        (["fcfs", "fair"], 10_000), (["fair", "fcfs"], 10_001), (["fcfs", "fair"], 10_002)]
    assert [seed for _, _, seed in calls[1::2]] == [10_000, 10_001, 10_002]
    assert "control" not in text


def test_the_control_takes_turns_as_a_second_fcfs_and_its_ratio_is_printed() -> None:
    """By default a second fcfs (CONTROL) takes turns too: the rates are shared three ways,
    the first turn rotates through all three, and control / fcfs is printed beside fair /
    fcfs."""
    args = build_parser("fairness", None).parse_args(["--light-rate", "12", "--sliced-rounds",
                                                      "3"])
    names = participants(POLICIES, args)
    assert names == ["fcfs", "fair", CONTROL] and policy_of(CONTROL) == "fcfs"
    assert [policy_of(name) for name in POLICIES] == list(POLICIES)
    calls: list[tuple[list[str], dict[str, float]]] = []

    def run_sliced(order: list[str], rates: dict[str, float], seed: int) -> dict[str, float]:
        calls.append((order, rates))
        return {"fcfs": 100.0, "fair": 95.0, CONTROL: 98.0 + seed - 10_000}

    text = sliced_report(run_sliced, names, args)
    assert [rates for _, rates in calls[:2]] == [{"heavy": 40.0}, {"light": 4.0, "heavy": 40.0}]
    assert [order for order, _ in calls[::2]] == [
        ["fcfs", "fair", CONTROL], ["fair", CONTROL, "fcfs"], [CONTROL, "fcfs", "fair"]]
    assert "two keys: per round 0.950, 0.950, 0.950; median 0.950" in text
    assert ("control (fcfs again) / fcfs, two keys: per round 0.980, 0.990, 1.000; "
            "median 0.990") in text
    assert "tok/s of its own turns fcfs 100, fair 95, control 99" in text


def test_process_groups_run_one_at_a_time_in_their_turns(tmp_path: Path) -> None:
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    with logs["a"].open("w") as out_a, logs["b"].open("w") as out_b:
        procs = {name: subprocess.Popen([sys.executable, "-c", TICKER], stdout=out,
                                        start_new_session=True)
                 for name, out in (("a", out_a), ("b", out_b))}
    try:
        time.sleep(1.0)  # both started
        start = time.time() + 0.2
        turns = take_turns({name: p.pid for name, p in procs.items()}, start, 1.2, 0.1)
        time.sleep(0.5)  # both run again afterwards
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    assert set(turns) == {"a", "b"} and min(turns.values()) > 0.3
    assert 1.19 < sum(turns.values()) < 1.7  # a sleep may overrun on a busy machine
    ticks = sorted((float(t), name) for name, path in logs.items()
                   for t in path.read_text().split())
    assert {name for t, name in ticks if t > start + 1.2} == {"a", "b"}
    # Within the turns (from a little after their start, which a busy machine may delay) one
    # process ticks at a time: about ten runs of ticks (fewer if one got no CPU for a whole
    # turn), where both running at once would interleave their ticks every millisecond.
    window = [name for t, name in ticks if start + 0.15 <= t < start + 1.15]
    runs = [name for name, _ in itertools.groupby(window)]
    assert 3 <= len(runs) <= 16, runs
