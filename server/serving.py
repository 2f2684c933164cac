"""Serving one API request: its engine requests run side by side (`EngineRun`), admission
(503 while draining, 429 over the queue limit), client disconnects, and the answer as one JSON
body or a server-sent event stream. The route handlers (routes.py) build the jobs and the
assembler; everything here is the same for completions and chat."""

import asyncio
import collections
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from goat_runtime.adapters.format import AdapterError
from goat_runtime.engine.outputs import EngineError
from goat_runtime.engine.sampling import SamplingParams, SamplingParamsError
from server.assemblers import Assembler
from server.auth import tenant
from server.engine import ServingEngine
from server.errors import APIError, error_body, from_exception
from server.metrics import UNRESOLVED, RequestTracker
from server.state import ServerState
from server.tenants import TenantKey

logger = logging.getLogger("server")
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """What a request's `model` names: the base (adapter None) or an adapter."""

    name: str
    adapter: str | None
    loaded: bool

    @property
    def label(self) -> str:
        """Metric label: only the base's name or a loaded adapter's."""
        return self.name if self.adapter is None or self.loaded else UNRESOLVED


def expected(exc: Exception) -> bool:
    """An error that is the request's fault or the engine's verdict, not a bug of ours."""
    return isinstance(exc, APIError | EngineError | SamplingParamsError | AdapterError)


def public_error(state: ServerState, exc: Exception) -> APIError:
    err = from_exception(exc)
    if isinstance(exc, EngineError | AdapterError):
        err.message = state.public_message(err.message)
    return err


@dataclass
class Job:
    """One engine request: one prompt of the API request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class ClientDisconnected(Exception):
    pass


class EngineRun:
    """The engine requests behind one API request (several prompts), each pumped by a task
    into one queue.

    `wait_started` returns once every request produced its first output, so early failures
    (unknown or invalid adapter, prompt too long) become HTTP errors before any byte is sent.
    `close` cancels the pumps; each closes its engine stream, which aborts the request.
    """

    def __init__(self, engine: ServingEngine, jobs: list[Job], adapter: str | None,
                 tenant: str):
        self._engine = engine
        self._jobs = jobs
        self._adapter = adapter
        self._tenant = tenant
        self._queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
        self._buffer: collections.deque[tuple[int, Any, BaseException | None]] = (
            collections.deque())
        self._tasks = [asyncio.create_task(self._pump(i, job)) for i, job in enumerate(jobs)]

    async def _pump(self, index: int, job: Job) -> None:
        try:
            stream = self._engine.generate(job.request_id, job.prompt_ids, job.params,
                                           self._adapter, self._tenant)
            async with contextlib.aclosing(stream):
                async for output in stream:
                    self._queue.put_nowait((index, output, None))
        except Exception as exc:
            self._queue.put_nowait((index, None, exc))
            return
        self._queue.put_nowait((index, None, None))  # this engine request is done

    async def wait_started(self) -> None:
        waiting = set(range(len(self._jobs)))
        while waiting:
            item = await self._queue.get()
            if item[2] is not None:
                raise item[2]
            waiting.discard(item[0])
            self._buffer.append(item)

    async def outputs(self) -> AsyncIterator[tuple[int, Any]]:
        open_jobs = set(range(len(self._jobs)))
        while open_jobs:
            index, output, exc = (self._buffer.popleft() if self._buffer
                                  else await self._queue.get())
            if exc is not None:
                raise exc
            if output is None:
                open_jobs.discard(index)
            else:
                yield index, output

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class OneRequest:
    """EngineRun's interface on an API request with one prompt (the common case): its engine
    stream is read by whichever task asks, without a pump task between them, which would
    cost every output one more turn of the event loop."""

    def __init__(self, engine: ServingEngine, job: Job, adapter: str | None, tenant: str):
        self._stream = engine.generate(job.request_id, job.prompt_ids, job.params, adapter,
                                       tenant)
        self._first: Any = None
        self._closing: asyncio.Task[None] | None = None

    async def wait_started(self) -> None:
        self._first = await anext(self._stream, None)

    async def outputs(self) -> AsyncIterator[tuple[int, Any]]:
        if self._first is not None:
            first, self._first = self._first, None
            yield 0, first
            if first.finished:
                return
        async for output in self._stream:
            yield 0, output

    def close(self) -> None:
        """Close the stream (its engine request is aborted unless it has finished); on the
        event loop, since closing an async generator is a coroutine."""
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._aclose())

    async def _aclose(self) -> None:
        # A task cancelled while reading the stream has closed it already (its cancellation
        # runs first, having been scheduled first); nothing is left to close then.
        with contextlib.suppress(RuntimeError):
            await self._stream.aclose()


def start_run(engine: ServingEngine, jobs: list[Job], adapter: str | None,
              tenant: str) -> EngineRun | OneRequest:
    if len(jobs) == 1:
        return OneRequest(engine, jobs[0], adapter, tenant)
    return EngineRun(engine, jobs, adapter, tenant)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the client goes away first."""
    work = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        finished = work.done()
        if not finished:
            work.cancel()
    if not finished:
        raise ClientDisconnected()
    return work.result()


def _admit(state: ServerState, target: Target, key: TenantKey, seqs: int) -> None:
    """503 while draining; 429 when more than --max-queued-requests sequences would wait."""
    engine = state.engine
    if state.draining or not engine.is_alive:
        state.metrics.refused(target.label, key.id, "rejected")
        raise APIError(503, "The server is shutting down or its engine is not running",
                       code="unavailable", headers={"Retry-After": "5"})
    limit = state.settings.max_queued_requests
    if limit is None:
        return
    max_running = engine.config.max_num_seqs
    queued = max(engine.stats().num_waiting,
                 state.metrics.in_flight_seqs() + seqs - max_running)
    if queued > limit:
        state.metrics.refused(target.label, key.id, "rejected")
        raise APIError(429, f"Too many queued requests (limit {limit}); retry shortly",
                       code="queue_full", headers={"Retry-After": "1"})


class _EventStream(StreamingResponse):
    """A StreamingResponse that always releases its engine requests, even if the stream never
    starts (client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None],
                 headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **headers})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: Any) -> str:
    data = payload.model_dump_json() if hasattr(payload, "model_dump_json") else json.dumps(
        payload)
    return f"data: {data}\n\n"


def _check_not_aborted(assembler: Assembler) -> None:
    if assembler.aborted:
        raise APIError(503, "The request was aborted before it finished (the server is "
                       "shutting down)", code="aborted", headers={"Retry-After": "5"})


async def _events(state: ServerState, request_id: str, run: EngineRun | OneRequest,
                  assembler: Assembler, tracker: RequestTracker,
                  include_usage: bool) -> AsyncIterator[str]:
    outcome = "abort"  # unless it ends otherwise: cancelled by a disconnect
    try:
        for chunk in assembler.initial_chunks():
            yield _sse(chunk)
        async for job, output in run.outputs():
            for chunk in assembler.add(job, output):
                yield _sse(chunk)
        _check_not_aborted(assembler)
        if include_usage:
            yield _sse(assembler.usage_chunk())
        outcome = "success"
    except Exception as exc:
        outcome = "error"
        err = public_error(state, exc)
        if not expected(exc):
            logger.error("error in stream of request %s", request_id, exc_info=exc)
            err.message = f"Internal server error (request id {request_id})"
        yield _sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        run.close()
        tracker.finish(outcome, **assembler.totals())
    yield "data: [DONE]\n\n"


async def _collect(run: EngineRun | OneRequest, assembler: Assembler) -> None:
    async for job, output in run.outputs():
        assembler.add(job, output)
    _check_not_aborted(assembler)


async def serve(request: Request, state: ServerState, target: Target, jobs: list[Job],
                 assembler: Assembler, stream: bool, include_usage: bool) -> Response:
    """Run the engine requests and answer with one JSON body or a server-sent event stream,
    within the key's limits (429) and the server's queue (_admit)."""
    seqs = sum(job.params.n for job in jobs)
    key = tenant(request)
    # Tokens at admission: each prompt plus what its sequences may generate.
    cost = sum(len(job.prompt_ids) + job.params.n * job.params.max_tokens for job in jobs)
    lease = state.limiter.acquire(
        key, cost, on_refused=lambda limit: state.metrics.refused(target.label, key.id,
                                                                  "rejected", limit))
    try:
        _admit(state, target, key, seqs)
    except APIError:
        lease.settle(None)  # never ran: its request and tokens go back
        raise
    tracker = state.metrics.track(target.label, target.adapter, seqs, key.id, lease.settle)
    run = start_run(state.engine, jobs, target.adapter, key.id)
    try:
        await _unless_disconnected(request, run.wait_started())
    except BaseException as exc:  # including cancellation: the engine requests must not leak
        run.close()
        failed = isinstance(exc, Exception) and not isinstance(exc, ClientDisconnected)
        tracker.finish("error" if failed else "abort")
        if isinstance(exc, ClientDisconnected):
            return Response(status_code=499)
        if isinstance(exc, Exception) and expected(exc):
            raise public_error(state, exc) from exc
        raise  # a bug (logged with the request id, answered 500) or a cancellation
    tracker.started(target.name)
    request_id = request.state.request_id
    if stream:
        def release() -> None:
            run.close()
            tracker.finish("abort", **assembler.totals())

        return _EventStream(_events(state, request_id, run, assembler, tracker, include_usage),
                            on_close=release, headers=lease.headers)
    outcome = "abort"
    try:
        await _unless_disconnected(request, _collect(run, assembler))
        outcome = "success"
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        outcome = "error"
        if not expected(exc):
            raise
        raise public_error(state, exc) from exc
    finally:
        run.close()
        tracker.finish(outcome, **assembler.totals())
    return JSONResponse(assembler.response().model_dump(), headers=lease.headers)
