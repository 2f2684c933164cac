"""Bearer API keys, checked in a pure ASGI middleware so the decision rests on the ASGI scope's
path (never on a URL rebuilt from the Host header) and covers every route, including ones added
later and FastAPI's own (docs, 404s)."""

import hmac
from collections.abc import Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import error_response

# Probes and scrapers stay open: they reveal liveness and aggregate numbers, nothing per request.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Iterable[str]):
        self.app = app
        self._keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] not in ("http", "websocket") or not self._keys
                or scope["path"] in PUBLIC_PATHS or self._authorized(scope)):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        response = error_response(
            401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = b""
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                header = value
                break
        scheme, _, token = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        token = token.strip()
        # Compare against every key, without stopping at a match, so timing reveals nothing.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return matched
