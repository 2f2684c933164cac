"""The fair share between API keys under overload (issue 20): two keys, a heavy one sending
`--ratio` times the light one's requests, beyond the server's capacity.

For each scheduling policy (`--scheduling-policy fcfs` and `fair`, one server each, both
started at once, the same flags otherwise, each warmed up with both keys for `--warmup`
seconds), three open-loop phases of `--duration` seconds: the light key alone, the heavy key
alone (one key: the policies must not differ), both at once. Each round runs every phase on
both servers back to back, with the same arrivals (`interleaved_rounds`).
Printed: the light key's TTFT p50 alone and beside the heavy key (and their ratio), the light
key's mean queue time beside it as the server measures it (`/metrics`, read with a third, admin
key: the scheduler's share of the TTFT), the tokens streamed per second in each phase, the
engine's steps beside the heavy key (per second, sequences per step, mean step time: which of
them moved the throughput, also from /metrics), the CPU the server and the load generator used
beside the heavy key (cores: CPU seconds per second; the load generator shares the machine's
cores with the server) with how late each key's client woke from 10 ms sleeps (p50/max: when
it cannot keep up with its streams, its lag is in every TTFT it measures), and how busy other
jobs kept the CPUs just before each round. Summary lines: per policy the median of the per-round
light ratios, and the fair / fcfs throughput ratio of each round and its median. A request
still waiting for its first token when a phase ends counts with the time it has waited (a lower
bound), so a queue that never drains shows as such.
Then, for the throughput ratio alone, `--sliced-rounds` rounds of the time-sliced comparison
(loadtests.time_sliced): both servers, and a second fcfs server as its control
(`--sliced-control`), get the same arrivals at once, each key's from a client per server, and
run in turns of `--slice-ms`, the others stopped (SIGSTOP) meanwhile.
Requests are token ids (random, so the prefix cache never helps) with `ignore_eos`. Each key's
requests come from a client process of its own (loadtests.key_clients), as each customer's come
from theirs, on uvloop, as the server runs, to take less of the cores it shares with it.
The servers run torch on `--threads` threads (1 by default, as loadtests.fairness_engine): with
two, each spent 0.6 cores more spinning for no more throughput, and two identical phases back
to back differed by up to 2x (docs/benchmarks.md section 8).

    python -m loadtests.fairness                    # the tiny fixture model, ~9 minutes
    python -m loadtests.fairness --model-dir DIR    # another base model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loadtests.common import (
    REPO,
    ServerProcess,
    add_max_busy_arg,
    cpu_busy,
    format_table,
    free_port,
    load_avg,
    wait_for_quiet,
)
from loadtests.key_clients import START_LEAD_S, KeyClients, KeyJob
from loadtests.time_sliced import (
    add_sliced_args,
    participants,
    policy_of,
    sliced_report,
    take_turns,
)

FIXTURE = REPO / "tests" / "fixtures" / "goat-peft-tiny" / "base"
SECRETS = {"light": "light-secret", "heavy": "heavy-secret"}
OPS_SECRET = "ops-secret"  # an admin key that sends nothing: it reads /metrics
POLICIES = ("fcfs", "fair")


@dataclass
class Phase:
    """One open-loop phase: per key, TTFTs (censored at the end) and tokens streamed."""

    name: str
    duration_s: float
    ttft_s: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SECRETS})
    waiting: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SECRETS, 0))
    tokens: int = 0
    errors: int = 0
    # The server's own mean queue time (arrival to first scheduled) of the key's requests that
    # finished in the phase, from /metrics: the scheduler's share of the TTFT.
    queue_ms: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(SECRETS))
    client_cpu_s: float | None = None  # the key clients' CPU time during the phase, summed
    # Per key, how late its client's event loop woke from 10 ms sleeps (s): a delay every TTFT
    # that client measures has.
    client_lag_s: dict[str, list[float]] = field(default_factory=dict)
    server_cpu_s: float = 0.0  # the server's
    # The engine's steps that ran sequences (/metrics): how many, their summed wall time and
    # summed sequences. Throughput is steps/s x sequences/step: which of the two fell.
    steps: int = 0
    step_s: float = 0.0
    step_seqs: int = 0

    def p50_ms(self, key: str) -> float | None:
        values = self.ttft_s[key]
        return statistics.median(values) * 1000 if values else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.duration_s

    def step_figures(self) -> tuple[float, float | None, float | None]:
        """(steps per second, mean sequences per step, mean step ms)."""
        if not self.steps:
            return 0.0, None, None
        return (self.steps / self.duration_s, self.step_seqs / self.steps,
                1000 * self.step_s / self.steps)


def server_samples(url: str) -> dict[tuple[str, str], float]:
    """The server's /metrics samples that this benchmark reads, by (name, key label): per key
    the sum and count of goat_key_queue_time_seconds, and (key "") the engine's steps: the
    count and sum of goat_step_seconds and the sum of goat_batch_size."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {OPS_SECRET}"},
                     timeout=30).text
    wanted = {"goat_key_queue_time_seconds_sum", "goat_key_queue_time_seconds_count",
              "goat_step_seconds_count", "goat_step_seconds_sum", "goat_batch_size_sum"}
    return {(sample.name, sample.labels.get("key", "")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name in wanted}


def run_phase(server: ServerProcess, model: str, name: str, rates: dict[str, float],
              args: Namespace, seed: int, clients: KeyClients) -> Phase:
    """One phase on `server`, each key's requests sent by its own client process."""
    phase = Phase(name, args.duration)
    before = server_samples(server.url)
    server_cpu0 = server.cpu_seconds()
    start_at = time.time() + START_LEAD_S
    loads = clients.run({key: KeyJob(server.url, model, key, SECRETS[key], rate, args.prompt_len,
                                     args.output_len, args.duration, seed, start_at)
                         for key, rate in rates.items() if rate > 0})
    phase.server_cpu_s = server.cpu_seconds() - server_cpu0
    phase.client_cpu_s = sum(load.cpu_s for load in loads.values())
    for key, load in loads.items():
        phase.ttft_s[key], phase.waiting[key] = load.ttft_s, load.waiting
        phase.client_lag_s[key] = load.lag_s
        phase.tokens += load.tokens
        phase.errors += load.errors
    time.sleep(2.0)  # let the server finish aborting before the next phase
    after = server_samples(server.url)

    def delta(name: str, key: str = "") -> float:
        return after.get((name, key), 0.0) - before.get((name, key), 0.0)

    for key in SECRETS:
        count = delta("goat_key_queue_time_seconds_count", key)
        if count:
            phase.queue_ms[key] = 1000 * delta("goat_key_queue_time_seconds_sum", key) / count
    # Includes the aborts' last steps in the 2 s above: a few steps among thousands.
    phase.steps = int(delta("goat_step_seconds_count"))
    phase.step_s = delta("goat_step_seconds_sum")
    phase.step_seqs = int(delta("goat_batch_size_sum"))
    return phase


def sliced_phase(servers: dict[str, ServerProcess], models: dict[str, str],
                 rates: dict[str, float], args: Namespace, seed: int,
                 clients: KeyClients) -> dict[str, float]:
    """Both servers get the same arrivals at once, from a client per key and server, and run
    in turns of `args.slice_ms` in the order of `servers` (the others stopped: take_turns).
    Returns each server's tokens streamed per second of its own turns."""
    start_at = time.time() + START_LEAD_S
    jobs = {f"{key}@{policy}": KeyJob(server.url, models[policy], key, SECRETS[key], rate,
                                      args.prompt_len, args.output_len, args.duration, seed,
                                      start_at)
            for policy, server in servers.items() for key, rate in rates.items()}
    groups = {policy: server.process_group() for policy, server in servers.items()}
    with ThreadPoolExecutor(1) as pool:
        turns = pool.submit(take_turns, groups, start_at, args.duration, args.slice_ms / 1000)
        loads = clients.run(jobs)
        turn_s = turns.result()
    time.sleep(2.0)  # let the servers finish aborting before the next phase
    return {policy: sum(loads[f"{key}@{policy}"].tokens for key in rates) / turn_s[policy]
            for policy in servers}


def key_file(folder: Path) -> Path:
    path = folder / "keys.yaml"
    entries = [f"  - id: {key}\n    sha256: {hashlib.sha256(s.encode()).hexdigest()}\n"
               "    models: ['*']\n" for key, s in SECRETS.items()]
    entries.append(f"  - id: ops\n    sha256: {hashlib.sha256(OPS_SECRET.encode()).hexdigest()}"
                   "\n    models: ['*']\n    admin: true\n")
    path.write_text("keys:\n" + "".join(entries))
    return path


def start_server(policy: str, args: Namespace, folder: Path,
                 name: str | None = None) -> ServerProcess:
    """A server with `policy`, named `name` (the policy's own name by default) in its process
    title and log file."""
    name = name or policy
    port = free_port()
    cmd = [sys.executable, "-m", "server", str(args.model_dir), "--port", str(port),
           "--api-keys-file", str(key_file(folder)), "--scheduling-policy", policy,
           "--max-num-seqs", str(args.max_num_seqs), "--kv-cache-memory", args.kv_cache_memory,
           "--device", "cpu", "--dtype", "float32", "--log-level", "warning",
           "--engine-process" if args.engine_process else "--no-engine-process"]
    return ServerProcess(f"goat-serve-{name}", cmd, port, folder / f"{name}.log",
                         env={"OMP_NUM_THREADS": str(args.threads)}).start()


def served_model(server: ServerProcess) -> str:
    headers = {"Authorization": f"Bearer {SECRETS['light']}"}
    return httpx.get(f"{server.url}/v1/models", headers=headers).json()["data"][0]["id"]


def warm_up(server: ServerProcess, args: Namespace, clients: KeyClients) -> None:
    """Both keys for `--warmup` seconds, not measured: the first batches of each size build
    their kernels' primitives, which would slow the first round's light-alone phase."""
    if args.warmup > 0:
        rates = {"light": args.light_rate, "heavy": args.light_rate * args.ratio}
        run_phase(server, served_model(server), "warm-up", rates,
                  argparse.Namespace(**{**vars(args), "duration": args.warmup}), -1, clients)


def phase_plan(args: Namespace) -> list[tuple[str, dict[str, float]]]:
    """A round's three phases and each key's requests/s: light alone, heavy alone (one key),
    both."""
    heavy = args.light_rate * args.ratio
    return [("light alone", {"light": args.light_rate}),
            ("heavy alone (one key)", {"heavy": heavy}),
            ("light + heavy", {"light": args.light_rate, "heavy": heavy})]


@dataclass
class Round:
    phases: list[Phase]  # light alone, heavy alone, both
    others_busy: float  # the CPUs' busy fraction just before, with our servers idle


# The order a round runs its phases in (indices into phase_plan): light alone, both, heavy
# alone, each on every policy back to back, so that the light ratio compares phases equally far
# apart for both policies.
PHASE_ORDER = (0, 2, 1)


def interleaved_rounds(policies: Sequence[str], args: Namespace,
                       run_phase_on: Callable[[str, str, dict[str, float], int], Phase],
                       ) -> dict[str, list[Round]]:
    """`args.rounds` rounds of the three phases, each phase run on every policy back to back
    (the same arrivals, the policies' order alternating between rounds): this machine's speed
    drifts by up to 2x within minutes (docs/benchmarks.md section 8), so a ratio between two
    policies compares phases seconds apart, never minutes. run_phase_on(policy, phase name,
    rates, seed) runs one phase."""
    results: dict[str, list[Round]] = {policy: [] for policy in policies}
    plan = phase_plan(args)
    for r in range(args.rounds):
        turn = list(policies) if r % 2 == 0 else list(reversed(policies))
        busy = wait_for_quiet(args.max_busy)
        busy = cpu_busy(5.0) if busy is None else busy
        print(f"round {r} ({', '.join(turn)}): other jobs keep {busy:.0%} of the CPUs busy "
              f"(load average {load_avg()})", file=sys.stderr, flush=True)
        phases: dict[str, dict[int, Phase]] = {policy: {} for policy in policies}
        for j in PHASE_ORDER:
            name, rates = plan[j]
            for policy in turn:
                phases[policy][j] = run_phase_on(policy, name, rates, 10 * r + j)
        for policy in policies:
            results[policy].append(Round([phases[policy][j] for j in range(len(plan))], busy))
    return results


def run(policies: Sequence[str], args: Namespace,
        folder: Path) -> tuple[dict[str, list[Round]], str | None]:
    """Both servers up at once (the idle one costs nothing), their phases interleaved; then,
    with both policies, the time-sliced comparison's report (with its control server, up
    from the start too)."""
    sliced = args.sliced_rounds > 0 and len(policies) > 1
    names = participants(policies, args) if sliced else list(policies)
    servers = {name: start_server(policy_of(name), args, folder, name) for name in names}
    try:
        with KeyClients(SECRETS) as clients:
            for server in servers.values():
                server.wait_healthy()
            for server in servers.values():
                warm_up(server, args, clients)
            models = {name: served_model(server) for name, server in servers.items()}

            def run_phase_on(policy: str, name: str, rates: dict[str, float],
                             seed: int) -> Phase:
                return run_phase(servers[policy], models[policy], name, rates, args, seed,
                                 clients)

            results = interleaved_rounds(policies, args, run_phase_on)
        if not sliced:
            return results, None
        with KeyClients(f"{key}@{name}" for name in names for key in SECRETS) as clients:
            return results, sliced_report(lambda order, rates, seed: sliced_phase(
                {name: servers[name] for name in order}, models, rates, args, seed,
                clients), names, args)
    finally:
        for server in servers.values():
            server.stop()


def light_ratio(rnd: Round) -> float | None:
    """The light key's TTFT p50 beside the heavy key over its TTFT p50 alone."""
    alone, both = rnd.phases[0].p50_ms("light"), rnd.phases[2].p50_ms("light")
    return both / alone if alone and both else None


def lag(phase: Phase) -> str | None:
    """Each key client's loop lag, p50/max in ms (None in process: there is none)."""
    if not any(phase.client_lag_s.values()):
        return None
    return ", ".join(f"{key} {statistics.median(lags) * 1000:.1f}/{max(lags) * 1000:.0f}"
                     for key, lags in phase.client_lag_s.items() if lags)


def report(results: dict[str, list[Round]], args: Namespace) -> str:
    rows = []
    for policy, rounds in results.items():
        for r, rnd in enumerate(rounds):
            alone, heavy, both = rnd.phases
            rows.append([policy, r, f"{rnd.others_busy:.0%}", alone.p50_ms("light"),
                         both.p50_ms("light"), light_ratio(rnd), both.queue_ms["light"],
                         both.p50_ms("heavy"),
                         f"{both.waiting['light']}/{len(both.ttft_s['light'])}",
                         heavy.tokens_per_s, both.tokens_per_s, *both.step_figures(),
                         both.server_cpu_s / both.duration_s,
                         None if both.client_cpu_s is None
                         else both.client_cpu_s / both.duration_s, lag(both),
                         both.errors + heavy.errors])
    table = format_table(["policy", "round", "others busy", "light TTFT p50 alone (ms)",
                          "light TTFT p50 with heavy (ms)", "ratio",
                          "light queue mean with heavy (ms)", "heavy TTFT p50 (ms)",
                          "light waiting at end", "tok/s heavy alone", "tok/s both",
                          "steps/s both", "seqs/step both", "step ms both",
                          "server cores both", "client cores both",
                          "client loop lag p50/max both (ms)", "errors"], rows)
    lines = [table, ""]
    for policy, rounds in results.items():
        ratios = [x for x in map(light_ratio, rounds) if x is not None]
        if ratios:
            lines.append(f"light TTFT ratio, {policy}: median of {len(ratios)} rounds "
                         f"{statistics.median(ratios):.2f}")
    lines.append(overload(results, args))
    fcfs, fair = results.get("fcfs"), results.get("fair")
    if fcfs and fair:
        for i, label in ((1, "one key"), (2, "two keys")):
            ratios = [b.phases[i].tokens_per_s / a.phases[i].tokens_per_s
                      for a, b in zip(fcfs, fair, strict=True)]
            lines.append(f"throughput fair / fcfs, {label}: per round "
                         f"{', '.join(f'{x:.3f}' for x in ratios)}; median "
                         f"{statistics.median(ratios):.3f}")
    lines.append(f"model {args.model_dir.name}, light {args.light_rate:g} req/s, heavy "
                 f"{args.light_rate * args.ratio:g} req/s, {args.prompt_len} prompt + "
                 f"{args.output_len} output tokens, max-num-seqs {args.max_num_seqs}, "
                 f"{args.duration:g} s per phase, {args.rounds} rounds, load average "
                 f"{load_avg()}")
    return "\n".join(lines)


Namespace = argparse.Namespace


def overload(results: dict[str, list[Round]], args: Namespace) -> str:
    """Whether the heavy key asks more than the server serves it alone (median over every
    round): the benchmark means nothing below capacity, where no scheduler has to choose."""
    asked = args.light_rate * args.ratio * args.output_len
    served = statistics.median(rnd.phases[1].tokens_per_s
                               for rounds in results.values() for rnd in rounds)
    verdict = ("beyond capacity" if asked > served else
               "NOT beyond capacity: raise --light-rate, these ratios mean little")
    return (f"heavy key asks {asked:,.0f} output tok/s, served alone {served:,.0f} tok/s "
            f"(median): {verdict}")


def build_parser(prog: str = "python -m loadtests.fairness",
                 description: str | None = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=FIXTURE)
    p.add_argument("--scheduling-policy", choices=(*POLICIES, "both"), default="both",
                   help="the policy (or both, side by side) to measure")
    # 6 and 60 requests/s (5,760 tok/s asked): beyond this machine's capacity at its fastest
    # (the heavy key alone was served 2,900 tok/s in process, 4,500-5,800 with
    # --engine-process, 2026-12-06); at 4 and 40 the engine process kept up
    p.add_argument("--light-rate", type=float, default=6.0, help="light key's requests/s")
    p.add_argument("--ratio", type=float, default=10.0, help="heavy rate / light rate")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--kv-cache-memory", default="64MiB")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds per policy, interleaved")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds of both keys on each server first, not measured")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=False,
                   help="the servers' --engine-process")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads of the servers (engines): the tiny model's steps "
                        "are Python, and a second thread only competes with the event loop")
    p.add_argument("--json", type=Path, help="also write the figures here")
    add_sliced_args(p)
    add_max_busy_arg(p)
    return p


def parse_args(argv: Sequence[str] | None = None) -> Namespace:
    return build_parser().parse_args(argv)


def write_json(results: dict[str, list[Round]], path: Path) -> None:
    path.write_text(json.dumps({
        policy: [{"others_busy": rnd.others_busy, "phases": [
            {"phase": p.name, "light_ttft_p50_ms": p.p50_ms("light"),
             "heavy_ttft_p50_ms": p.p50_ms("heavy"), "tokens_per_s": p.tokens_per_s,
             "light_queue_ms": p.queue_ms["light"], "waiting_at_end": p.waiting,
             "server_cpu_s": p.server_cpu_s, "client_cpu_s": p.client_cpu_s,
             "steps": p.steps, "step_s": p.step_s, "step_seqs": p.step_seqs,
             "client_lag_p50_max_ms": lag(p),
             "errors": p.errors} for p in rnd.phases]} for rnd in rounds]
        for policy, rounds in results.items()}, indent=1))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    policies = POLICIES if args.scheduling_policy == "both" else (args.scheduling_policy,)
    with tempfile.TemporaryDirectory() as tmp:
        results, sliced = run(policies, args, Path(tmp))
    if args.rounds > 0:
        print(report(results, args))
    if sliced:
        print(sliced)
    if args.json:
        write_json(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
