"""loadtests.fairness at the engine: the same keys, rates, phases and table, with no HTTP server
and no load generator process. One `LLMEngine` per scheduling policy in this process, stepped
in real time; requests are added when their Poisson arrival time has passed (between steps, as
the server's engine thread takes them), and a request's TTFT is its arrival to the end of the
step that sampled its first token. What the server and the client add (the event loop, the
streams, the load generator's own delays on the same cores) is left out, so the light key's
ratio here is the scheduler's and the steps' share of it: the queue, and the step its first
chunk is computed in. "server cores both" is this process's CPU (engine and arrivals).

    python -m loadtests.fairness_engine             # the tiny fixture model, ~5 minutes

By default the engines run torch on one thread (`--threads`): on a machine busier than its
cores, two intra-op threads waiting for each other make every step many times slower.

Then, for the throughput ratio alone, `--sliced-rounds` rounds of the time-sliced comparison
(loadtests.time_sliced): both engines, and a second fcfs one as its control, get the same
arrivals at once and step in turns of `--slice-ms` (`sliced_phase`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch

from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.sampling import SamplingParams
from loadtests.fairness import (
    POLICIES,
    Namespace,
    Phase,
    build_parser,
    interleaved_rounds,
    phase_plan,
    report,
    write_json,
)
from loadtests.time_sliced import participants, policy_of, sliced_report
from server.cli import parse_size


def poisson_arrivals(rates: dict[str, float], duration: float,
                     rng: random.Random) -> list[tuple[float, str]]:
    """(seconds from the start, key) of every request, in time order."""
    arrivals: list[tuple[float, str]] = []
    for key, rate in rates.items():
        at = rng.expovariate(rate)
        while at < duration:
            arrivals.append((at, key))
            at += rng.expovariate(rate)
    return sorted(arrivals)


def run_phase(engine: LLMEngine, name: str, rates: dict[str, float], args: Namespace,
              seed: int) -> Phase:
    phase = Phase(name, args.duration)
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rates, args.duration, rng)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    born: dict[str, tuple[str, float]] = {}  # request id -> key, arrival time
    first: set[str] = set()
    queued: list[float] = []  # the light key's arrival to first scheduled
    cpu0 = time.process_time()
    start = time.monotonic()
    end = start + args.duration
    i = 0
    while (now := time.monotonic()) < end:
        while i < len(arrivals) and start + arrivals[i][0] <= now:
            at, key = arrivals[i]
            request_id = f"{name}-{seed}-{i}"
            engine.add_request(request_id, [rng.randrange(10, 90) for _ in range(args.prompt_len)],
                               params, tenant=key)
            born[request_id] = key, start + at
            i += 1
        if not engine.has_work():
            time.sleep(min(0.001, max(0.0, end - now)))
            continue
        outputs = engine.step()
        stepped = time.monotonic()
        for out in outputs:
            phase.tokens += sum(len(delta.token_ids) for delta in out.outputs)
            if out.request_id not in first:
                first.add(out.request_id)
                key, arrived = born[out.request_id]
                phase.ttft_s[key].append(stepped - arrived)
                request = engine.requests.get(out.request_id)
                if key == "light" and request and request.first_scheduled_time is not None:
                    queued.append(request.first_scheduled_time - arrived)
    phase.server_cpu_s = time.process_time() - cpu0
    for request_id, (key, arrived) in born.items():
        if request_id not in first:  # still waiting: censored
            phase.ttft_s[key].append(end - arrived)
            phase.waiting[key] += 1
    for request_id in list(engine.requests):  # the next phase starts empty
        engine.abort(request_id)
    phase.queue_ms["light"] = 1000 * sum(queued) / len(queued) if queued else None
    return phase


def build_engines(names: Sequence[str], args: Namespace) -> dict[str, LLMEngine]:
    """An engine per name (a policy, or the sliced comparison's CONTROL), each warmed up (not
    measured); their phases are then interleaved, as loadtests.fairness does."""
    torch.set_num_threads(args.threads)
    engines = {name: LLMEngine(EngineConfig(
        model_dir=args.model_dir, device="cpu", dtype="float32",
        max_num_seqs=args.max_num_seqs, kv_cache_memory=parse_size(args.kv_cache_memory),
        scheduling_policy=policy_of(name))) for name in names}
    for engine in engines.values():  # warm-up, not measured
        if args.warmup > 0:
            run_phase(engine, "warm-up", phase_plan(args)[2][1],
                      Namespace(**{**vars(args), "duration": args.warmup}), seed=-1)
    return engines


def sliced_phase(engines: dict[str, LLMEngine], rates: dict[str, float], args: Namespace,
                 seed: int) -> dict[str, float]:
    """Every engine gets the same Poisson arrivals (`rates` over wall time) and they take turns
    of `args.slice_ms`, in order, for `args.duration` seconds; a request is added to an engine
    in its own turn, once its arrival time has passed. Returns each engine's output tokens per
    second of its own turns (a turn lasts until its last step ends)."""
    rng = random.Random(seed)
    arrivals = poisson_arrivals(rates, args.duration, rng)
    prompts = [[rng.randrange(10, 90) for _ in range(args.prompt_len)] for _ in arrivals]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    added = dict.fromkeys(engines, 0)
    tokens = dict.fromkeys(engines, 0)
    turns_s = dict.fromkeys(engines, 0.0)
    start = time.monotonic()
    end = start + args.duration
    turn = 0
    while (turn_start := time.monotonic()) < end:
        policy = list(engines)[turn % len(engines)]
        engine = engines[policy]
        turn += 1
        turn_end = min(turn_start + args.slice_ms / 1000, end)
        while (now := time.monotonic()) < turn_end:
            i = added[policy]
            while i < len(arrivals) and start + arrivals[i][0] <= now:
                engine.add_request(f"sliced-{seed}-{i}", prompts[i], params,
                                   tenant=arrivals[i][1])
                i += 1
            added[policy] = i
            if not engine.has_work():
                time.sleep(min(0.0005, max(0.0, turn_end - now)))
                continue
            tokens[policy] += sum(len(delta.token_ids)
                                  for out in engine.step() for delta in out.outputs)
        turns_s[policy] += time.monotonic() - turn_start
    for engine in engines.values():
        for request_id in list(engine.requests):
            engine.abort(request_id)
    return {policy: tokens[policy] / turns_s[policy] for policy in engines}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser("python -m loadtests.fairness_engine", __doc__).parse_args(argv)
    policies = POLICIES if args.scheduling_policy == "both" else (args.scheduling_policy,)
    sliced = args.sliced_rounds > 0 and len(policies) > 1
    engines = build_engines(participants(policies, args) if sliced else policies, args)
    results = interleaved_rounds(
        policies, args, lambda policy, name, rates, seed: run_phase(engines[policy], name, rates,
                                                                    args, seed))
    if args.rounds > 0:
        print(report(results, args))
    if sliced:
        print(sliced_report(lambda order, rates, seed: sliced_phase(
            {name: engines[name] for name in order}, rates, args, seed), list(engines), args))
    if args.json:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
