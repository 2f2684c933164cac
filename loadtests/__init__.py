"""Load generation for goat-serve and other OpenAI-compatible servers (see README.md).

The public API is re-exported lazily so `python -m loadtests.loadgen` does not import the module
twice (once as part of the package, once as __main__).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loadtests.loadgen import LoadConfig, LoadResult, run_load
    from loadtests.report import RequestRecord, Summary
    from loadtests.workload import LengthDist

_EXPORTS = {
    "LoadConfig": "loadtests.loadgen",
    "LoadResult": "loadtests.loadgen",
    "run_load": "loadtests.loadgen",
    "RequestRecord": "loadtests.report",
    "Summary": "loadtests.report",
    "LengthDist": "loadtests.workload",
}
__all__ = ["LengthDist", "LoadConfig", "LoadResult", "RequestRecord", "Summary", "run_load"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'loadtests' has no attribute {name!r}")
