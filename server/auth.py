"""Bearer API keys, checked in a pure ASGI middleware so the decision rests on the ASGI scope's
path (never on a URL rebuilt from the Host header) and covers every route, including ones added
later and FastAPI's own (docs, 404s).

The key found is put on the scope (`tenant(request)`) for the routes: which models it may use
(routes.resolve_model) and its limits (limits.py). Admin paths (adapter load/unload, the key
reload) answer 403 to other keys here, and the routes check again (`require_admin`)."""

import logging
import time

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, error_response
from server.tenants import ANONYMOUS, Keyring, TenantKey

logger = logging.getLogger("server.access")

SCOPE_KEY = "goat.tenant"
# Probes and scrapers stay open: they reveal liveness and aggregate numbers, nothing per request.
# With a key file, /metrics names every key and adapter, so it needs an admin key.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter",
                         "/v1/admin/reload_keys"})


def is_admin_path(path: str) -> bool:
    path = path.rstrip("/")
    return path in ADMIN_PATHS or path.startswith("/v1/admin/")


def _bearer(scope: Scope) -> bytes | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" and token.strip() else None
    return None


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keyring: Keyring):
        self.app = app
        self.keyring = keyring

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        table = self.keyring.table
        key: TenantKey | None = ANONYMOUS
        if not table.open:
            token = _bearer(scope)
            key = table.identify(token) if token is not None else None
        public = path in PUBLIC_PATHS and not (path == "/metrics" and self.keyring.path)
        if key is None and not public:
            await self._refuse(scope, receive, send, 401,
                               "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                               "invalid_api_key", {"WWW-Authenticate": "Bearer"})
            return
        needs_admin = is_admin_path(path) or (path == "/metrics" and not public)
        if key is not None and needs_admin and not key.admin:
            await self._refuse(scope, receive, send, 403,
                               "This API key may not manage adapters or keys (not an admin key)",
                               "permission_denied", None)
            return
        scope[SCOPE_KEY] = key
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, message: str,
                      code: str, headers: dict[str, str] | None) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await error_response(status, message, code=code, headers=headers)(scope, receive, send)


def tenant(request: Request) -> TenantKey:
    """The key the request came with (ANONYMOUS when the server has no keys)."""
    key = request.scope.get(SCOPE_KEY)
    if not isinstance(key, TenantKey):  # only public paths go through without one
        raise APIError(401, "Missing or invalid API key", code="invalid_api_key")
    return key


def require_admin(request: Request) -> TenantKey:
    key = tenant(request)
    if not key.admin:
        raise APIError(403, "This API key may not manage adapters or keys (not an admin key)",
                       code="permission_denied")
    return key


class AccessLogMiddleware:
    """One access-log line per HTTP request, with the key id (never the key) and the request
    id: `client "METHOD path" status key=ID request_id=ID seconds`."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            key = scope.get(SCOPE_KEY)
            client = scope.get("client")
            logger.info('%s "%s %s" %d key=%s request_id=%s %.3fs',
                        f"{client[0]}:{client[1]}" if client else "-", scope.get("method"),
                        scope.get("path"), status, key.id if key is not None else "-",
                        (scope.get("state") or {}).get("request_id", "-"),
                        time.monotonic() - start)
