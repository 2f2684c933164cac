"""goat-serve's OpenAI-compatible HTTP server over the GOAT engine.

`create_app` and `Settings` are imported lazily, so `goat-serve --help` and the `adapters`
subcommands start without loading FastAPI and torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import Settings, create_app

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import server.app

        return getattr(server.app, name)
    raise AttributeError(f"module 'server' has no attribute {name!r}")
