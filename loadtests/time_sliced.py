"""A throughput comparison that this machine's drift cannot hide, for loadtests.fairness and
loadtests.fairness_engine: both schedulers get the same arrivals at once and take turns of a
few tens of milliseconds, each served only in its own turns. Phases run one after the other
moved by 10-20 % between phases seconds apart (one key, the same code on both: docs/benchmarks.md
section 8), which hides a 5 % difference; a drift over more than a turn falls on both alike.

`sliced_report` runs the rounds and prints the ratios, given how to run one sliced phase (an
engine per policy stepped in turns in process, or a server per policy stopped and continued in
turns, `take_turns`). With `--sliced-control` (the default) a second fcfs server or engine,
CONTROL, takes turns too: its ratio to the first, the same code on the same arrivals, is the
comparison's own noise, printed beside fair / fcfs.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import time
from collections.abc import Callable, Sequence

# run_sliced(policies in turn order, each key's requests/s, seed) -> each policy's output
# tokens per second of its own turns.
RunSliced = Callable[[list[str], dict[str, float], int], dict[str, float]]
CONTROL = "control"  # a second fcfs server or engine: the comparison's A/A control


def participants(policies: Sequence[str], args: argparse.Namespace) -> list[str]:
    """Who takes turns: the policies, and CONTROL with `--sliced-control`."""
    return [*policies, CONTROL] if args.sliced_control else list(policies)


def policy_of(name: str) -> str:
    """The scheduling policy a participant runs (CONTROL: fcfs)."""
    return "fcfs" if name == CONTROL else name


def add_sliced_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sliced-rounds", type=int, default=3,
                        help="rounds of the time-sliced throughput comparison (0: none)")
    parser.add_argument("--slice-ms", type=float, default=50.0,
                        help="each policy's turn in the time-sliced comparison")
    parser.add_argument("--sliced-control", action=argparse.BooleanOptionalAction, default=True,
                        help="a second fcfs server (engine) in the turns: control / fcfs is "
                        "the comparison's own noise")


def sliced_report(run_sliced: RunSliced, names: Sequence[str],
                  args: argparse.Namespace) -> str:
    """`args.sliced_rounds` rounds, one key then two, with the rates divided by the number of
    participants `names` (fcfs, fair and maybe CONTROL: each is served that share of the
    time, so per second of its own turns it still gets the phase's rates): fair / fcfs (and
    control / fcfs) per round and the median."""
    share = len(names)
    heavy = args.light_rate * args.ratio / share
    plans = (("one key", {"heavy": heavy}), ("two keys", {"light": args.light_rate / share,
                                                          "heavy": heavy}))
    compared = [name for name in names if name != "fcfs"]
    ratios: dict[tuple[str, str], list[float]] = {
        (name, label): [] for name in compared for label, _ in plans}
    lines = []
    for r in range(args.sliced_rounds):
        # Who takes the first turn rotates between rounds: with two, the first of each pair
        # of turns served about 2 % less in every round of a run that never swapped.
        order = list(names[r % share:]) + list(names[:r % share])
        for label, rates in plans:
            served = run_sliced(order, rates, 10_000 + r)
            for name in compared:
                ratios[name, label].append(served[name] / served["fcfs"])
            lines.append(f"time-sliced round {r}, {label}: tok/s of its own turns " + ", ".join(
                f"{name} {served[name]:,.0f}" for name in names))
    for (name, label), values in ratios.items():
        what = "control (fcfs again)" if name == CONTROL else name
        lines.append(f"time-sliced throughput {what} / fcfs, {label}: per round "
                     f"{', '.join(f'{x:.3f}' for x in values)}; median "
                     f"{statistics.median(values):.3f}")
    lines.append(f"time-sliced: turns of {args.slice_ms:g} ms over {args.duration:g} s, "
                 f"rates per second of a policy's own turns: light {args.light_rate:g}, "
                 f"heavy {args.light_rate * args.ratio:g}")
    return "\n".join(lines)


def take_turns(groups: dict[str, int], start_at: float, duration_s: float,
               slice_s: float) -> dict[str, float]:
    """From wall-clock `start_at` for `duration_s`, lets one process group of `groups` (name ->
    process group id) run at a time, in turns of `slice_s` in the given order: the others are
    stopped (SIGSTOP) and continued (SIGCONT) in their turn. All run again afterwards. Returns
    each group's seconds of turns."""
    names = list(groups)
    turns = dict.fromkeys(names, 0.0)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        end = time.monotonic() + duration_s
        for name in names[1:]:
            os.killpg(groups[name], signal.SIGSTOP)
        turn = 0
        while (begun := time.monotonic()) < end:
            name = names[turn % len(names)]
            if turn:  # the previous one stops before this one goes on: never two at once
                os.killpg(groups[names[(turn - 1) % len(names)]], signal.SIGSTOP)
                os.killpg(groups[name], signal.SIGCONT)
            time.sleep(min(slice_s, end - begun))
            turns[name] += time.monotonic() - begun
            turn += 1
    finally:
        for group in groups.values():
            os.killpg(group, signal.SIGCONT)
    return turns
