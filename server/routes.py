"""The HTTP routes: OpenAI's completions, chat completions and models; vLLM's LoRA load and
unload; health and metrics."""

import asyncio
import collections
import contextlib
import json
import logging
import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from goat_runtime.adapters.format import AdapterError
from goat_runtime.adapters.store import FetchError, check_location, is_url, within_url
from goat_runtime.engine.outputs import EngineError
from goat_runtime.engine.sampling import SamplingParams, SamplingParamsError
from server import openapi
from server.errors import APIError, error_body, error_response, from_exception
from server.metrics import UNRESOLVED, RequestTracker
from server.prompts import completion_prompts, render_chat
from server.protocol import (
    ChatAssembler,
    ChatCompletionRequest,
    CompletionAssembler,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    UnloadLoRAAdapterRequest,
    check_unicode,
    valid_name,
)

if TYPE_CHECKING:
    from server.app import ServerState

logger = logging.getLogger("server")
router = APIRouter()
T = TypeVar("T")


def _state(request: Request) -> "ServerState":
    return request.app.state.server


# ---- models and adapters -------------------------------------------------------------------

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


def _resolve_model(state: "ServerState", name: str) -> Target:
    engine = state.engine
    if name == engine.base_name:
        return Target(name, None, True)
    if valid_name(name):
        info = engine.adapter_info(name)
        if info is not None:
            return Target(name, name, info.loaded)
    shown = f" '{name}'" if valid_name(name) else ""
    raise APIError(404, f"The model{shown} does not exist. GET /v1/models lists the base model "
                   "and the adapters.", param="model", code="model_not_found")


def _public_message(state: "ServerState", message: str) -> str:
    """An engine or adapter error message without the server's own directory paths."""
    for root in state.adapter_roots():
        message = message.replace(str(root) + os.sep, "").replace(str(root), "<adapter-root>")
    return message


def _expected(exc: Exception) -> bool:
    """An error that is the request's fault or the engine's verdict, not a bug of ours."""
    return isinstance(exc, APIError | EngineError | SamplingParamsError | AdapterError)


def _public_error(state: "ServerState", exc: Exception) -> APIError:
    err = from_exception(exc)
    if isinstance(exc, EngineError | AdapterError):
        err.message = _public_message(state, err.message)
    return err


def _model_cards(state: "ServerState") -> list[ModelCard]:
    engine = state.engine
    base, max_len = engine.base_name, engine.max_model_len
    return [ModelCard(id=base, root=base, max_model_len=max_len)] + [
        ModelCard(id=info.name, root=info.name, parent=base, kind=info.kind, loaded=info.loaded,
                  location=info.location, max_model_len=max_len)
        for info in sorted(engine.list_adapters(), key=lambda a: a.name)]


@router.get("/v1/models", responses=openapi.MODELS)
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse(ModelList(data=_model_cards(_state(request))).model_dump())


@router.get("/v1/models/{model_id}", responses=openapi.MODEL)
async def get_model(model_id: str, request: Request) -> JSONResponse:
    state = _state(request)
    target = _resolve_model(state, model_id)  # 404 if unknown
    card = next(c for c in _model_cards(state) if c.id == target.name)
    return JSONResponse(card.model_dump())


def _check_adapter_name(state: "ServerState", name: str) -> None:
    if not valid_name(name):
        raise APIError(400, "lora_name must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
                       param="lora_name", code="invalid_name")
    if name == state.engine.base_name:
        raise APIError(400, f"'{name}' is the base model's name", param="lora_name",
                       code="invalid_name")


def _adapter_path(state: "ServerState", raw: str) -> Path:
    """The adapter folder `raw` names, after symlinks; it must lie inside the adapter directory
    or an allowed root. Relative paths are taken from the adapter directory."""
    roots = state.adapter_roots()
    if not raw or "\x00" in raw or not roots:
        raise APIError(400, "lora_path must name a folder inside the adapter directory "
                       "(--adapter-dir) or an allowed root (--allowed-adapter-root)",
                       param="lora_path", code="invalid_path")
    check_unicode("lora_path", raw)
    path = Path(raw)
    if not path.is_absolute():
        path = roots[0] / path
    resolved = Path(os.path.realpath(path))  # not strict: never raises for what it can't read
    if not any(resolved.is_relative_to(root) for root in roots):
        raise APIError(400, "lora_path is outside the adapter directory and the allowed roots",
                       param="lora_path", code="invalid_path")
    try:
        is_dir = stat.S_ISDIR(resolved.stat().st_mode)
    except (FileNotFoundError, NotADirectoryError):
        is_dir = False
    except OSError as exc:  # a name too long, a loop of links, no permission: the path's fault
        raise APIError(400, f"lora_path cannot be used: {exc.strerror or 'invalid path'}",
                       param="lora_path", code="invalid_path") from exc  # (no server paths)
    if not is_dir:
        raise APIError(404, "No adapter found at lora_path", param="lora_path",
                       code="adapter_not_found")
    return resolved


def _remote_adapter(state: "ServerState", raw: str) -> str:
    """The s3:// or hf:// URL `raw`, which must lie under a URL adapter directory or allowed
    root (a client must not make the server fetch from anywhere its credentials reach)."""
    check_unicode("lora_path", raw)
    try:
        url = check_location(raw)
    except ValueError as exc:
        raise APIError(400, str(exc), param="lora_path", code="invalid_path") from exc
    roots = [str(r) for r in (getattr(state.engine.config, "adapter_dir", None),
                              *state.settings.allowed_adapter_roots) if r and is_url(r)]
    if not any(within_url(str(url), root) for root in roots):
        raise APIError(400, "lora_path is outside the adapter directory and the allowed roots",
                       param="lora_path", code="invalid_path")
    return str(url)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             responses=openapi.LOAD_ADAPTER)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    state = _state(request)
    _check_adapter_name(state, body.lora_name)
    path = (_remote_adapter(state, body.lora_path) if is_url(body.lora_path)
            else _adapter_path(state, body.lora_path))
    try:
        await state.engine.load_adapter(body.lora_name, path)
    except FetchError as exc:
        status, code = (404, "adapter_not_found") if exc.reason == "not_found" else (
            400, "invalid_adapter")
        raise APIError(status, str(exc), param="lora_path", code=code) from exc
    except AdapterError as exc:
        raise APIError(400, _public_message(state, str(exc)), param="lora_path",
                       code="invalid_adapter") from exc
    except EngineError as exc:
        raise _public_error(state, exc) from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             responses=openapi.UNLOAD_ADAPTER)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    state = _state(request)
    _check_adapter_name(state, body.lora_name)
    try:
        await state.engine.unload_adapter(body.lora_name)
    except EngineError as exc:
        err = _public_error(state, exc)
        err.param = "lora_name"
        raise err from exc
    state.metrics.forget_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


# ---- health and metrics --------------------------------------------------------------------

@router.get("/health", response_class=Response, responses=openapi.HEALTH)
async def health(request: Request) -> Response:
    engine = _state(request).engine
    if engine.is_alive:
        return Response(status_code=200)
    failure = getattr(engine, "failure", None)  # what killed it, if it died
    message = f"The engine failed: {failure}" if failure else "The engine is not running"
    return error_response(503, message, code="engine_dead")


@router.get("/metrics", response_class=Response, responses=openapi.METRICS)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


# ---- generation ----------------------------------------------------------------------------

@dataclass
class Job:
    """One engine request: one prompt of the API request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class ClientDisconnected(Exception):
    pass


class EngineRun:
    """The engine requests behind one API request, each pumped by a task into one queue.

    `wait_started` returns once every request produced its first output, so early failures
    (unknown or invalid adapter, prompt too long) become HTTP errors before any byte is sent.
    `close` cancels the pumps; each closes its engine stream, which aborts the request.
    """

    def __init__(self, engine: Any, jobs: list[Job], adapter: str | None):
        self._engine = engine
        self._jobs = jobs
        self._adapter = adapter
        self._queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
        self._buffer: collections.deque[tuple[int, Any, BaseException | None]] = (
            collections.deque())
        self._tasks = [asyncio.create_task(self._pump(i, job)) for i, job in enumerate(jobs)]

    async def _pump(self, index: int, job: Job) -> None:
        try:
            stream = self._engine.generate(job.request_id, job.prompt_ids, job.params,
                                           self._adapter)
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


def _admit(state: "ServerState", target: Target, seqs: int) -> None:
    """503 while draining; 429 when more than --max-queued-requests sequences would wait."""
    engine = state.engine
    if state.draining or not engine.is_alive:
        state.metrics.requests.labels(target.label, "rejected").inc()
        raise APIError(503, "The server is shutting down or its engine is not running",
                       code="unavailable", headers={"Retry-After": "5"})
    limit = state.settings.max_queued_requests
    if limit is None:
        return
    max_running = getattr(engine.config, "max_num_seqs", 0)
    queued = max(engine.stats().num_waiting,
                 state.metrics.in_flight_seqs() + seqs - max_running)
    if queued > limit:
        state.metrics.requests.labels(target.label, "rejected").inc()
        raise APIError(429, f"Too many queued requests (limit {limit}); retry shortly",
                       code="queue_full", headers={"Retry-After": "1"})


class _EventStream(StreamingResponse):
    """A StreamingResponse that always releases its engine requests, even if the stream never
    starts (client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
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


def _check_not_aborted(assembler: Any) -> None:
    if assembler.aborted:
        raise APIError(503, "The request was aborted before it finished (the server is "
                       "shutting down)", code="aborted", headers={"Retry-After": "5"})


async def _events(state: "ServerState", request_id: str, run: EngineRun, assembler: Any,
                  tracker: RequestTracker, include_usage: bool) -> AsyncIterator[str]:
    outcome = "abort"  # unless it ends otherwise: cancelled by a disconnect
    try:
        for chunk in getattr(assembler, "initial_chunks", list)():
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
        err = _public_error(state, exc)
        if not _expected(exc):
            logger.error("error in stream of request %s", request_id, exc_info=exc)
            err.message = f"Internal server error (request id {request_id})"
        yield _sse(error_body(err.status, err.message, err.param, err.code))
    finally:
        run.close()
        tracker.finish(outcome, **assembler.totals())
    yield "data: [DONE]\n\n"


async def _collect(run: EngineRun, assembler: Any) -> None:
    async for job, output in run.outputs():
        assembler.add(job, output)
    _check_not_aborted(assembler)


async def _serve(request: Request, state: "ServerState", target: Target, jobs: list[Job],
                 assembler: Any, stream: bool, include_usage: bool) -> Response:
    """Run the engine requests and answer with one JSON body or a server-sent event stream."""
    seqs = sum(job.params.n for job in jobs)
    _admit(state, target, seqs)
    tracker = state.metrics.track(target.label, target.adapter, seqs)
    run = EngineRun(state.engine, jobs, target.adapter)
    try:
        await _unless_disconnected(request, run.wait_started())
    except BaseException as exc:  # including cancellation: the engine requests must not leak
        run.close()
        failed = isinstance(exc, Exception) and not isinstance(exc, ClientDisconnected)
        tracker.finish("error" if failed else "abort")
        if isinstance(exc, ClientDisconnected):
            return Response(status_code=499)
        if failed and _expected(exc):
            raise _public_error(state, exc) from exc
        raise  # a bug (logged with the request id, answered 500) or a cancellation
    tracker.started(target.name)
    request_id = request.state.request_id
    if stream:
        def release() -> None:
            run.close()
            tracker.finish("abort", **assembler.totals())

        return _EventStream(_events(state, request_id, run, assembler, tracker, include_usage),
                            on_close=release)
    outcome = "abort"
    try:
        await _unless_disconnected(request, _collect(run, assembler))
        outcome = "success"
    except ClientDisconnected:
        return Response(status_code=499)
    except Exception as exc:
        outcome = "error"
        if not _expected(exc):
            raise
        raise _public_error(state, exc) from exc
    finally:
        run.close()
        tracker.finish(outcome, **assembler.totals())
    return JSONResponse(assembler.response().model_dump())


def _decoder(state: "ServerState") -> Callable[[int], str]:
    cache, tokenizer = state.token_text, state.engine.tokenizer

    def decode(token_id: int) -> str:
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = tokenizer.decode([token_id])
        return text

    return decode


@contextlib.contextmanager
def _count_error(state: "ServerState", target: Target) -> Iterator[None]:
    """Count a request refused while being prepared (bad parameters) under its adapter."""
    try:
        yield
    except (APIError, SamplingParamsError):
        state.metrics.requests.labels(target.label, "error").inc()
        raise


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


@router.post("/v1/completions", response_model=None, responses=openapi.COMPLETIONS)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    target = _resolve_model(state, body.model)
    with _count_error(state, target):
        if body.suffix is not None:
            raise _refuse("suffix", "suffix is not supported (no fill-in-the-middle)")
        if body.best_of not in (None, 1, body.n):
            raise _refuse("best_of", "best_of is not supported; use n")
        if body.logit_bias:
            raise _refuse("logit_bias", "logit_bias is not supported")
        prompts, texts = await completion_prompts(state.engine.tokenizer, body)
        max_len = state.engine.max_model_len
        params = [body.to_sampling_params(len(ids), max_len) for ids in prompts]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    jobs = [Job(f"{response_id}-{i}", ids, p)
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True))]
    assembler = CompletionAssembler(response_id, body.model, body.n, prompts, _decoder(state),
                                    texts if body.echo else None, body.logprobs)
    return await _serve(request, state, target, jobs, assembler, body.stream,
                        body.include_usage)


@router.post("/v1/chat/completions", response_model=None,
             responses=openapi.CHAT_COMPLETIONS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    target = _resolve_model(state, body.model)
    with _count_error(state, target):
        if body.tool_choice is not None and not body.tools:  # as OpenAI answers
            raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed "
                           "when 'tools' are specified.", param="tool_choice")
        if body.tools:
            raise _refuse("tools", "tools (function calling) are not supported")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise _refuse("response_format", "Only response_format type 'text' is supported")
        if body.logit_bias:
            raise _refuse("logit_bias", "logit_bias is not supported")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        prompt_ids = await asyncio.to_thread(render_chat, state.engine.tokenizer, body)
        params = body.to_sampling_params(len(prompt_ids), state.engine.max_model_len)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    assembler = ChatAssembler(response_id, body.model, body.n, prompt_ids, _decoder(state),
                              params.logprobs)
    jobs = [Job(f"{response_id}-0", prompt_ids, params)]
    return await _serve(request, state, target, jobs, assembler, body.stream,
                        body.include_usage)
