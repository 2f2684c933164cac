"""goat-serve's vLLM plugin: GOAT adapters (and plain LoRA) served by vLLM, with no fork.

Registered under the `vllm.general_plugins` entry point as `goat`; vLLM calls `register()` in
every process (API server, engine core, each worker). Enable it with VLLM_PLUGINS=goat. See
docs/vllm.md. This module imports nothing heavy: vLLM swallows (and only logs) import errors of
a plugin module, while an exception from `register()` stops the engine, which is what an
unsupported version or option must do.
"""

PLUGIN_NAME = "goat"


def register() -> None:
    """vLLM's entry point: refuse unsupported versions, then install the hooks."""
    from goat_runtime.vllm_plugin.version import check_vllm_version

    check_vllm_version()
    from goat_runtime.vllm_plugin import hooks, resolver

    hooks.install()
    resolver.register_resolver()

