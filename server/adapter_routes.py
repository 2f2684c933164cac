"""vLLM's adapter routes: POST /v1/load_lora_adapter and /v1/unload_lora_adapter, with the
checks that keep `lora_path` inside the adapter directory and the allowed roots. Both need an
admin key (auth.py refuses others first; the routes check again)."""

import os
import stat
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from goat_runtime.adapters.format import AdapterError
from goat_runtime.adapters.store import FetchError, check_location, is_url, within_url
from goat_runtime.engine.outputs import EngineError
from server import openapi
from server.auth import require_admin
from server.errors import APIError
from server.protocol import (
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    check_unicode,
    valid_name,
)
from server.serving import public_error
from server.state import ServerState, get_state

router = APIRouter()


def _check_adapter_name(state: ServerState, name: str) -> None:
    if not valid_name(name):
        raise APIError(400, "lora_name must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
                       param="lora_name", code="invalid_name")
    if name == state.engine.base_name:
        raise APIError(400, f"'{name}' is the base model's name", param="lora_name",
                       code="invalid_name")


def _adapter_path(state: ServerState, raw: str) -> Path:
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


def _remote_adapter(state: ServerState, raw: str) -> str:
    """The s3:// or hf:// URL `raw`, which must lie under a URL adapter directory or allowed
    root (a client must not make the server fetch from anywhere its credentials reach)."""
    check_unicode("lora_path", raw)
    try:
        url = check_location(raw)
    except ValueError as exc:
        raise APIError(400, str(exc), param="lora_path", code="invalid_path") from exc
    if not any(within_url(str(url), root) for root in state.url_roots()):
        raise APIError(400, "lora_path is outside the adapter directory and the allowed roots",
                       param="lora_path", code="invalid_path")
    return str(url)


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
             responses=openapi.LOAD_ADAPTER)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Response:
    require_admin(request)
    state = get_state(request)
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
        raise APIError(400, state.public_message(str(exc)), param="lora_path",
                       code="invalid_adapter") from exc
    except EngineError as exc:
        raise public_error(state, exc) from exc
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
             responses=openapi.UNLOAD_ADAPTER)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Response:
    require_admin(request)
    state = get_state(request)
    _check_adapter_name(state, body.lora_name)
    try:
        await state.engine.unload_adapter(body.lora_name)
    except EngineError as exc:
        err = public_error(state, exc)
        err.param = "lora_name"
        raise err from exc
    state.metrics.forget_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
