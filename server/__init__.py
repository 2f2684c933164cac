"""goat-serve's OpenAI-compatible HTTP server over the GOAT engine.

`create_app` and `Settings` are imported lazily, so `goat-serve --help` and the `adapters`
subcommands start without loading FastAPI and torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import create_app
    from server.state import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "Settings":
        from server.state import Settings

        return Settings
    if name == "create_app":
        from server.app import create_app

        return create_app
    raise AttributeError(f"module 'server' has no attribute {name!r}")
