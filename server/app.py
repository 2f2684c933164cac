"""The FastAPI app factory: wires the engine, settings, metrics, middleware and routes."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server import adapter_routes, admin_routes, routes, tokenize_routes
from server.auth import AccessLogMiddleware, ApiKeyMiddleware
from server.engine import ServingEngine
from server.errors import RequestContextMiddleware, error_response, install_error_handlers
from server.metrics import ServerMetrics
from server.openapi import install_openapi
from server.state import ServerState, Settings
from server.tenants import Keyring

logger = logging.getLogger("server")


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"Request body too large (limit {self.max_bytes} bytes)"
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status = 413 if length.isdigit() else 400
            await error_response(status, message if status == 413 else "Invalid Content-Length")(
                scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited_receive, send)


async def drain(app: FastAPI) -> None:
    """Graceful shutdown: refuse new generation requests, let in-flight ones finish within the
    shutdown timeout, abort the rest (their streams end with an error), stop the engine."""
    state: ServerState = app.state.server
    if state.draining:
        return
    state.draining = True
    logger.info("draining: waiting up to %ss for in-flight requests",
                state.settings.shutdown_timeout)
    await state.engine.shutdown(timeout=state.settings.shutdown_timeout)


def create_app(engine: ServingEngine, settings: Settings | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`.

    Pass the `ServerMetrics` given to the engine as its listener, so engine-side events (steps,
    adapter loads, router selections) land in this app's /metrics. A bad key file raises
    KeyFileError.
    """
    settings = settings or Settings()
    keyring = Keyring(settings.api_keys, settings.api_keys_file)
    metrics = metrics or ServerMetrics(max_loras=engine.config.max_device_slots)
    metrics.attach(engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await drain(app)

    app = FastAPI(title="goat-serve", summary="OpenAI-compatible GOAT and LoRA adapter server",
                  lifespan=lifespan)
    state = ServerState(engine=engine, settings=settings, metrics=metrics, keyring=keyring)
    state.keys_changed(keyring.table)
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(routes.router)
    app.include_router(adapter_routes.router)
    app.include_router(tokenize_routes.router)
    app.include_router(admin_routes.router)
    # Added innermost first: request ids and the 500 guard wrap everything, then the access
    # log (it reads the request id and the key auth found), then auth, then the body limit (so
    # unauthenticated clients cannot make the server read big bodies).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(ApiKeyMiddleware, keyring=keyring)
    app.add_middleware(AccessLogMiddleware)
    app.add_middleware(RequestContextMiddleware)
    return app
