"""Per-key limits: requests per minute, tokens per minute and concurrent requests, answered as
OpenAI does: 429 with `Retry-After` (and `retry-after-ms`, which the official client reads
first) and the `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers, which are also
sent on successful responses.

Both per-minute limits are token buckets holding a minute's allowance and refilling
continuously (limit / 60 per second), so a key may burst up to its limit and then runs at its
rate. A request takes one request and, for tokens, its prompt plus `max_tokens` (per sequence)
at admission; when it ends, what it did not use (the real prompt plus generated count) goes
back (`Lease.settle`)."""

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.errors import APIError
from server.tenants import Limits, TenantKey


class _Bucket:
    def __init__(self, capacity: int, now: float):
        self.capacity = capacity
        self.level = float(capacity)
        self.stamp = now

    def refill(self, capacity: int, now: float) -> None:
        self.capacity = capacity  # a reload may change it: the level is kept, clipped
        rate = capacity / 60.0
        self.level = min(float(capacity), self.level + (now - self.stamp) * rate)
        self.stamp = now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` is available (0 if it is now)."""
        return max(0.0, (amount - self.level) * 60.0 / self.capacity)

    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) * 60.0 / self.capacity


def duration(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1.5s', '6m0s'."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{text}s" if minutes else f"{text}s"


@dataclass
class _KeyState:
    requests: _Bucket | None = None
    tokens: _Bucket | None = None
    in_flight: int = 0


class Lease:
    """One admitted request's share of its key's limits; `settle` once it ends."""

    def __init__(self, limiter: "RateLimiter", key_id: str, tokens: int,
                 headers: dict[str, str]):
        self._limiter = limiter
        self.key_id = key_id
        self.tokens = tokens
        self.headers = headers  # the x-ratelimit-* headers at admission
        self._open = True

    def settle(self, used_tokens: int | None = None) -> None:
        """Release the concurrency slot and give back the tokens not used; None: the request
        never reached the engine (refused by the queue), so its request is given back too."""
        if self._open:
            self._open = False
            self._limiter._settle(self, used_tokens)


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._states: dict[str, _KeyState] = {}

    def _state(self, key_id: str, limits: Limits, now: float) -> _KeyState:
        state = self._states.setdefault(key_id, _KeyState())
        for name, limit in (("requests", limits.requests_per_minute),
                            ("tokens", limits.tokens_per_minute)):
            bucket = getattr(state, name)
            if limit is None:
                setattr(state, name, None)
            elif bucket is None:
                setattr(state, name, _Bucket(limit, now))
            else:
                bucket.refill(limit, now)
        return state

    def acquire(self, key: TenantKey, tokens: int,
                on_refused: Callable[[str], None] | None = None) -> Lease:
        """Admit one request costing `tokens` under `key`'s limits, or raise a 429 APIError with
        Retry-After and the rate-limit headers (`on_refused` gets the limit's name first)."""
        limits = key.limits
        with self._lock:
            now = self._clock()
            state = self._state(key.id, limits, now)
            refused, wait = None, 0.0
            if state.tokens is not None and tokens > state.tokens.capacity:
                refused = "tokens"
                message = (f"Request too large for key '{key.id}': it may use up to "
                           f"{state.tokens.capacity} tokens per minute, this request needs "
                           f"{tokens} (prompt plus max_tokens); ask for fewer tokens")
                wait = math.inf
            elif state.requests is not None and state.requests.level < 1:
                refused, wait = "requests", state.requests.wait_for(1)
                message = (f"Rate limit reached for key '{key.id}': "
                           f"{state.requests.capacity} requests per minute")
            elif state.tokens is not None and state.tokens.level < tokens:
                refused, wait = "tokens", state.tokens.wait_for(tokens)
                message = (f"Rate limit reached for key '{key.id}': "
                           f"{state.tokens.capacity} tokens per minute (this request needs "
                           f"{tokens}: prompt plus max_tokens)")
            elif (limits.concurrent_requests is not None
                  and state.in_flight >= limits.concurrent_requests):
                refused, wait = "concurrent", 1.0
                message = (f"Too many concurrent requests for key '{key.id}' (limit "
                           f"{limits.concurrent_requests})")
            if refused is None:
                if state.requests is not None:
                    state.requests.level -= 1
                if state.tokens is not None:
                    state.tokens.level -= tokens
                state.in_flight += 1
            headers = self._headers(state)
        if refused is not None:
            if on_refused is not None:
                on_refused(refused)
            if math.isfinite(wait):
                headers["Retry-After"] = str(max(1, math.ceil(wait)))
                headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
            raise APIError(429, message, code="rate_limit_exceeded", headers=headers)
        return Lease(self, key.id, tokens, headers)

    @staticmethod
    def _headers(state: _KeyState) -> dict[str, str]:
        headers = {}
        for name, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{name}"] = str(bucket.capacity)
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
                headers[f"x-ratelimit-reset-{name}"] = duration(bucket.reset())
        return headers

    def _settle(self, lease: Lease, used_tokens: int | None) -> None:
        with self._lock:
            state = self._states.get(lease.key_id)
            if state is None:
                return
            state.in_flight = max(0, state.in_flight - 1)
            if state.tokens is not None:
                unused = lease.tokens - (used_tokens or 0)
                state.tokens.level = min(state.tokens.capacity, state.tokens.level + max(0, unused))
            if used_tokens is None and state.requests is not None:
                state.requests.level = min(state.requests.capacity, state.requests.level + 1)

    def forget(self, keep: set[str]) -> None:
        """Drop the state of keys no longer in the key file."""
        with self._lock:
            for key_id in set(self._states) - keep:
                del self._states[key_id]
