"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Validation errors become 400 naming the parameter (never FastAPI's 422, never an echo of the
body); internal errors become 500 carrying only a request id, and are logged with it.
"""

import logging
import re
import uuid
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from goat_runtime.adapters.format import AdapterError
from goat_runtime.engine.outputs import EngineError
from goat_runtime.engine.sampling import SamplingParamsError

logger = logging.getLogger("server")

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class APIError(Exception):
    """An error answered as-is: HTTP status, message and the OpenAI error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    err_type = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers=headers)


def from_exception(exc: Exception) -> APIError:
    """Map the errors a request may raise to an APIError (unknown ones are internal: 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, SamplingParamsError):
        code = "context_length_exceeded" if "context length" in str(exc) else None
        return APIError(400, str(exc), param=exc.param, code=code)
    if isinstance(exc, EngineError):
        code = {404: "model_not_found", 503: "unavailable"}.get(exc.status)
        return APIError(exc.status, str(exc), param="model" if exc.status == 404 else None,
                        code=code, headers={"Retry-After": "5"} if exc.status == 503 else None)
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), code="invalid_adapter")
    return APIError(500, "Internal server error", code="internal_error")


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """'messages[0].content' from ('body', 'messages', 0, 'content', 'str'): the field path,
    without pydantic's union-member tags."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(item, int):
            if parts:
                parts[-1] += f"[{item}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item) and item not in (
                "str", "int", "float", "bool", "list", "dict", "none"):
            parts.append(item)
    return ".".join(parts) or None


def _json_kind(value: Any) -> str:
    """The JSON type of a parsed value, for messages that must not echo it."""
    if value is None:
        return "null (or no body)"
    kinds = ((bool, "a boolean"), (int | float, "a number"), (str, "a string"),
             (list, "an array"))
    return next((name for kind, name in kinds if isinstance(value, kind)), "no object")


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "Invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "invalid JSON")
        return APIError(400, f"Malformed JSON body: {detail}", code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _param_from_loc(loc)
    if param is None:  # the body itself is no object: null, an array, a string, a number
        return APIError(400, "The request body must be a JSON object, got "
                        f"{_json_kind(first.get('input'))}", code="invalid_body")
    if first.get("type") == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param,
                        code="missing_required_parameter")
    more = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return APIError(400, f"Invalid value for '{param}': {first.get('msg')}{more}", param=param,
                    code="invalid_type")


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        return error_response(err.status, err.message, err.param, err.code, err.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = validation_error(exc)
        return error_response(err.status, err.message, err.param, err.code)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        # FastAPI's "There was an error parsing the body" for what json.loads raises besides a
        # JSONDecodeError: say which
        reason = {UnicodeDecodeError: "it is not valid UTF-8",
                  RecursionError: "it is nested too deeply"}.get(type(exc.__cause__))
        if exc.status_code == 400 and reason:
            return error_response(400, f"Malformed JSON body: {reason}", code="invalid_json")
        message = exc.detail if isinstance(exc.detail, str) else "Request failed"
        return error_response(exc.status_code, message, headers=exc.headers)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(SamplingParamsError, on_api_error)
    app.add_exception_handler(EngineError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(HTTPException, on_http)


class RequestContextMiddleware:
    """Gives each request an id (the client's X-Request-Id if sane, else a fresh one), echoes it
    in the response, and turns uncaught exceptions into a logged 500 that names only the id."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("internal error in request %s (%s %s)", request_id,
                             scope.get("method"), scope.get("path"))
            if not started:
                response = error_response(
                    500, f"Internal server error (request id {request_id})",
                    code="internal_error")
                await response(scope, receive, send_with_id)
