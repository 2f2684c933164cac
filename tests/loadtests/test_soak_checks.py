"""The soak test's pass/fail analysis on synthetic samples and answers (fast, no server)."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest

from loadtests.common import proc_sample
from loadtests.soak import prepare_adapters
from loadtests.soak_checks import (
    WANTED,
    Result,
    Sample,
    body_problem,
    evaluate,
    http_verdict,
    kv_return,
    linear_fit,
    log_check,
    no_growth,
    outcome_result,
    request_checks,
    rss_return,
    rss_trend,
)
from loadtests.stream import Outcome

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"


def series(rss: list[float], phase: str = "traffic", t0: float = 0.0, dt: float = 5.0,
           fds: int = 10, threads: int = 20, kv: int | None = 0) -> list[Sample]:
    return [Sample(t0 + i * dt, phase, r, fds, threads, kv, 0.0 if kv == 0 else None, 0, 0, i)
            for i, r in enumerate(rss)]


def run_of(traffic_rss: list[float], base: float = 1000.0, end: float | None = None,
           dt: float = 5.0) -> list[Sample]:
    """Baseline samples, traffic samples with the given RSS, end samples (default: the last)."""
    n = len(traffic_rss)
    last = traffic_rss[-1] if end is None else end
    return (series([base] * 3, "baseline", 0.0, dt) + series(traffic_rss, "traffic", 15.0, dt)
            + series([last] * 3, "end", 15.0 + n * dt, dt))


def noisy(n: int, slope_mb_min: float, sigma: float, seed: int = 0, dt: float = 5.0,
          start: float = 1000.0) -> list[float]:
    rng = random.Random(seed)
    return [start + slope_mb_min * i * dt / 60 + rng.gauss(0, sigma) for i in range(n)]


def test_linear_fit_exact_and_noisy() -> None:
    slope, se = linear_fit([0, 1, 2, 3], [1, 3, 5, 7])
    assert slope == pytest.approx(2.0) and se == pytest.approx(0.0, abs=1e-12)
    assert linear_fit([0, 1], [0, 1])[1] == math.inf  # no residual degree of freedom
    assert linear_fit([2, 2, 2], [1, 2, 3]) == (0.0, math.inf)
    xs = [i / 12 for i in range(240)]  # 20 minutes at 5 s, in minutes
    ys = noisy(240, 3.0, 20.0, seed=1)
    slope, se = linear_fit(xs, ys)
    assert abs(slope - 3.0) < 3 * se and 0 < se < 2


def test_rss_trend_flat_noise_passes_and_a_leak_fails() -> None:
    # 20 minutes of traffic at 5 s, 20 MB of noise around a flat level: passes.
    assert rss_trend(run_of(noisy(240, 0.0, 20.0, seed=2)), 1.0).ok
    # 3 MB/min (4.3 GB a day) under the same noise: caught.
    check = rss_trend(run_of(noisy(240, 3.0, 20.0, seed=3)), 1.0)
    assert not check.ok and "slope +" in check.detail
    # A noise-free creep just above the limit fails too; just below passes.
    assert not rss_trend(run_of(noisy(240, 1.2, 0.0)), 1.0).ok
    assert rss_trend(run_of(noisy(240, 0.8, 0.0)), 1.0).ok


def test_rss_trend_ignores_growth_that_stops_in_the_first_half() -> None:
    grow = [1000.0 + 2.0 * i for i in range(100)] + [1200.0] * 140  # pools filling, then flat
    assert rss_trend(run_of(grow), 1.0).ok
    # The same growth in the second half is a trend.
    assert not rss_trend(run_of([1000.0] * 140 + [1000.0 + 2.0 * i for i in range(100)]), 1.0).ok


def test_rss_trend_needs_samples() -> None:
    check = rss_trend(run_of([1000.0, 1000.0, 1000.0]), 1.0)
    assert not check.ok and "at least 4" in check.detail


def test_rss_return_within_tolerance() -> None:
    assert rss_return(run_of([1040.0] * 10, end=1040.0), 0.05).ok
    check = rss_return(run_of([1060.0] * 10, end=1060.0), 0.05)
    assert not check.ok and "+6.0%" in check.detail
    assert rss_return(run_of([900.0] * 10, end=900.0), 0.05).ok  # a drop is no leak
    assert not rss_return(series([1000.0] * 5), 0.05).ok  # no baseline or end samples


def test_kv_return() -> None:
    assert kv_return(run_of([1000.0] * 5)).ok
    samples = run_of([1000.0] * 5)
    samples[-1].kv_blocks = 1
    assert not kv_return(samples).ok
    samples[-1].kv_blocks = None  # /metrics did not answer: not proof of zero
    assert not kv_return(samples).ok
    assert not kv_return(series([1000.0] * 5)).ok


def test_no_growth_of_fds_and_threads() -> None:
    samples = run_of([1000.0] * 20)
    for i, s in enumerate(s for s in samples if s.phase == "traffic"):
        s.fds = 30 if i == 3 else 10  # a burst of connections early on
    assert no_growth(samples, "fds").ok
    traffic = [s for s in samples if s.phase == "traffic"]
    for i, s in enumerate(traffic):
        s.threads = 20 + i  # one more thread per sample, never given back
    for s in samples:
        if s.phase == "end":
            s.threads = traffic[-1].threads  # no growth after the traffic: still the leak's
    check = no_growth(samples, "threads")
    assert not check.ok and "peak until mid-traffic 29, end 39" in check.detail, check.detail


def all_wanted() -> list[Result]:
    return [Result(kind, "m", 0.0, verdict) for kind, verdict in WANTED.items()]


def test_request_checks() -> None:
    assert all(c.ok for c in request_checks(all_wanted()))
    bad = [*all_wanted(), Result("stream", "goat0", 12.0, "failure", 500, "HTTP 500: boom")]
    checks = request_checks(bad)
    assert not checks[0].ok and "HTTP 500: boom" in checks[0].detail and checks[1].ok
    missing = [r for r in all_wanted() if r.kind != "burst"]
    checks = request_checks(missing)
    assert checks[0].ok and not checks[1].ok and "burst -> refused" in checks[1].detail


def test_log_check() -> None:
    assert log_check("2026-12-03 INFO server: ok\nWARNING x\n").ok
    check = log_check("a\n2026-12-03 08:00:00 ERROR server: error in stream of request x\n")
    assert not check.ok and "error in stream" in check.detail
    assert not log_check("Traceback (most recent call last):\n").ok


def test_evaluate_combines_every_check() -> None:
    samples = run_of(noisy(50, 0.0, 1.0))
    checks = evaluate(samples, all_wanted(), "", True, 0.05, 1.0)
    assert len(checks) == 9 and all(c.ok for c in checks), checks
    checks = evaluate(samples, all_wanted(), "", False, 0.05, 1.0)
    assert [c.name for c in checks if not c.ok] == ["/health at the end"]


def error_body(message: str = "nope") -> str:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": None}})


def test_http_verdict() -> None:
    assert http_verdict("stream", 429, error_body("full"), "1") == ("refused", "full")
    assert http_verdict("burst", 429, error_body(), None)[0] == "failure"  # no Retry-After
    assert http_verdict("load", 429, error_body(), "1")[0] == "failure"  # admin: no queue
    assert http_verdict("load_corrupt", 400, error_body("bad file"), None) == (
        "expected_error", "bad file")
    assert http_verdict("after_unload", 404, error_body(), None)[0] == "expected_error"
    assert http_verdict("stream", 400, error_body(), None)[0] == "failure"
    assert http_verdict("completion", 500, error_body("Internal"), None)[0] == "failure"
    verdict, detail = http_verdict("load_corrupt", 400, "Bad Request", None)
    assert verdict == "failure" and "not an OpenAI-shaped error" in detail


def completion(texts: list[str], finish: str = "length", prompt_tokens: int = 3,
               completion_tokens: int = 2, tokens: int | None = None) -> str:
    choices = [{"index": i, "text": t, "finish_reason": finish,
                "logprobs": {"tokens": ["x"] * (tokens or 0)}} for i, t in enumerate(texts)]
    return json.dumps({"choices": choices, "usage": {"prompt_tokens": prompt_tokens,
                                                     "completion_tokens": completion_tokens}})


def test_body_problem() -> None:
    assert body_problem("completion", completion(["a"]), 1, "p") is None
    assert "2 choices, 3 asked" in (body_problem("n3", completion(["a", "b"]), 3, "p") or "")
    assert "finish_reasons" in (body_problem("completion", completion(["a"], None), 1, "p") or "")
    assert "without choices" in (body_problem("completion", "{}", 1, "p") or "")
    assert body_problem("echo_logprobs", completion(["hi there"], tokens=5), 1, "hi") is None
    assert "does not start" in (body_problem("echo_logprobs", completion(["there"], tokens=5),
                                             1, "hi") or "")
    assert "4 tokens" in (body_problem("echo_logprobs", completion(["hi x"], tokens=4), 1, "hi")
                          or "")
    chat = json.dumps({"choices": [{"message": {"content": None}, "finish_reason": "stop"}],
                       "usage": {}})
    assert "message content" in (body_problem("chat", chat, 1, "") or "")


def test_outcome_result() -> None:
    done = Outcome("goat0", status=200, done=True, finish_reason="length", end_s=1.0)
    assert outcome_result("stream", 0.0, done).verdict == "ok"
    cut = Outcome("goat0", status=200, chunks=3)
    assert outcome_result("stream", 0.0, cut).verdict == "failure"
    event = Outcome("goat0", status=200, done=True, error_event="The engine failed")
    r = outcome_result("stream", 0.0, event)
    assert r.verdict == "failure" and "The engine failed" in r.detail
    dropped = Outcome("goat0", status=200, chunks=2, disconnected=True)
    assert outcome_result("disconnect", 0.0, dropped).verdict == "disconnected"
    refused = Outcome("goat0", status=429, retry_after="1", error_body=error_body())
    assert outcome_result("stream", 0.0, refused).verdict == "refused"
    gone = Outcome("soak-dyn-0", status=404, error_body=error_body())
    assert outcome_result("dyn_request", 0.0, gone).verdict == "expected_error"
    assert outcome_result("stream", 0.0, Outcome("x", exception="timeout")).verdict == "failure"


def test_prepare_adapters(tmp_path: Path) -> None:
    names = prepare_adapters(FIXTURE / "adapters", tmp_path / "a")
    assert names == ["goat0", "goat1", "lora0"]
    good = (FIXTURE / "adapters" / "goat0" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "a" / "goat1" / "adapter_model.safetensors").read_bytes() == (
        FIXTURE / "adapters" / "goat1" / "adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a" / "pool").iterdir()) == [
        "dyn-0", "dyn-1", "dyn-2"]
    cut = (tmp_path / "a" / "corrupt-truncated" / "adapter_model.safetensors").read_bytes()
    assert cut == good[: len(good) // 2]
    header = (tmp_path / "a" / "corrupt-header" / "adapter_model.safetensors").read_bytes()
    assert len(header) == len(good) and header[8:72] == b"\xff" * 64 and header[:8] == good[:8]


def test_proc_sample_of_this_process() -> None:
    s = proc_sample(os.getpid())
    assert s.rss_bytes > 10 * 2**20 and s.threads >= 1 and s.fds >= 3
    with pytest.raises(OSError):
        proc_sample(2**22 + 1)  # above the kernel's pid_max: never a process
