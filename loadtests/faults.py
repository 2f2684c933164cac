"""Overload and faults: goat-serve under 3x its capacity, under mass client disconnects, and with
a corrupt adapter requested in the middle of a load. Prints the figures.

1. Overload (server with `--max-queued-requests`): the capacity is measured with a closed loop
   of `--max-num-seqs` clients, then Poisson arrivals at 3x that rate. Every answer is checked:
   refusals must be 429/503 with `Retry-After` and fast; every accepted request (200) must end
   with a complete answer (a finish_reason, then [DONE]) or an error event, never a cut or a hang.
2. Disconnects (server without a queue limit): 200 streaming clients drop their connections at
   random points (some mid-stream, some still queued). Then: how long until a new request gets
   a complete answer (goal: within 5 s), and until `goat_kv_cache_usage_perc` and the running
   and waiting gauges are back at zero.
3. Corrupt adapters: during a closed-loop load over good adapters, requests name adapters whose
   weights are truncated or whose config is not JSON. They must fail alone: the good requests
   all succeed and the server stays healthy.

    .venv/bin/python -m loadtests.faults

A benchmark script, not a test: it takes a few minutes and all of the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.random_model import write_adapters
from goat_runtime.adapters.binding import base_linear_shapes
from loadtests.common import (
    BASE_NAME,
    CACHE,
    GoatServeConfig,
    ServerProcess,
    add_max_busy_arg,
    cpu_busy,
    format_table,
    goat_serve,
    load_avg,
    machine_summary,
    metric_sum,
    scrape,
    wait_for_quiet,
    write_random_smollm,
)
from loadtests.loadgen import LoadConfig, check_loopback, run_load
from loadtests.report import LatencyStats, format_summary
from loadtests.stream import Outcome, completion_body, new_client, stream_request
from loadtests.workload import LengthDist, arrival_offsets, synth_prompt

CORRUPT = ("corrupt-weights", "corrupt-config")


@dataclass
class FaultsConfig:
    work_dir: Path = CACHE / "bench"
    out_dir: Path = CACHE / "results" / "faults"
    num_adapters: int = 8  # good GOAT adapters
    max_num_seqs: int = 16
    max_queued_requests: int = 16
    prompt_len: int = 64
    output_len: int = 32
    capacity_duration_s: float = 30.0
    overload_factor: float = 3.0
    overload_duration_s: float = 30.0
    disconnect_clients: int = 200
    disconnect_output_len: int = 256
    recovery_goal_s: float = 5.0
    corrupt_load_duration_s: float = 30.0
    kv_cache_memory: str = "512MiB"
    seed: int = 0
    max_busy: float | None = None


def stats_ms(values: Sequence[float]) -> LatencyStats:
    return LatencyStats.of(values)


def p(stats: LatencyStats, q: int) -> float | None:
    return stats.percentiles.get(f"p{q}") if stats.count else None


# ---- 1. overload -----------------------------------------------------------------------------


@dataclass
class OverloadResult:
    capacity_rps: float
    capacity_tok_s: float
    offered_rps: float
    outcomes: list[Outcome]
    duration_s: float


async def overload(config: FaultsConfig, url: str, adapters: list[str]) -> OverloadResult:
    check_loopback(url)
    cap = await run_load(LoadConfig(
        models=adapters, url=url, concurrency=config.max_num_seqs,
        duration_s=config.capacity_duration_s, adapter_dist="round-robin",
        prompt_len=LengthDist("fixed", config.prompt_len),
        output_len=LengthDist("fixed", config.output_len), ignore_eos=True,
        drain_timeout_s=600.0, seed=config.seed,
    ))
    print(format_summary(cap.summary), file=sys.stderr, flush=True)
    if cap.summary.num_errors:
        raise RuntimeError("the capacity run had errors; see above")
    capacity = cap.summary.request_throughput
    rate = config.overload_factor * capacity
    rng = random.Random(config.seed)
    tasks: list[asyncio.Task[Outcome]] = []
    t0 = time.perf_counter()
    async with new_client() as client:
        for i, at in enumerate(arrival_offsets(rate, 1.0, rng)):
            if at >= config.overload_duration_s:
                break
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = completion_body(adapters[i % len(adapters)],
                                   synth_prompt(config.prompt_len, rng), config.output_len)
            tasks.append(asyncio.create_task(stream_request(client, url, body, 600.0)))
        outcomes = list(await asyncio.gather(*tasks))
    return OverloadResult(capacity, cap.summary.output_token_throughput, rate, outcomes,
                          time.perf_counter() - t0)


def overload_report(config: FaultsConfig, r: OverloadResult) -> tuple[str, bool]:
    verdicts = Counter(o.verdict for o in r.outcomes)
    refused = [o for o in r.outcomes if o.status in (429, 503)]
    accepted = [o for o in r.outcomes if o.status == 200]
    refusal_ms = stats_ms([o.head_s for o in refused if o.head_s is not None])
    accepted_ttft = stats_ms([o.ttft_s for o in accepted if o.ttft_s is not None])
    no_retry_after = sum(1 for o in refused if not o.retry_after)
    lost = [o for o in accepted if o.verdict == "lost"]
    other = [o for o in r.outcomes if o.status not in (200, 429, 503)]
    rows = [
        ["capacity (closed loop, --max-num-seqs clients)", f"{r.capacity_rps:.2f} req/s "
         f"({r.capacity_tok_s:.1f} tok/s)"],
        ["offered (Poisson)", f"{r.offered_rps:.2f} req/s = {config.overload_factor:g}x, for "
         f"{config.overload_duration_s:g} s"],
        ["requests sent", len(r.outcomes)],
        ["accepted (200)", len(accepted)],
        ["  complete answer", verdicts.get("complete", 0)],
        ["  error event", verdicts.get("error_event", 0)],
        ["  lost (cut, hung or no finish)", len(lost)],
        ["refused 429", verdicts.get("refused_429", 0)],
        ["refused 503", verdicts.get("refused_503", 0)],
        ["refused without Retry-After", no_retry_after],
        ["other statuses / transport errors", len(other)],
        ["refusal latency p50 / p99 / max (ms)",
         f"{_f(p(refusal_ms, 50))} / {_f(p(refusal_ms, 99))} / {_f(refusal_ms.max)}"],
        ["accepted TTFT p50 / p99 (ms)",
         f"{_f(p(accepted_ttft, 50))} / {_f(p(accepted_ttft, 99))}"],
        ["Retry-After values", ", ".join(sorted({o.retry_after or "-" for o in refused}))],
    ]
    ok = not lost and not other and no_retry_after == 0 and bool(refused)
    if other:
        first = other[0]
        rows.append(["first other", f"{first.status} {first.exception or first.error_body}"])
    if lost:
        rows.append(["first lost", f"{lost[0].__dict__}"])
    return format_table(["overload", "value"], rows), ok


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


# ---- 2. disconnects --------------------------------------------------------------------------


@dataclass
class DisconnectResult:
    outcomes: list[Outcome]
    probe: Outcome  # a new request sent right after the last client closed
    zero_after_s: float | None  # KV usage, running and waiting all zero, after the last close
    final_gauges: dict[str, float]
    timeline: list[tuple[float, float, float, float]] = field(default_factory=list)


def gauges(url: str) -> dict[str, float]:
    m = scrape(url)
    return {k: metric_sum(m, k) for k in (
        "goat_kv_cache_usage_perc", "goat_num_requests_running", "goat_num_requests_waiting")}


async def disconnects(config: FaultsConfig, url: str, adapters: list[str]) -> DisconnectResult:
    rng = random.Random(config.seed + 1)
    async with new_client() as client:
        tasks = []
        for i in range(config.disconnect_clients):
            body = completion_body(adapters[i % len(adapters)],
                                   synth_prompt(config.prompt_len, rng),
                                   config.disconnect_output_len)
            # Half drop after a few chunks (mid-stream), the rest after a random time, which
            # catches some still queued and some mid-stream.
            if i % 2 == 0:
                kwargs: dict[str, Any] = {"stop_after_chunks": rng.randint(1, 16)}
                kwargs["stop_after_s"] = 60.0  # bound: a client still queued gives up then
            else:
                kwargs = {"stop_after_s": rng.uniform(0.5, 15.0)}
            tasks.append(asyncio.create_task(stream_request(client, url, body, 120.0, **kwargs)))
        outcomes = list(await asyncio.gather(*tasks))
    closed_at = time.perf_counter()
    # A fresh client and connection, as a new user would come.
    async with new_client() as client:
        probe = await stream_request(
            client, url, completion_body(adapters[0], synth_prompt(16, rng), 8), 60.0)
    timeline: list[tuple[float, float, float, float]] = []
    zero_after: float | None = None
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        g = await asyncio.to_thread(gauges, url)
        t = time.perf_counter() - closed_at
        timeline.append((t, g["goat_kv_cache_usage_perc"], g["goat_num_requests_running"],
                         g["goat_num_requests_waiting"]))
        if all(v == 0 for v in g.values()):
            zero_after = t
            break
        await asyncio.sleep(0.25)
    return DisconnectResult(outcomes, probe, zero_after,
                            await asyncio.to_thread(gauges, url), timeline)


def disconnect_report(config: FaultsConfig, r: DisconnectResult, peak: dict[str, float]
                      ) -> tuple[str, bool]:
    mid = [o for o in r.outcomes if o.disconnected and o.chunks > 0]
    queued = [o for o in r.outcomes if o.disconnected and o.chunks == 0]
    unexpected = [o for o in r.outcomes if not o.disconnected]
    probe_s = r.probe.end_s if r.probe.verdict == "complete" else None
    rows = [
        ["clients", len(r.outcomes)],
        ["closed mid-stream (after >= 1 chunk)", len(mid)],
        ["closed before the first chunk (queued)", len(queued)],
        ["ended before we closed them", f"{len(unexpected)} "
         f"({dict(Counter(o.verdict for o in unexpected))})"],
        ["peak KV usage / running / waiting during the run",
         f"{peak['goat_kv_cache_usage_perc']:.3f} / {peak['goat_num_requests_running']:.0f} / "
         f"{peak['goat_num_requests_waiting']:.0f}"],
        ["new request after the last close: verdict", r.probe.verdict],
        ["  its complete answer took (s)", _f(probe_s) if probe_s is None else f"{probe_s:.2f}"],
        ["KV usage, running and waiting all zero after (s)",
         "not within 120 s" if r.zero_after_s is None else f"{r.zero_after_s:.2f}"],
        ["gauges at the end", ", ".join(f"{k.removeprefix('goat_')}={v:g}"
                                        for k, v in r.final_gauges.items())],
    ]
    ok = (probe_s is not None and probe_s <= config.recovery_goal_s
          and r.zero_after_s is not None)
    return format_table(["disconnects", "value"], rows), ok


# ---- 3. corrupt adapters ---------------------------------------------------------------------


def make_fault_adapters(goat_dir: Path, good: Sequence[str], folder: Path) -> None:
    """`folder` with the good adapters (hard links, no copies) and two corrupt ones."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in good:
        (folder / name).mkdir()
        for f in (goat_dir / name).iterdir():
            os.link(f, folder / name / f.name)
    src = goat_dir / good[0]
    weights = (src / "adapter_model.safetensors").read_bytes()
    bad = folder / "corrupt-weights"
    bad.mkdir()
    shutil.copy(src / "adapter_config.json", bad / "adapter_config.json")
    (bad / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 3])  # truncated
    bad = folder / "corrupt-config"
    bad.mkdir()
    os.link(src / "adapter_model.safetensors", bad / "adapter_model.safetensors")
    (bad / "adapter_config.json").write_text('{"peft_type": "GOAT", "r": 8,')  # not JSON


@dataclass
class CorruptResult:
    good: Any  # loadgen Summary of the good load
    bad: list[Outcome]
    after_bad: list[Outcome]  # the corrupt adapters asked again, after the load
    after_good: Outcome
    healthy: bool


async def corrupt(config: FaultsConfig, url: str, adapters: list[str]) -> CorruptResult:
    load = asyncio.create_task(run_load(LoadConfig(
        models=adapters, url=url, concurrency=len(adapters),
        duration_s=config.corrupt_load_duration_s, adapter_dist="round-robin",
        prompt_len=LengthDist("fixed", config.prompt_len),
        output_len=LengthDist("fixed", config.output_len), ignore_eos=True,
        drain_timeout_s=600.0, seed=config.seed + 2,
    )))
    rng = random.Random(config.seed + 3)
    bad: list[Outcome] = []
    async with new_client() as client:
        for i in range(6):  # from 3 s into the load, one every 2 s (plus its own time)
            await asyncio.sleep(2.0 if i else 3.0)
            body = completion_body(CORRUPT[i % 2], synth_prompt(16, rng), 8)
            bad.append(await stream_request(client, url, body, 120.0))
        result = await load
        after_bad = [await stream_request(client, url, completion_body(
            name, synth_prompt(16, rng), 8), 120.0) for name in CORRUPT]
        after_good = await stream_request(client, url, completion_body(
            adapters[-1], synth_prompt(16, rng), 8), 120.0)
        healthy = (await client.get(url + "/health")).status_code == 200
    return CorruptResult(result.summary, bad, after_bad, after_good, healthy)


def corrupt_report(r: CorruptResult) -> tuple[str, bool]:
    rows = []
    for o in r.bad + r.after_bad:
        message = o.error_body or o.error_event or o.exception or ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            message = json.loads(message)["error"]["message"]
        rows.append([o.adapter, o.status, o.verdict, _f(o.end_s * 1000 if o.end_s else None),
                     message[:90]])
    table = format_table(["corrupt adapter request", "status", "verdict", "ms", "message"], rows)
    good = r.good
    lines = [
        table,
        "",
        f"Good adapters' load meanwhile: {good.num_ok}/{good.num_requests} ok, errors "
        f"{good.errors_by_kind or 'none'}, {good.output_token_throughput:.1f} tok/s.",
        f"After: a good adapter -> {r.after_good.verdict}; /health -> "
        f"{'200' if r.healthy else 'not 200'}.",
    ]
    ok = (good.num_errors == 0 and r.healthy and r.after_good.verdict == "complete"
          and all(o.verdict not in ("complete", "lost", "transport") for o in r.bad + r.after_bad))
    return "\n".join(lines), ok


# ---- main ------------------------------------------------------------------------------------


def server_for(config: FaultsConfig, model_dir: Path, adapter_dir: Path, log: Path,
               queue_limit: int | None) -> ServerProcess:
    return goat_serve(GoatServeConfig(
        model_dir, adapter_dir, served_model_name=BASE_NAME, max_loras=config.num_adapters,
        max_cpu_adapters=max(32, config.num_adapters), max_num_seqs=config.max_num_seqs,
        max_queued_requests=queue_limit, kv_cache_memory=config.kv_cache_memory,
    ), log)


async def warm(url: str, adapters: list[str]) -> None:
    res = await run_load(LoadConfig(
        models=adapters, url=url, concurrency=len(adapters), num_requests=len(adapters),
        adapter_dist="round-robin", prompt_len=LengthDist("fixed", 8),
        output_len=LengthDist("fixed", 2), ignore_eos=True, drain_timeout_s=600.0,
    ))
    if res.summary.num_errors:
        raise RuntimeError(f"warm-up failed:\n{format_summary(res.summary)}")


async def peak_gauges(url: str, stop: asyncio.Event) -> dict[str, float]:
    peak = {"goat_kv_cache_usage_perc": 0.0, "goat_num_requests_running": 0.0,
            "goat_num_requests_waiting": 0.0}
    while not stop.is_set():
        g = await asyncio.to_thread(gauges, url)
        for k, v in g.items():
            peak[k] = max(peak[k], v)
        await asyncio.sleep(0.5)
    return peak


async def disconnects_with_peak(config: FaultsConfig, url: str, adapters: list[str]
                                ) -> tuple[DisconnectResult, dict[str, float]]:
    stop = asyncio.Event()
    watcher = asyncio.create_task(peak_gauges(url, stop))
    try:
        result = await disconnects(config, url, adapters)
    finally:
        stop.set()
    return result, await watcher


def run(config: FaultsConfig) -> tuple[str, bool]:
    model_dir = write_random_smollm(config.work_dir / BASE_NAME)
    good = [f"goat-{i}" for i in range(config.num_adapters)]
    write_adapters(config.work_dir / "goat", base_linear_shapes(model_dir), good, "goat", seed=0)
    adapter_dir = config.work_dir / "faults-adapters"
    make_fault_adapters(config.work_dir / "goat", good, adapter_dir)
    logs = config.out_dir / "logs"
    sections: list[str] = []
    oks: list[bool] = []

    busy = wait_for_quiet(config.max_busy)
    busy = cpu_busy(5.0) if busy is None else busy
    print(f"\n=== overload (others {busy:.0%} busy, load avg {load_avg()})", file=sys.stderr,
          flush=True)
    with server_for(config, model_dir, adapter_dir, logs / "overload.log",
                    config.max_queued_requests) as server:
        server.wait_healthy(600)
        asyncio.run(warm(server.url, good))
        result = asyncio.run(overload(config, server.url, good))
        text, ok = overload_report(config, result)
        sections += [f"Overload (other jobs took {busy:.0%} of the CPUs just before): goat-serve "
                     f"--max-num-seqs {config.max_num_seqs} "
                     f"--max-queued-requests {config.max_queued_requests}, {len(good)} GOAT "
                     f"adapters, {config.prompt_len} prompt + {config.output_len} generated "
                     "tokens.", "", text, ""]
        oks.append(ok)

    wait_for_quiet(config.max_busy)
    print(f"\n=== disconnects and corrupt adapters (load avg {load_avg()})", file=sys.stderr,
          flush=True)
    with server_for(config, model_dir, adapter_dir, logs / "disconnect.log", None) as server:
        server.wait_healthy(600)
        asyncio.run(warm(server.url, good))
        dres, peak = asyncio.run(disconnects_with_peak(config, server.url, good))
        text, ok = disconnect_report(config, dres, peak)
        sections += [f"Disconnects: {config.disconnect_clients} streaming clients "
                     f"(max_tokens {config.disconnect_output_len}) on goat-serve "
                     f"--max-num-seqs {config.max_num_seqs} without a queue limit, closing "
                     f"at random points; goal: a new request answered within "
                     f"{config.recovery_goal_s:g} s and the KV cache back at zero.", "", text,
                     ""]
        oks.append(ok)
        cres = asyncio.run(corrupt(config, server.url, good))
        text, ok = corrupt_report(cres)
        sections += [f"Corrupt adapters during a {config.corrupt_load_duration_s:g} s closed "
                     f"loop over {len(good)} good ones (same server): `corrupt-weights` has "
                     "its safetensors cut to a third, `corrupt-config` a config that is not "
                     "JSON.", "", text, ""]
        oks.append(ok)
    names = ("overload", "disconnects", "corrupt adapters")
    sections.append("Checks: " + ", ".join(f"{n} {'passed' if o else 'FAILED'}"
                                           for n, o in zip(names, oks, strict=True)))
    return "\n".join(sections), all(oks)


def parse_args(argv: Sequence[str] | None = None) -> FaultsConfig:
    d = FaultsConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work-dir", type=Path, default=d.work_dir)
    ap.add_argument("--out-dir", type=Path, default=d.out_dir)
    ap.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    ap.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests)
    ap.add_argument("--overload-factor", type=float, default=d.overload_factor)
    ap.add_argument("--overload-duration", type=float, default=d.overload_duration_s)
    ap.add_argument("--capacity-duration", type=float, default=d.capacity_duration_s)
    ap.add_argument("--disconnect-clients", type=int, default=d.disconnect_clients)
    ap.add_argument("--corrupt-load-duration", type=float, default=d.corrupt_load_duration_s)
    add_max_busy_arg(ap)
    a = ap.parse_args(argv)
    if not (math.isfinite(a.overload_factor) and a.overload_factor > 0):
        ap.error("--overload-factor must be positive")
    return FaultsConfig(
        work_dir=a.work_dir, out_dir=a.out_dir, max_num_seqs=a.max_num_seqs,
        max_queued_requests=a.max_queued_requests, overload_factor=a.overload_factor,
        overload_duration_s=a.overload_duration, capacity_duration_s=a.capacity_duration,
        disconnect_clients=a.disconnect_clients,
        corrupt_load_duration_s=a.corrupt_load_duration, max_busy=a.max_busy,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    machine = machine_summary()
    print(machine, file=sys.stderr)
    text, ok = run(config)
    print("\n" + text)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    (config.out_dir / "report.md").write_text(f"{text}\n\nMachine:\n\n```\n{machine}\n```\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
