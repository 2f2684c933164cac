"""What the server needs from an engine, named once: the native `AsyncEngine` and the vLLM
engine (`goat_runtime.vllm_plugin.async_engine.VllmAsyncEngine`) both satisfy it, and the type
checker holds them to it where the CLI builds one (server/cli.py)."""

from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Protocol

from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.outputs import AdapterInfo, EngineStats, RequestOutput
from goat_runtime.engine.sampling import SamplingParams


class ServingEngine(Protocol):
    config: EngineConfig
    tokenizer: Any  # a Hugging Face tokenizer (untyped upstream)
    base_name: str
    max_model_len: int

    @property
    def is_alive(self) -> bool: ...

    @property
    def failure(self) -> str | None:
        """What killed the engine, if it died (None while it lives or after a clean stop)."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop accepting, let running requests finish within `timeout` s, abort the rest."""
        ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter: str | None = None,
                 tenant: str = "") -> AsyncGenerator[RequestOutput, None]:
        """A request's outputs; closing the stream early aborts the request. `tenant` is the
        API key's id, for an engine that shares capacity between tenants."""
        ...

    async def list_adapters(self) -> list[AdapterInfo]: ...

    async def adapter_info(self, name: str) -> AdapterInfo | None: ...

    async def load_adapter(self, name: str, path: Path | str) -> None:
        """Load from a local folder or (native engine) an s3:// or hf:// URL."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    def stats(self) -> EngineStats: ...
