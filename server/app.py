"""The FastAPI app factory: wires the engine, settings, metrics, middleware and routes."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import ApiKeyMiddleware
from server.errors import RequestContextMiddleware, error_response, install_error_handlers
from server.metrics import ServerMetrics
from server.openapi import install_openapi
from server.routes import router

logger = logging.getLogger("server")


@dataclass
class Settings:
    """What the HTTP layer needs beyond the engine's own config."""

    api_keys: tuple[str, ...] = ()
    # Directories besides the engine's adapter dir that /v1/load_lora_adapter may load from.
    allowed_adapter_roots: tuple[Path | str, ...] = ()  # str: an s3:// or hf:// URL prefix
    # Requests allowed to wait for a free engine slot; beyond it: 429. None: no limit.
    max_queued_requests: int | None = None
    max_request_bytes: int = 4 << 20
    shutdown_timeout: float = 30.0


@dataclass
class ServerState:
    """Per-app state the routes reach through `request.app.state.server`."""

    engine: Any  # goat_runtime.engine.async_engine.AsyncEngine (or a test double)
    settings: Settings
    metrics: ServerMetrics
    draining: bool = False
    token_text: dict[int, str] = field(default_factory=dict)  # token id -> decoded text

    def adapter_roots(self) -> list[Path]:
        """The local folders lora_path may name (URL roots: routes._remote_adapter)."""
        roots = [Path(r) for r in self.settings.allowed_adapter_roots if isinstance(r, Path)]
        adapter_dir = getattr(self.engine.config, "adapter_dir", None)
        if isinstance(adapter_dir, Path):
            roots.insert(0, adapter_dir)
        return [r.resolve() for r in roots]


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


def create_app(engine: Any, settings: Settings | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`.

    Pass the `ServerMetrics` given to the engine as its listener, so engine-side events (steps,
    adapter loads, router selections) land in this app's /metrics.
    """
    settings = settings or Settings()
    metrics = metrics or ServerMetrics(max_loras=getattr(engine.config, "max_loras", 0))
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
    app.state.server = ServerState(engine=engine, settings=settings, metrics=metrics)
    install_error_handlers(app)
    install_openapi(app)
    app.include_router(router)
    # Added innermost first: request ids and the 500 guard wrap everything, then auth, then
    # the body limit (so unauthenticated clients cannot make the server read big bodies).
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=settings.api_keys)
    app.add_middleware(RequestContextMiddleware)
    return app
