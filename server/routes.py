"""The HTTP routes: OpenAI's completions, chat completions and models; health and metrics.
vLLM's LoRA load and unload live in adapter_routes.py; running a request in serving.py."""

import asyncio
import contextlib
import uuid
from collections.abc import Callable, Iterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from goat_runtime.engine.outputs import AdapterInfo
from goat_runtime.engine.sampling import SamplingParamsError
from server import openapi
from server.assemblers import ChatAssembler, CompletionAssembler
from server.auth import tenant
from server.errors import APIError, error_response
from server.prompts import completion_prompts, render_chat
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    valid_name,
)
from server.request_fields import check_fields
from server.serving import Job, Target, serve
from server.state import ServerState, get_state
from server.tenants import TenantKey
from server.tools import TOOL_CALL_PARSERS, tool_constraint

router = APIRouter()


# ---- models -------------------------------------------------------------------

async def resolve_model(request: Request, name: str) -> Target:
    """What `model` names, for the request's key: every model-taking route calls this.

    A name outside the key's list is refused before the engine is asked anything, with the
    same 404 as a name nothing has: the answer and the work done (hence its time) are the
    same whether someone else's adapter of that name exists or not."""
    target, _ = await _resolve(request, name)
    return target


async def _resolve(request: Request, name: str) -> tuple[Target, AdapterInfo | None]:
    """resolve_model's target, and the adapter's entry (None for the base)."""
    state = get_state(request)
    engine = state.engine
    if tenant(request).allows(name):
        if name == engine.base_name:
            return Target(name, None, True), None
        if valid_name(name):
            info = await engine.adapter_info(name)
            if info is not None:
                return Target(name, name, info.loaded), info
    shown = f" '{name}'" if valid_name(name) else ""
    raise APIError(404, f"The model{shown} does not exist. GET /v1/models lists the base "
                   "model and the adapters.", param="model", code="model_not_found")


def _card(state: ServerState, info: AdapterInfo | None) -> ModelCard:
    """The base's card (info None) or an adapter's."""
    base, max_len = state.engine.base_name, state.engine.max_model_len
    if info is None:
        return ModelCard(id=base, root=base, max_model_len=max_len)
    return ModelCard(id=info.name, root=info.name, parent=base, kind=info.kind,
                     loaded=info.loaded, location=info.location, max_model_len=max_len)


async def _model_cards(state: ServerState, key: TenantKey) -> list[ModelCard]:
    """The models `key` may use."""
    infos = sorted(await state.engine.list_adapters(), key=lambda a: a.name)
    cards = [_card(state, None)] + [_card(state, info) for info in infos]
    return [card for card in cards if key.allows(card.id)]


@router.get("/v1/models", responses=openapi.MODELS)
async def list_models(request: Request) -> JSONResponse:
    cards = await _model_cards(get_state(request), tenant(request))
    return JSONResponse(ModelList(data=cards).model_dump())


@router.get("/v1/models/{model_id}", responses=openapi.MODEL)
async def get_model(model_id: str, request: Request) -> JSONResponse:
    _, info = await _resolve(request, model_id)  # 404 if unknown or not the key's
    return JSONResponse(_card(get_state(request), info).model_dump())


# ---- health and metrics --------------------------------------------------------------------

@router.get("/health", response_class=Response, responses=openapi.HEALTH)
async def health(request: Request) -> Response:
    engine = get_state(request).engine
    if engine.is_alive:
        return Response(status_code=200)
    failure = engine.failure
    message = f"The engine failed: {failure}" if failure else "The engine is not running"
    return error_response(503, message, code="engine_dead")


@router.get("/metrics", response_class=Response, responses=openapi.METRICS)
async def metrics(request: Request) -> Response:
    # Rendered off the event loop: hundreds of adapters' series take tens of ms of Python, and
    # in a thread the loop keeps streaming between the interpreter's switches.
    body = await asyncio.to_thread(generate_latest, get_state(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# ---- generation ----------------------------------------------------------------------------

def decoder(state: ServerState) -> Callable[[int], str]:
    cache, tokenizer = state.token_text, state.engine.tokenizer

    def decode(token_id: int) -> str:
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = tokenizer.decode([token_id])
        return text

    return decode


@contextlib.contextmanager
def _count_error(request: Request, target: Target) -> Iterator[None]:
    """Count a request refused while being prepared (bad parameters) under its adapter and
    its key."""
    try:
        yield
    except (APIError, SamplingParamsError):
        get_state(request).metrics.refused(target.label, tenant(request).id, "error")
        raise


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def _check_prompt_logprobs(body: CompletionRequest | ChatCompletionRequest) -> None:
    if body.prompt_logprobs is not None and body.stream:  # as vLLM answers
        raise APIError(400, "`prompt_logprobs` are not available when `stream=True`.",
                       param="prompt_logprobs")


@router.post("/v1/completions", response_model=None, responses=openapi.COMPLETIONS)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = get_state(request)
    target = await resolve_model(request, body.model)
    with _count_error(request, target):
        check_fields(body, "completions")
        _check_prompt_logprobs(body)
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
    assembler = CompletionAssembler(response_id, body.model, body.n, prompts, decoder(state),
                                    texts, body.logprobs,
                                    params[0].prompt_logprobs)
    return await serve(request, state, target, jobs, assembler, body.stream,
                        body.include_usage)


@router.post("/v1/chat/completions", response_model=None,
             responses=openapi.CHAT_COMPLETIONS)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state = get_state(request)
    target = await resolve_model(request, body.model)
    with _count_error(request, target):
        check_fields(body, "chat")
        _check_prompt_logprobs(body)
        if body.tool_choice is not None and not body.tools:  # as OpenAI answers
            raise APIError(400, "Invalid value for 'tool_choice': 'tool_choice' is only allowed "
                           "when 'tools' are specified.", param="tool_choice")
        tools_grammar = tool_constraint(body)
        if tools_grammar is not None and (body.structured_outputs or (
                body.response_format and body.response_format.type != "text")):
            raise APIError(400, "A tool_choice that calls a function cannot be combined with "
                           "structured outputs", param="tool_choice")
        if body.logit_bias:
            raise _refuse("logit_bias", "logit_bias is not supported")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        prompt_ids = await asyncio.to_thread(render_chat, state.engine.tokenizer, body,
                                             state.settings.chat_template)
        params = body.to_sampling_params(len(prompt_ids), state.engine.max_model_len,
                                         tools_grammar)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    parse_tools = body.tools and body.tool_choice != "none"
    assembler = ChatAssembler(response_id, body.model, body.n, prompt_ids, decoder(state),
                              params.logprobs, params.prompt_logprobs,
                              tool_parser=TOOL_CALL_PARSERS[state.settings.tool_call_parser]
                              if parse_tools else None)
    jobs = [Job(f"{response_id}-0", prompt_ids, params)]
    return await serve(request, state, target, jobs, assembler, body.stream,
                        body.include_usage)
