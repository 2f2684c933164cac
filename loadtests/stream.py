"""One streamed request to an OpenAI-compatible server, read to its end: server-sent events whose
`data:` lines carry one JSON chunk each, then `data: [DONE]`.

Two records of it, one reader: `send_request` fills the load generator's RequestRecord (timings
per chunk, error kinds), `stream_request` returns the fault checks' Outcome (status,
Retry-After, how the stream ended, disconnects on purpose); the soak test uses both."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from loadtests.report import RequestRecord

DONE = "[DONE]"  # the payload of a stream's last event


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The payload of each `data:` line, stripped, in order ([DONE] included); blank separators,
    `event:` and `:` comment lines are skipped."""
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


def error_message(body: Any) -> str:
    """The message of an OpenAI-shaped error (`{"error": {"message": ...}}`), of an error event,
    or the body itself as text."""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err)
    return str(body)


def chunk_text(chunk: dict[str, Any]) -> str:
    """Generated text in one streamed chunk's first choice (completions `text` or chat
    `delta`, reasoning included)."""
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or "")


# ---- the load generator's record ------------------------------------------------------------


async def send_request(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    record: RequestRecord,
    timeout_s: float,
    t0: float,
) -> None:
    """Send one streaming request and fill `record` in place (also when cancelled midway).

    Error kinds: http_<status>, stream_error (a `data: {"error": ...}` event), incomplete_stream
    (no [DONE]), bad_json, timeout, connect_error, protocol_error, client_error.
    """
    start = time.perf_counter()
    record.start_s = start - t0
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", url, json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                await _record_refusal(response, record)
                return
            await _record_events(response, record, start)
    except (TimeoutError, httpx.TimeoutException) as exc:
        record.error_kind, record.error = "timeout", f"{type(exc).__name__}: {exc}"[:500]
    except httpx.ConnectError as exc:
        record.error_kind, record.error = "connect_error", str(exc)[:500]
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        record.error_kind, record.error = "protocol_error", f"{type(exc).__name__}: {exc}"[:500]
    except httpx.HTTPError as exc:
        record.error_kind, record.error = "client_error", f"{type(exc).__name__}: {exc}"[:500]


async def _record_refusal(response: httpx.Response, record: RequestRecord) -> None:
    """A non-200 answer: http_<status> and the error's message."""
    raw = (await response.aread()).decode(errors="replace")
    try:
        message = error_message(json.loads(raw))
    except ValueError:
        message = raw
    record.error_kind = f"http_{response.status_code}"
    record.error = message[:500]


async def _record_events(response: httpx.Response, record: RequestRecord, start: float) -> None:
    """Read a 200 answer's stream into `record`: each content chunk's time, the usage, and how
    it ended (e2e time and output tokens, or the error kind)."""
    done = False
    events = 0
    last = start
    async for data in sse_data(response):
        events += 1
        if data == DONE:
            done = True
            break
        chunk = _chunk_or_error(data, record)
        if chunk is None:
            return
        if chunk_text(chunk):
            now = time.perf_counter()
            if record.ttft_s is None:
                record.ttft_s = now - start
            else:
                record.itl_s.append(now - last)
            last = now
            record.chunks += 1
        _record_usage(chunk.get("usage"), record)
    if not done:
        record.error_kind = "incomplete_stream"
        record.error = (
            "the stream ended without data: [DONE]"
            if events
            else "no SSE `data:` events in the response (is streaming supported?)"
        )
        return
    record.e2e_s = time.perf_counter() - start
    if not record.tokens_from_usage:
        record.output_tokens = record.chunks


def _chunk_or_error(data: str, record: RequestRecord) -> dict[str, Any] | None:
    """One event's JSON chunk, or None with the error recorded (bad_json, stream_error)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        record.error_kind, record.error = "bad_json", data[:500]
        return None
    if not isinstance(chunk, dict):
        record.error_kind, record.error = "bad_json", data[:500]
        return None
    if chunk.get("error") is not None:
        record.error_kind = "stream_error"
        record.error = error_message(chunk)[:500]
        return None
    return chunk


def _record_usage(usage: Any, record: RequestRecord) -> None:
    """The token counts of a chunk's `usage`, when it has one."""
    if isinstance(usage, dict):
        if usage.get("completion_tokens") is not None:
            record.output_tokens = int(usage["completion_tokens"])
            record.tokens_from_usage = True
        if usage.get("prompt_tokens") is not None:
            record.prompt_tokens = int(usage["prompt_tokens"])


# ---- the fault checks' record --------------------------------------------


@dataclass
class Outcome:
    """One streaming request as the checks see it; times in seconds from its start."""

    adapter: str
    status: int | None = None
    head_s: float | None = None  # response headers received
    end_s: float | None = None
    retry_after: str | None = None
    ttft_s: float | None = None
    chunks: int = 0
    finish_reason: str | None = None
    done: bool = False  # saw data: [DONE]
    error_event: str | None = None  # message of a `data: {"error": ...}` event
    error_body: str | None = None  # body of a non-200 answer
    exception: str | None = None  # transport failure or timeout
    disconnected: bool = False  # we closed it on purpose

    @property
    def verdict(self) -> str:
        """complete, error_event, lost (an accepted stream cut or hung), refused_<status>,
        transport (no status at all), disconnected (by us)."""
        if self.disconnected:
            return "disconnected"
        if self.status is None:
            return "transport"
        if self.status != 200:
            return f"refused_{self.status}"
        if self.done and self.error_event is not None:
            return "error_event"
        if self.done and self.finish_reason is not None:
            return "complete"
        return "lost"


def completion_body(adapter: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": adapter, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }


async def stream_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], timeout_s: float,
    stop_after_chunks: int | None = None, stop_after_s: float | None = None,
) -> Outcome:
    """POST a streaming completion and record how it ended. With `stop_after_chunks` or
    `stop_after_s`, close the connection after that many content chunks or seconds."""
    out = Outcome(body["model"])
    start = time.perf_counter()
    limit = timeout_s if stop_after_s is None else min(timeout_s, stop_after_s)
    try:
        async with asyncio.timeout(limit), client.stream(
                "POST", url + "/v1/completions", json=body) as response:
            out.status = response.status_code
            out.head_s = time.perf_counter() - start
            out.retry_after = response.headers.get("retry-after")
            if response.status_code != 200:
                out.error_body = (await response.aread()).decode(errors="replace")[:4000]
                return out
            # Returning early leaves the block, which closes the connection mid-stream.
            await _read_outcome(response, out, start, stop_after_chunks)
    except TimeoutError:
        if stop_after_s is not None and (time.perf_counter() - start) >= stop_after_s - 0.01:
            out.disconnected = True
        else:
            out.exception = f"timeout after {timeout_s:g} s"
    except (httpx.HTTPError, ValueError) as exc:
        out.exception = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        out.end_s = time.perf_counter() - start
    return out


async def _read_outcome(response: httpx.Response, out: Outcome, start: float,
                        stop_after_chunks: int | None) -> None:
    """Read a 200 answer's stream into `out`, up to [DONE] or `stop_after_chunks` content
    chunks (then `out.disconnected`). A chunk that is not JSON raises ValueError."""
    async for data in sse_data(response):
        if data == DONE:
            out.done = True
            return
        chunk = json.loads(data)
        if chunk.get("error") is not None:
            out.error_event = error_message(chunk)
            continue
        if chunk_text(chunk):
            out.chunks += 1
            if out.ttft_s is None:
                out.ttft_s = time.perf_counter() - start
        for choice in chunk.get("choices") or []:
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
        if stop_after_chunks is not None and out.chunks >= stop_after_chunks:
            out.disconnected = True
            return


def new_client() -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(600.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        trust_env=False,
    )
