"""Smoke test of the load tooling against the real server: goat-serve in a subprocess on the
goat-peft-tiny fixture, a few seconds of load from the load generator over its adapters and the
base, zero errors and sensible records, then a clean stop. Seconds long; no vLLM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.common import GoatServeConfig, ServerProcess, goat_serve, metric_sum, scrape
from loadtests.loadgen import LoadConfig, LoadResult, run_load
from loadtests.workload import LengthDist

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"
MODELS = ["goat0", "goat1", "lora0", "base"]  # "base" is the fixture base folder's name


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("smoke")
    config = GoatServeConfig(
        FIXTURE / "base", FIXTURE / "adapters", max_loras=4, max_cpu_adapters=4,
        max_num_seqs=16, kv_cache_memory="16MiB", shutdown_timeout_s=5.0, log_level="info",
    )
    proc = goat_serve(config, tmp / "server.log")
    # Static GOAT terms are cached under GOAT_CACHE_DIR: keep the test's out of the user's cache.
    proc.env["GOAT_CACHE_DIR"] = str(tmp / "cache")
    proc.start()
    try:
        proc.wait_healthy(timeout_s=60)
        yield proc
    finally:
        proc.stop(timeout_s=15)


def run(config: LoadConfig) -> LoadResult:
    return asyncio.run(run_load(config))


def check_records(result: LoadResult, models: list[str]) -> None:
    s = result.summary
    assert s.num_errors == 0, (s.errors_by_kind, s.error_examples)
    assert s.num_ok == s.num_requests >= len(models)
    assert set(s.requests_by_adapter) == set(models)
    for r in result.records:
        assert r.status == 200
        assert r.tokens_from_usage and r.output_tokens == r.max_tokens  # ignore_eos
        assert r.prompt_tokens is not None and r.prompt_tokens > 0
        assert r.ttft_s is not None and r.e2e_s is not None
        assert 0 < r.ttft_s <= r.e2e_s < 30
        assert r.start_s >= 0
        assert all(gap >= 0 for gap in r.itl_s)
    assert s.output_token_throughput > 0
    assert s.ttft_ms.count == s.num_ok and s.tpot_ms.count > 0
    assert s.ttft_ms.percentiles["p50"] <= s.ttft_ms.percentiles["p99"]


@pytest.mark.slow
def test_open_loop_completions(server: ServerProcess) -> None:
    result = run(LoadConfig(
        models=MODELS, url=server.url, rate=20.0, concurrency=8, duration_s=3.0,
        adapter_dist="round-robin", prompt_len=LengthDist("uniform", 4, 24),
        output_len=LengthDist("uniform", 2, 12), ignore_eos=True, drain_timeout_s=20.0,
        request_timeout_s=20.0,
    ))
    check_records(result, MODELS)
    metrics = scrape(server.url)
    for model in MODELS:
        served = metric_sum(metrics, "goat_requests_total", adapter=model, outcome="success")
        assert served >= result.summary.requests_by_adapter[model]
    assert metric_sum(metrics, "goat_num_requests_running") == 0
    assert metric_sum(metrics, "goat_kv_cache_usage_perc") == 0


def test_closed_loop_chat(server: ServerProcess) -> None:
    result = run(LoadConfig(
        models=MODELS, url=server.url, endpoint="chat", concurrency=4, num_requests=12,
        adapter_dist="uniform", prompt_len=LengthDist("fixed", 8),
        output_len=LengthDist("fixed", 6), ignore_eos=True, drain_timeout_s=20.0,
        request_timeout_s=20.0, seed=3,
    ))
    check_records(result, MODELS)


def test_server_stops_cleanly(server: ServerProcess) -> None:
    assert server.alive()
    # uvicorn re-raises the SIGTERM it handled once it has shut down, hence -SIGTERM.
    assert server.stop(timeout_s=15) in (0, -signal.SIGTERM), server.log_tail()
    log = server.log_path.read_text()
    assert "Finished server process" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]
