"""Admin routes besides the adapters': POST /v1/admin/reload_keys re-reads the key file (as
SIGHUP does). Admin keys only (auth.py refuses others first; the route checks again)."""

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server import openapi
from server.auth import require_admin
from server.errors import APIError
from server.state import get_state
from server.tenants import KeyFileError

router = APIRouter()
logger = logging.getLogger("server")


@router.post("/v1/admin/reload_keys", responses=openapi.RELOAD_KEYS)
async def reload_keys(request: Request) -> JSONResponse:
    require_admin(request)
    state = get_state(request)
    if state.keyring.path is None:
        raise APIError(400, "The server was started without --api-keys-file: no key file to "
                       "reload", code="no_key_file")
    try:
        table = state.reload_keys()
    except KeyFileError as exc:
        logger.error("key file refused, the keys in force stay: %s", exc)
        raise APIError(400, f"Key file refused, the keys in force stay: {exc}",
                       code="invalid_key_file") from exc
    logger.info("key file reloaded: %d keys", len(table.keys))
    return JSONResponse({"object": "keys", "ids": [key.id for key in table.keys]})
