"""Per-key limits (server/limits.py): token buckets for requests and tokens per minute, the
concurrency cap, tokens reserved at admission and settled on completion, and OpenAI's 429 with
Retry-After and the x-ratelimit-* headers (also on successful responses), seen through the
official client."""

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest

from server.errors import APIError
from server.limits import RateLimiter, duration
from server.state import Settings
from server.tenants import Limits, TenantKey
from tests.server.conftest import LiveServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def key(**limits: int) -> TenantKey:
    return TenantKey("k", b"", limits=Limits(**limits))


def refused(limiter: RateLimiter, k: TenantKey, tokens: int) -> APIError:
    with pytest.raises(APIError) as info:
        limiter.acquire(k, tokens)
    assert info.value.status == 429
    return info.value


def test_requests_per_minute_refill_continuously() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    k = key(requests_per_minute=3)
    leases = [limiter.acquire(k, 10) for _ in range(3)]
    assert leases[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert leases[-1].headers["x-ratelimit-limit-requests"] == "3"
    assert leases[-1].headers["x-ratelimit-reset-requests"] == "1m0s"  # 3 requests at 3/min
    error = refused(limiter, k, 10)
    assert error.headers is not None
    assert error.headers["Retry-After"] == "20" and error.headers["retry-after-ms"] == "20000"
    assert "x-ratelimit-limit-tokens" not in error.headers  # no token limit: no token headers
    clock.now += 19.9
    refused(limiter, k, 10)
    clock.now += 0.1
    assert limiter.acquire(k, 10).headers["x-ratelimit-remaining-requests"] == "0"


def test_tokens_reserved_then_settled() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    k = key(tokens_per_minute=600)
    lease = limiter.acquire(k, 500)  # prompt + max_tokens
    assert lease.headers["x-ratelimit-remaining-tokens"] == "100"
    error = refused(limiter, k, 200)
    assert error.headers is not None and error.headers["Retry-After"] == "10"  # 100 at 10/s
    lease.settle(120)  # it used 120: 380 go back
    lease.settle(0)  # once only
    assert limiter.acquire(k, 480).headers["x-ratelimit-remaining-tokens"] == "0"
    too_big = refused(limiter, k, 601)
    assert too_big.headers is not None and "Retry-After" not in too_big.headers
    assert "Request too large" in too_big.message


def test_concurrency_and_refused_by_the_queue() -> None:
    limiter = RateLimiter(Clock())
    k = key(concurrent_requests=2, requests_per_minute=10)
    first, second = limiter.acquire(k, 1), limiter.acquire(k, 1)
    error = refused(limiter, k, 1)
    assert "concurrent" in error.message and error.headers is not None
    assert error.headers["Retry-After"] == "1"
    first.settle(1)
    third = limiter.acquire(k, 1)
    assert third.headers["x-ratelimit-remaining-requests"] == "7"
    third.settle(None)  # never ran (the server's queue refused it): its request goes back
    second.settle(None)
    assert limiter.acquire(k, 1).headers["x-ratelimit-remaining-requests"] == "8"


def test_no_limits_no_headers() -> None:
    limiter = RateLimiter(Clock())
    leases = [limiter.acquire(key(), 10**9) for _ in range(100)]
    assert leases[-1].headers == {}


@pytest.mark.parametrize(("seconds", "text"), [(0.0201, "21ms"), (1.5, "1.5s"), (59.0, "59s"),
                                                (360.0, "6m0s"), (61.25, "1m1.25s")])
def test_reset_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# ---- through the server --------------------------------------------------------------------

def key_file(tmp_path: Path, limits: str) -> Path:
    path = tmp_path / "keys.toml"
    sha = hashlib.sha256(b"tight").hexdigest()
    path.write_text(f'[[keys]]\nid = "tight"\nsha256 = "{sha}"\nmodels = ["*"]\n'
                    f"limits = {{{limits}}}\n")
    return path


def test_429_with_openais_headers_through_the_client(
        tmp_path: Path, fake_server: Callable[..., LiveServer]) -> None:
    live = fake_server(Settings(api_keys_file=key_file(
        tmp_path, "requests_per_minute = 2, tokens_per_minute = 1000")))
    client = live.client(api_key="tight")
    raw = client.completions.with_raw_response.create(model="goat0", prompt="w5 w6",
                                                      max_tokens=5)
    # 2 prompt tokens + 5 reserved, 3 generated: 5 of the 1000 used.
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-limit-tokens"] == "1000"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "993"  # at admission
    assert raw.parse().usage.total_tokens == 5
    stream = client.completions.with_raw_response.create(
        model="goat0", prompt="w5 w6", max_tokens=5, stream=True)
    assert stream.headers["x-ratelimit-remaining-requests"] == "0"
    # The first request's 2 unused tokens came back when it ended (and the bucket refills at
    # 1000 a minute meanwhile, up to full).
    assert 993 - 7 + 2 <= int(stream.headers["x-ratelimit-remaining-tokens"]) <= 993
    list(stream.parse())
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="goat0", prompt="w5", max_tokens=5)
    headers = info.value.response.headers
    assert info.value.status_code == 429 and info.value.code == "rate_limit_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 30
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")
    metrics = live.app.state.server.metrics
    assert metrics.key_rate_limited.labels("tight", "requests")._value.get() == 1
    assert metrics.key_requests.labels("tight", "rejected")._value.get() == 1
    assert metrics.key_rate_limited.labels("tight", "tokens")._value.get() == 0


def test_concurrent_requests_limit(tmp_path: Path,
                                   fake_server: Callable[..., LiveServer]) -> None:
    live = fake_server(Settings(api_keys_file=key_file(tmp_path, "concurrent_requests = 2")),
                       step_delay=0.3)

    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=live.url, timeout=30,
                                     headers={"Authorization": "Bearer tight"}) as http:
            body = {"model": "goat0", "prompt": "w5", "max_tokens": 3}
            slow = [asyncio.create_task(http.post("/v1/completions", json=body))
                    for _ in range(2)]
            await asyncio.sleep(0.3)
            extra = await http.post("/v1/completions", json=body)
            statuses = [extra.status_code] + [(await t).status_code for t in slow]
            statuses.append((await http.post("/v1/completions", json=body)).status_code)
            return statuses

    assert asyncio.run(run()) == [429, 200, 200, 200]
