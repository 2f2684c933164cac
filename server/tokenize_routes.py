"""vLLM's tokenizer routes: POST /tokenize (a prompt, or chat messages through the chat template
exactly as /v1/chat/completions renders them) and POST /detokenize. Per model, as vLLM's: the
base's name or an adapter's (adapters share the base's tokenizer), an unknown one is a 404."""

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import openapi
from server.errors import APIError
from server.prompts import render_chat
from server.protocol import (
    ChatCompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    check_unicode,
)
from server.request_fields import check_fields
from server.routes import resolve_model
from server.state import ServerState, get_state

router = APIRouter()


async def _check_model(request: Request, model: str | None) -> None:
    if model is not None:
        await resolve_model(request, model)  # 404 if unknown or not the key's


def _refuse(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


async def _token_ids(state: ServerState, body: TokenizeRequest) -> list[int]:
    tokenizer = state.engine.tokenizer
    if body.messages is None:
        prompt = body.prompt or ""
        for name in ("add_generation_prompt", "continue_final_message"):
            if name in body.model_fields_set:
                raise _refuse(name, f"'{name}' applies to messages, not to a prompt")
        check_unicode("prompt", prompt)
        add = body.add_special_tokens is not False  # default true, as vLLM's
        ids = await asyncio.to_thread(lambda: tokenizer(prompt, add_special_tokens=add)[
            "input_ids"])
        return list(ids)
    if body.add_special_tokens:
        raise _refuse("add_special_tokens", "add_special_tokens with messages is not supported: "
                      "the chat template adds the special tokens (as /v1/chat/completions)")
    chat = ChatCompletionRequest(model=body.model or state.engine.base_name,
                                 messages=body.messages,
                                 add_generation_prompt=body.add_generation_prompt,
                                 continue_final_message=body.continue_final_message)
    return await asyncio.to_thread(render_chat, tokenizer, chat, state.settings.chat_template)


@router.post("/tokenize", response_model=None, responses=openapi.TOKENIZE)
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    await _check_model(request, body.model)
    check_fields(body, "tokenize")
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "Give exactly one of prompt (text) and messages (a chat)",
                       param="prompt" if body.prompt is None else "messages")
    ids = await _token_ids(state, body)
    strs = None
    if body.return_token_strs:
        strs = list(state.engine.tokenizer.convert_ids_to_tokens(ids))
    return JSONResponse(TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len,
                                         tokens=ids, token_strs=strs).model_dump())


@router.post("/detokenize", response_model=None, responses=openapi.DETOKENIZE)
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    await _check_model(request, body.model)
    check_fields(body, "detokenize")
    tokenizer = state.engine.tokenizer
    vocab = len(tokenizer)
    bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(400, f"tokens must be token ids in [0, {vocab})", param=f"tokens[{bad}]")
    text = await asyncio.to_thread(tokenizer.decode, body.tokens)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump())
