"""The server's state: its settings and what every route reaches through
`request.app.state.server` (the engine, the metrics, whether it is draining)."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from server.engine import ServingEngine
from server.metrics import ServerMetrics


@dataclass
class Settings:
    """What the HTTP layer needs beyond the engine's own config."""

    api_keys: tuple[str, ...] = ()
    # Directories besides the engine's adapter dir that /v1/load_lora_adapter may load from.
    allowed_adapter_roots: tuple[Path, ...] = ()
    # Requests allowed to wait for a free engine slot; beyond it: 429. None: no limit.
    max_queued_requests: int | None = None
    max_request_bytes: int = 4 << 20
    shutdown_timeout: float = 30.0
    chat_template: str | None = None  # --chat-template's text; None: the model's own
    tool_call_parser: str = "hermes"  # --tool-call-parser (server/tools.py)


@dataclass
class ServerState:
    engine: ServingEngine
    settings: Settings
    metrics: ServerMetrics
    draining: bool = False
    token_text: dict[int, str] = field(default_factory=dict)  # token id -> decoded text

    def adapter_roots(self) -> list[Path]:
        """The adapter directory first, then the allowed roots, after symlinks."""
        roots = [Path(r) for r in self.settings.allowed_adapter_roots]
        if self.engine.config.adapter_dir is not None:
            roots.insert(0, Path(self.engine.config.adapter_dir))
        return [r.resolve() for r in roots]

    def public_message(self, message: str) -> str:
        """An engine or adapter error message without the server's own directory paths."""
        for root in self.adapter_roots():
            message = message.replace(str(root) + os.sep, "").replace(str(root),
                                                                      "<adapter-root>")
        return message


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state
