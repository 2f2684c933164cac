"""The server's state: its settings and what every route reaches through
`request.app.state.server` (the engine, the metrics, whether it is draining)."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from goat_runtime.adapters.store import is_url
from server.engine import ServingEngine
from server.limits import RateLimiter
from server.metrics import ServerMetrics
from server.tenants import Keyring, KeyTable


@dataclass
class Settings:
    """What the HTTP layer needs beyond the engine's own config."""

    api_keys: tuple[str, ...] = ()  # full-access keys (--api-key)
    api_keys_file: Path | None = None  # tenant keys (--api-keys-file), see server/tenants.py
    # Directories besides the engine's adapter dir that /v1/load_lora_adapter may load from.
    allowed_adapter_roots: tuple[Path | str, ...] = ()  # str: an s3:// or hf:// URL prefix
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
    keyring: Keyring
    limiter: RateLimiter = field(default_factory=RateLimiter)
    draining: bool = False
    token_text: dict[int, str] = field(default_factory=dict)  # token id -> decoded text

    def keys_changed(self, table: KeyTable) -> None:
        """After the keys are (re)loaded: metrics series and limiter state follow the ids."""
        self.metrics.set_keys(table.ids)
        self.limiter.forget(set(table.ids))

    def reload_keys(self) -> KeyTable:
        """Re-read the key file (KeyFileError: the keys in force stay)."""
        table = self.keyring.reload()
        self.keys_changed(table)
        return table

    def adapter_roots(self) -> list[Path]:
        """The local folders lora_path may name, the adapter directory first, after symlinks
        (URL roots: `url_roots`)."""
        roots = [r for r in self.settings.allowed_adapter_roots if isinstance(r, Path)]
        if isinstance(self.engine.config.adapter_dir, Path):
            roots.insert(0, self.engine.config.adapter_dir)
        return [r.resolve() for r in roots]

    def url_roots(self) -> list[str]:
        """The s3:// and hf:// prefixes lora_path may name: the adapter directory's and the
        allowed roots'."""
        return [str(r) for r in (self.engine.config.adapter_dir,
                                 *self.settings.allowed_adapter_roots) if r and is_url(r)]

    def public_message(self, message: str) -> str:
        """An engine or adapter error message without the server's own directory paths."""
        for root in self.adapter_roots():
            message = message.replace(str(root) + os.sep, "").replace(str(root),
                                                                      "<adapter-root>")
        return message


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state
