"""What the OpenAPI schema (/openapi.json) says each route answers: every status the server
really sends, errors with OpenAI's body, and the real content types; never FastAPI's 422, which
the server does not send (validation errors are 400s, see errors.py)."""

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST

from server.protocol import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)

Responses = dict[int | str, dict[str, Any]]

_ERRORS = {
    400: "Invalid request: malformed JSON, a body that is no object, a wrong type or value, an "
         "unsupported parameter (`param` names the field)",
    401: "Missing or invalid API key (only when the server was started with API keys)",
    403: "The API key is not an admin key (loading and unloading adapters, reloading keys)",
    404: "The model, adapter or adapter folder does not exist",
    413: "The request body is over the server's limit",
    429: "Too many requests are queued, or the API key is over one of its limits (requests or "
         "tokens per minute, concurrent requests); retry after the Retry-After header's "
         "seconds",
    500: "An internal error, or the engine failed while serving this request",
    503: "The server is shutting down or its engine is not running (Retry-After)",
}


def _errors(*statuses: int) -> Responses:
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]}
            for status in statuses}


def _text(description: str, media_type: str = "text/plain") -> dict[str, Any]:
    return {"description": description,
            "content": {media_type: {"schema": {"type": "string"}}}}


def _generation(model: type, chunk: str) -> Responses:
    # OpenAPI 3.1 (FastAPI's): an event stream's `schema` describes one event
    event = {"type": "object", "required": ["data"], "properties": {"data": {
        "type": "string", "description": f"A {chunk} as JSON; an error body (an error after "
        "the first event); `[DONE]` last"}}}
    return {200: {"model": model, "description": "The completion; with `stream: true`, "
                  f"server-sent events, one {chunk} each",
                  "content": {"text/event-stream": {"schema": event}}},
            **_errors(400, 401, 404, 413, 429, 500, 503)}


_ENGINE_ERRORS = (400, 401, 403, 404, 413, 500, 503)
MODELS: Responses = {200: {"model": ModelList}, **_errors(401)}
MODEL: Responses = {200: {"model": ModelCard}, **_errors(401, 404)}
LOAD_ADAPTER: Responses = {200: _text("Success: the adapter is loaded"),
                           **_errors(*_ENGINE_ERRORS)}
UNLOAD_ADAPTER: Responses = {200: _text("Success: the adapter is unloaded"),
                             **_errors(*_ENGINE_ERRORS)}
HEALTH: Responses = {200: {"description": "The engine is running (an empty body)"},
                     **_errors(503)}
METRICS: Responses = {200: _text("Prometheus metrics, text exposition format",
                                 CONTENT_TYPE_LATEST),
                      **_errors(401, 403)}
TOKENIZE: Responses = {200: {"model": TokenizeResponse}, **_errors(400, 401, 404, 413, 500)}
DETOKENIZE: Responses = {200: {"model": DetokenizeResponse},
                         **_errors(400, 401, 404, 413, 500)}
RELOAD_KEYS: Responses = {200: {"description": "The key file was read again and is in force"},
                          **_errors(400, 401, 403)}
COMPLETIONS = _generation(CompletionResponse, "CompletionChunk")
CHAT_COMPLETIONS = _generation(ChatCompletionResponse, "ChatCompletionChunk")


def install_openapi(app: FastAPI) -> None:
    """Drop the 422 FastAPI declares for every route with parameters, and its schemas; declare
    error bodies as JSON on every route."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    for status, response in responses.items():
                        # errors are JSON even where success is text (FastAPI puts them under
                        # the route's media type)
                        if int(status) >= 400 and response.get("content"):
                            body = next(iter(response["content"].values()))
                            response["content"] = {"application/json": body}
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
