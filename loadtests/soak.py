"""Soak test: one goat-serve server under mixed traffic for a long time (default 20 minutes), its
resources sampled throughout, and pass/fail checks at the end.

Traffic: `--clients` concurrent clients send streamed and plain completions and chat completions
over the base model and the adapters, `n = 3`, `echo` with `logprobs`, and streams they drop
after a few chunks or a fraction of a second. Beside them, periodically:
- adapters: /v1/load_lora_adapter of a copy of an adapter under a pool name, streams for it,
  /v1/unload_lora_adapter while they run (it waits for them), then a request for it (404);
- corrupt adapters (a copy whose safetensors file is cut short, or has a damaged header),
  loaded through the API and requested by name: a clean 400 each time;
- a burst of requests past `--max-queued-requests`: 429 with Retry-After for the excess.

Phases: warm-up traffic, idle (the baseline), traffic, drain (until no request is in flight and
no KV block is in use), idle (the end). Every `--sample-interval` s it prints the server's RSS,
KV blocks in use (/metrics' usage times the cache's blocks), open fds and threads (/proc/PID),
and writes them to soak.csv and soak.png in `--out-dir`.

Checks (`soak_checks.evaluate`; exit status 1 if one fails): every request ended as its kind
should (a complete answer; its own clear, OpenAI-shaped 400/404/429; or our own disconnect),
never a 5xx, a cut stream or a hang, and each kind was seen with its expected outcome; no ERROR
or traceback in the server log, /health 200 at the end; 0 KV blocks in use at the end; RSS at
the end at most `--rss-tolerance` above the baseline; no upward RSS trend (`rss_trend`); open
fds and threads at the end no higher than their peak until the middle of the traffic (a leak
grows past it, a pool reaches its cap early).

    python -m loadtests.soak                             # 20 min, SmolLM2 and adapters/
    python -m loadtests.soak --duration 180 --warmup 60
    python -m loadtests.soak --model-dir M --adapter-src DIR   # another model, its adapters
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.common import (
    CACHE,
    REPO,
    GoatServeConfig,
    ServerProcess,
    goat_serve,
    load_avg,
    machine_summary,
    proc_sample,
)
from loadtests.faults import gauges
from loadtests.report import RequestRecord
from loadtests.soak_checks import (
    ADMIN_KINDS,
    CLIENT_KINDS,
    EXPECTED_ERRORS,
    Result,
    Sample,
    body_problem,
    evaluate,
    http_verdict,
    outcome_result,
    write_outputs,
)
from loadtests.stream import completion_body, new_client, send_request, stream_request
from loadtests.workload import synth_prompt

BASE = "soak-base"  # the base model's served name
CORRUPT = ("corrupt-truncated", "corrupt-header")
POOL = 3  # adapter copies loaded and unloaded through the API, under names soak-dyn-<i>


@dataclass
class SoakConfig:
    model_dir: Path | None = None  # None: the default model (SmolLM2), adapters from adapters/
    adapter_src: Path | None = None  # folder of adapter folders, copied into the run's own
    out_dir: Path = CACHE / "results" / "soak"
    duration_s: float = 1200.0
    warmup_s: float = 120.0
    sample_s: float = 5.0
    clients: int = 6
    max_num_seqs: int = 8
    max_queued_requests: int = 8
    kv_cache_memory: str = "512MiB"
    prompt_words: tuple[int, int] = (8, 48)
    max_tokens: tuple[int, int] = (4, 32)
    adapter_every_s: float = 20.0
    corrupt_every_s: float = 30.0
    burst_every_s: float = 60.0
    request_timeout_s: float = 120.0  # longer is a hang
    settle_s: float = 15.0  # idle time sampled for the baseline and the end
    rss_tolerance: float = 0.05
    max_rss_slope: float = 1.0  # MB/min; see rss_trend
    seed: int = 0


async def post(client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float
               ) -> tuple[int | None, str, str | None]:
    """(status, body, Retry-After); status None and the cause as the body on a transport error
    or no answer within timeout_s."""
    try:
        async with asyncio.timeout(timeout_s):
            r = await client.post(url, json=body)
        return r.status_code, r.text, r.headers.get("retry-after")
    except TimeoutError:
        return None, f"no answer within {timeout_s:g} s (a hang)", None
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}", None


async def plain(kind: str, client: httpx.AsyncClient, url: str, body: dict[str, Any],
                timeout_s: float, t0: float, text_prompt: str = "") -> Result:
    """One request answered in one body (generation or adapter admin)."""
    start = time.monotonic()
    status, text, retry_after = await post(client, url, body, timeout_s)
    r = Result(kind, body.get("model") or body.get("lora_name", ""), start - t0, "ok", status,
               seconds=time.monotonic() - start)
    if status is None:
        r.verdict, r.detail = "failure", text
    elif status != 200:
        r.verdict, r.detail = http_verdict(kind, status, text, retry_after)
    elif kind in EXPECTED_ERRORS and kind != "dyn_request":
        r.verdict, r.detail = "failure", f"200 where {sorted(EXPECTED_ERRORS[kind])} was expected"
    elif kind not in ADMIN_KINDS:
        problem = body_problem(kind, text, body.get("n", 1), text_prompt)
        if problem:
            r.verdict, r.detail = "failure", problem
    return r


# ---- traffic -----------------------------------------------------------------------------------


@dataclass
class State:
    config: SoakConfig
    url: str
    models: list[str]
    t0: float = field(default_factory=time.monotonic)
    phase: str = "warmup"
    results: list[Result] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.t0


async def client_request(st: State, client: httpx.AsyncClient, kind: str, model: str,
                         rng: random.Random) -> Result:
    c = st.config
    prompt = synth_prompt(rng.randint(*c.prompt_words), rng)
    max_tokens = rng.randint(*c.max_tokens)
    t = st.now()
    if kind in ("stream", "dyn_request"):
        out = await stream_request(client, st.url, completion_body(model, prompt, max_tokens),
                                   c.request_timeout_s)
        return outcome_result(kind, t, out)
    if kind == "disconnect":  # half after a few chunks, half after a moment (maybe queued)
        body = completion_body(model, prompt, 64)
        kwargs: dict[str, Any] = ({"stop_after_chunks": rng.randint(1, 8)} if rng.random() < 0.5
                                  else {"stop_after_s": rng.uniform(0.05, 1.0)})
        return outcome_result(kind, t, await stream_request(client, st.url, body,
                                                            c.request_timeout_s, **kwargs))
    messages = [{"role": "user", "content": prompt}]
    if kind == "stream_chat":
        record = RequestRecord(0, model, 0, max_tokens)
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        await send_request(client, st.url + "/v1/chat/completions", body, record,
                           c.request_timeout_s, st.t0)
        r = Result(kind, model, t, "ok", record.status, seconds=record.e2e_s or 0.0)
        if record.status == 429 and record.error_kind == "http_429":
            r.verdict, r.detail = "refused", record.error or ""  # send_request keeps no headers
        elif not record.ok:
            r.verdict, r.detail = "failure", f"{record.error_kind}: {record.error}"
        return r
    if kind == "chat":
        body = {"model": model, "messages": messages, "max_tokens": max_tokens}
        return await plain(kind, client, st.url + "/v1/chat/completions", body,
                           c.request_timeout_s, st.t0)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
    if kind == "n3":
        body.update(n=3, temperature=0.9, seed=rng.randrange(1 << 30))
    elif kind == "echo_logprobs":
        body.update(echo=True, logprobs=2, max_tokens=min(max_tokens, 4), temperature=0.0)
    return await plain(kind, client, st.url + "/v1/completions", body, c.request_timeout_s,
                       st.t0, prompt)


async def client_loop(st: State, client: httpx.AsyncClient, rng: random.Random,
                      deadline: float) -> None:
    kinds, weights = list(CLIENT_KINDS), list(CLIENT_KINDS.values())
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        st.results.append(await client_request(st, client, kind, rng.choice(st.models), rng))


async def adapter_cycle(st: State, client: httpx.AsyncClient, i: int, rng: random.Random) -> None:
    """Load a pool copy, stream 3 requests for it, unload while they run, then ask for it."""
    c, name = st.config, f"soak-dyn-{i % POOL}"
    load = await plain("load", client, st.url + "/v1/load_lora_adapter",
                       {"lora_name": name, "lora_path": f"pool/dyn-{i % POOL}"},
                       c.request_timeout_s, st.t0)
    st.results.append(load)
    if load.verdict != "ok":
        return
    requests = [asyncio.create_task(client_request(st, client, "dyn_request", name, rng))
                for _ in range(3)]
    await asyncio.sleep(0.3)
    unload = await plain("unload", client, st.url + "/v1/unload_lora_adapter",
                         {"lora_name": name}, c.request_timeout_s, st.t0)
    st.results.append(unload)
    st.results.extend(await asyncio.gather(*requests))
    if unload.verdict != "ok":
        # Counted once; retried with nothing in flight so that the next cycles do not fail in
        # its wake (a load of a name still loaded, a 200 where a 404 is due).
        unload = await plain("unload", client, st.url + "/v1/unload_lora_adapter",
                             {"lora_name": name}, c.request_timeout_s, st.t0)
        st.results.append(unload)
        if unload.verdict != "ok":
            return
    st.results.append(await plain("after_unload", client, st.url + "/v1/completions",
                                  {"model": name, "prompt": "hello", "max_tokens": 2},
                                  c.request_timeout_s, st.t0))


async def corrupt_round(st: State, client: httpx.AsyncClient, i: int, rng: random.Random) -> None:
    c, bad = st.config, CORRUPT[i % len(CORRUPT)]
    st.results.append(await plain("load_corrupt", client, st.url + "/v1/load_lora_adapter",
                                  {"lora_name": f"soak-{bad}", "lora_path": bad},
                                  c.request_timeout_s, st.t0))
    st.results.append(await plain("request_corrupt", client, st.url + "/v1/completions",
                                  {"model": bad, "prompt": "hello", "max_tokens": 2},
                                  c.request_timeout_s, st.t0))


async def burst(st: State, client: httpx.AsyncClient, i: int, rng: random.Random) -> None:
    """More requests at once than --max-num-seqs + --max-queued-requests admit."""
    c = st.config
    size = c.max_num_seqs + c.max_queued_requests + 8
    bodies = [{"model": rng.choice(st.models), "prompt": synth_prompt(8, rng), "max_tokens": 8}
              for _ in range(size)]
    st.results.extend(await asyncio.gather(*(
        plain("burst", client, st.url + "/v1/completions", b, c.request_timeout_s, st.t0)
        for b in bodies)))


async def every(period_s: float, deadline: float, event: Callable[[int], Awaitable[None]]) -> None:
    """`event(0)` now, then `event(i)` every period until the deadline (never overlapping)."""
    start, i = time.monotonic(), 0
    while time.monotonic() < deadline:
        await event(i)
        i += 1
        await asyncio.sleep(max(0.0, min(start + i * period_s, deadline) - time.monotonic()))


async def traffic(st: State, seconds: float, drain_phase: str, seed: int) -> None:
    c = st.config
    deadline = time.monotonic() + seconds
    rng = random.Random(seed)
    async with new_client() as client:
        tasks = [asyncio.create_task(client_loop(st, client, random.Random(rng.random()),
                                                 deadline)) for _ in range(c.clients)]
        for period, event in ((c.adapter_every_s, adapter_cycle), (c.corrupt_every_s,
                              corrupt_round), (c.burst_every_s, burst)):
            erng = random.Random(rng.random())
            tasks.append(asyncio.create_task(every(
                period, deadline, lambda i, e=event, r=erng: e(st, client, i, r))))
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        st.phase = drain_phase
        # Each request is bounded by request_timeout_s; an adapter cycle makes 3 in a row.
        _, pending = await asyncio.wait(tasks, timeout=4 * c.request_timeout_s + 30)
        for task in pending:
            task.cancel()
            st.results.append(Result("task", "-", st.now(), "failure",
                                     detail="a traffic task was still running long after the "
                                            "end: a hang"))
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a bug of this script


async def idle(st: State, name: str) -> None:
    """Wait until nothing runs and no KV block is in use (bounded), then sample `settle_s`."""
    deadline = time.monotonic() + st.config.request_timeout_s
    while time.monotonic() < deadline:
        try:
            g = await asyncio.to_thread(gauges, st.url)
            if not any(g.values()):
                break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)
    st.phase = name
    await asyncio.sleep(max(st.config.settle_s, 3 * st.config.sample_s))


async def sampler(st: State, pid: int, num_blocks: int, stop: asyncio.Event) -> None:
    """A sample every sample_s (at fixed times: a slow /metrics answer does not shift them)."""
    start, i = time.monotonic(), 0
    while not stop.is_set():
        try:
            proc = proc_sample(pid)
        except OSError:
            print("the server process is gone", file=sys.stderr, flush=True)
            return
        try:
            g = await asyncio.to_thread(gauges, st.url)
            usage: float | None = g["goat_kv_cache_usage_perc"]
            kv = round(usage * num_blocks) if usage is not None else None
            running, waiting = int(g["goat_num_requests_running"]), int(
                g["goat_num_requests_waiting"])
        except httpx.HTTPError:
            usage = kv = running = waiting = None
        s = Sample(round(st.now(), 2), st.phase, proc.rss_bytes / 2**20, proc.fds, proc.threads,
                   kv, usage, running, waiting, len(st.results))
        st.samples.append(s)
        print(f"[{s.t:7.1f} s {s.phase:8}] RSS {s.rss_mb:7.1f} MB  KV {kv} blocks  running "
              f"{running} waiting {waiting}  fds {s.fds}  threads {s.threads}  requests "
              f"{s.requests}", flush=True)
        i = max(i + 1, math.ceil((time.monotonic() - start) / st.config.sample_s))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), start + i * st.config.sample_s - time.monotonic())


async def soak(st: State, pid: int, num_blocks: int) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(sampler(st, pid, num_blocks, stop))
    c = st.config
    try:
        await traffic(st, c.warmup_s, "warmup", c.seed)
        await idle(st, "baseline")
        st.phase = "traffic"
        await traffic(st, c.duration_s, "drain", c.seed + 1)
        await idle(st, "end")
    finally:
        stop.set()
        await task


# ---- set-up and output ---------------------------------------------------------------------------


def prepare_adapters(src: Path, dst: Path) -> list[str]:
    """`dst`: copies of the adapters in `src`, POOL copies under pool/ for the load API, and the
    corrupt ones: the first adapter with its safetensors cut in half, and with its header
    overwritten. Returns the good adapters' names."""
    names = sorted(p.name for p in src.iterdir() if (p / "adapter_config.json").is_file())
    if not names:
        raise SystemExit(f"no adapter folders (with adapter_config.json) in {src}")
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in names:
        shutil.copytree(src / name, dst / name)
    for i in range(POOL):
        shutil.copytree(src / names[i % len(names)], dst / "pool" / f"dyn-{i}")
    weights = (src / names[0] / "adapter_model.safetensors").read_bytes()
    damaged = {"corrupt-truncated": weights[: len(weights) // 2],
               "corrupt-header": weights[:8] + b"\xff" * 64 + weights[72:]}
    for bad, data in damaged.items():
        shutil.copytree(src / names[0], dst / bad)
        (dst / bad / "adapter_model.safetensors").write_bytes(data)
    return names


def kv_blocks_total(model_dir: Path, kv_cache_memory: str) -> int:
    """The number of KV blocks the server allocates for this budget (the engine's own rule)."""
    from goat_runtime.engine.config import EngineConfig
    from goat_runtime.model.config import ModelConfig
    from goat_runtime.model.kv_cache import cache_blocks_for_budget
    from server.cli import parse_size

    budget = parse_size(kv_cache_memory)
    engine = EngineConfig(model_dir, kv_cache_memory=budget)
    return cache_blocks_for_budget(budget, ModelConfig.from_pretrained(model_dir),
                                   engine.block_size, engine.torch_dtype)


def run(config: SoakConfig) -> tuple[str, bool]:
    if config.model_dir is None:
        from goat_runtime.default_model import default_model_dir

        model_dir, src = default_model_dir(), config.adapter_src or REPO / "adapters"
    else:
        model_dir, src = config.model_dir, config.adapter_src
    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    adapters = prepare_adapters(src, out / "adapters") if src else []
    num_blocks = kv_blocks_total(model_dir, config.kv_cache_memory)
    server: ServerProcess = goat_serve(GoatServeConfig(
        model_dir, out / "adapters", served_model_name=BASE, max_loras=len(adapters) + POOL,
        max_cpu_adapters=2 * (len(adapters) + POOL), max_num_seqs=config.max_num_seqs,
        max_queued_requests=config.max_queued_requests, kv_cache_memory=config.kv_cache_memory,
        log_level="warning"), out / "server.log")
    load_before = load_avg()
    with server:
        server.wait_healthy(600)
        assert server.proc is not None
        st = State(config, server.url, [BASE, *adapters])
        asyncio.run(soak(st, server.proc.pid, num_blocks))
        try:
            healthy = httpx.get(server.url + "/health", trust_env=False).status_code == 200
        except httpx.HTTPError:
            healthy = False
    log_text = server.log_path.read_text(errors="replace")
    checks = evaluate(st.samples, st.results, log_text, healthy, config.rss_tolerance,
                      config.max_rss_slope)
    header = (
        f"goat-serve soak: {model_dir.name}, adapters {', '.join(adapters) or 'none'}; "
        f"{config.warmup_s:g} s warm-up, {config.duration_s:g} s traffic, {config.clients} "
        f"clients, --max-num-seqs {config.max_num_seqs} --max-queued-requests "
        f"{config.max_queued_requests} --kv-cache-memory {config.kv_cache_memory} "
        f"({num_blocks} blocks). Load average before {load_before}, after {load_avg()}.")
    record = {"config": {k: str(v) if isinstance(v, Path) else v
                         for k, v in asdict(config).items()}, "kv_blocks_total": num_blocks}
    text = write_outputs(out, st.samples, st.results, checks, config.rss_tolerance, header,
                         record) + f"; server log: {server.log_path}"
    return text, all(c.ok for c in checks)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not 1 <= lo_i <= hi_i:
        raise argparse.ArgumentTypeError(f"{text!r}: want LO:HI with 1 <= LO <= HI")
    return lo_i, hi_i


def parse_args(argv: Sequence[str] | None = None) -> SoakConfig:
    d = SoakConfig()
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-dir", type=Path, help="base model (default: SmolLM2-135M)")
    ap.add_argument("--adapter-src", type=Path,
                    help="folder of adapter folders to serve (copied); default: adapters/ "
                         "with the default model, none otherwise")
    ap.add_argument("--out-dir", type=Path, default=d.out_dir)
    ap.add_argument("--duration", type=float, default=d.duration_s, help="traffic seconds")
    ap.add_argument("--warmup", type=float, default=d.warmup_s, help="warm-up seconds")
    ap.add_argument("--sample-interval", type=float, default=d.sample_s)
    ap.add_argument("--clients", type=int, default=d.clients)
    ap.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    ap.add_argument("--max-queued-requests", type=int, default=d.max_queued_requests)
    ap.add_argument("--kv-cache-memory", default=d.kv_cache_memory)
    ap.add_argument("--prompt-words", type=_range, default=d.prompt_words, metavar="LO:HI")
    ap.add_argument("--max-tokens", type=_range, default=d.max_tokens, metavar="LO:HI")
    ap.add_argument("--adapter-every", type=float, default=d.adapter_every_s)
    ap.add_argument("--corrupt-every", type=float, default=d.corrupt_every_s)
    ap.add_argument("--burst-every", type=float, default=d.burst_every_s)
    ap.add_argument("--request-timeout", type=float, default=d.request_timeout_s)
    ap.add_argument("--settle", type=float, default=d.settle_s,
                    help="idle seconds sampled after the warm-up and at the end")
    ap.add_argument("--rss-tolerance", type=float, default=d.rss_tolerance)
    ap.add_argument("--max-rss-slope", type=float, default=d.max_rss_slope, help="MB/min")
    ap.add_argument("--seed", type=int, default=d.seed)
    a = ap.parse_args(argv)
    for name in ("duration", "warmup", "sample_interval", "adapter_every", "corrupt_every",
                 "burst_every", "request_timeout", "clients"):
        if not getattr(a, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if a.model_dir is not None and not (a.model_dir / "config.json").is_file():
        ap.error(f"--model-dir {a.model_dir}: no config.json there")
    if a.adapter_src is not None and not a.adapter_src.is_dir():
        ap.error(f"--adapter-src {a.adapter_src} is not a folder")
    return SoakConfig(
        model_dir=a.model_dir, adapter_src=a.adapter_src, out_dir=a.out_dir,
        duration_s=a.duration, warmup_s=a.warmup, sample_s=a.sample_interval, clients=a.clients,
        max_num_seqs=a.max_num_seqs, max_queued_requests=a.max_queued_requests,
        kv_cache_memory=a.kv_cache_memory, prompt_words=a.prompt_words, max_tokens=a.max_tokens,
        adapter_every_s=a.adapter_every, corrupt_every_s=a.corrupt_every,
        burst_every_s=a.burst_every, request_timeout_s=a.request_timeout, settle_s=a.settle,
        rss_tolerance=a.rss_tolerance, max_rss_slope=a.max_rss_slope, seed=a.seed)


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    print(machine_summary(), file=sys.stderr, flush=True)
    text, ok = run(config)
    print("\n" + text)
    (config.out_dir / "report.md").write_text(text + "\n")
    print("\nsoak " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
