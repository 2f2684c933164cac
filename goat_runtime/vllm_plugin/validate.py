"""Hook (d): check every adapter in the front-end process, before it reaches a worker.

vLLM 0.32 turns any error raised while a worker loads an adapter into EngineDeadError: one bad
adapter (a corrupt file, a rank over --max-lora-rank) stops the engine for every request. So
the API-server side reads each adapter with goat-serve's loader (`load_adapter` against the
base checkpoint's Linear shapes) and checks that it fits the slots (GOAT: E + r + static rows
<= --max-lora-rank) where vLLM takes adapters in:

- `OpenAIServingModels._check_load_lora_adapter_request`: /v1/load_lora_adapter and
  --lora-modules (start-up fails with the message instead of a dead engine): a 400;
- `OpenAIServingModels.resolve_lora`: adapters found by a resolver (GOAT_ADAPTER_DIR): a 400;
- `InputProcessor._validate_lora`: every request that carries an adapter, offline `LLM` and
  the servers alike: the request fails with a ValueError (a 400 in the servers).

Results are cached per (adapter files' mtime and size, base, max rank): a request costs two
stat calls once its adapter was checked.
"""

import functools
import logging
from pathlib import Path
from typing import Any

from goat_runtime.adapters.format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Adapter,
    AdapterError,
    load_adapter,
)
from goat_runtime.vllm_plugin.merge import merge_target
from goat_runtime.vllm_plugin.state import STATE, is_goat_dir, linear_shapes, model_dir

logger = logging.getLogger(__name__)


def lora_rows(adapter: Adapter, covered: frozenset[str] = frozenset()) -> dict[str, int]:
    """Per module, the LoRA rows the vLLM slot needs (`loader.stacked_factors`' layout):
    E router rows + r expert rows + the static residual's rows (GOAT, unless the module is
    `covered` by the static term merged into the base), r (plain LoRA)."""
    from goat_runtime.adapters.static import selected_indices

    rows = {}
    for module, layer in adapter.layers.items():
        n = layer.num_experts + layer.rank
        if adapter.signature is not None and module not in covered:
            n += len(selected_indices(min(layer.lora_b.shape[0], layer.lora_a.shape[1]),
                                      adapter.signature))
        rows[module] = n
    return rows


def check_adapter(lora_path: str, shapes: dict[str, tuple[int, int]], max_lora_rank: int
                  ) -> None:
    """Raise AdapterError if the worker would fail to load lora_path into a slot."""
    target = merge_target(shapes)
    try:
        adapter = load_adapter(lora_path, shapes, max_rank=max_lora_rank)
        rows = lora_rows(adapter, target.covered(adapter) if target is not None else frozenset())
    except AdapterError:
        raise
    except Exception as exc:  # a corrupt file raises whatever its reader raises
        raise AdapterError(f"{lora_path}: cannot be read: {type(exc).__name__}: {exc}"
                           ) from None
    module, most = max(rows.items(), key=lambda kv: kv[1])
    if most > max_lora_rank:
        layer = adapter.layers[module]
        raise AdapterError(
            f"{lora_path}: GOAT module {module} needs {most} LoRA rows (E={layer.num_experts} "
            f"router rows + r={layer.rank} expert rows + {most - layer.num_experts - layer.rank}"
            f" static rows), over --max-lora-rank {max_lora_rank}; raise --max-lora-rank to one "
            f"of vLLM's allowed values >= {most} (1, 8, 16, 32, 64, 128, 256, 320, 512)")


def _stamp(lora_path: str) -> tuple[object, ...]:
    path = Path(lora_path)
    stamp: list[object] = [str(path.resolve())]
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            st = (path / name).stat()
            stamp.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def validate(lora_path: str, model: str, revision: str | None, max_lora_rank: int) -> None:
    """Raise AdapterError (a ValueError) with the reason if lora_path cannot be served by this
    engine; cached per adapter files, base and max rank."""
    key = (_stamp(lora_path), model, revision, max_lora_rank)
    with STATE.lock:
        if key in STATE.checked:
            error = STATE.checked[key]
            if error is not None:
                raise AdapterError(error)
            return
    try:
        shapes = linear_shapes(model_dir(model, revision))
    except AdapterError:
        if not is_goat_dir(lora_path):
            return  # a base without safetensors or goat-serve's config: plain LoRA is left to vLLM
        raise
    except Exception as exc:
        raise AdapterError(f"the base model {model} cannot be read: {exc}") from None
    try:
        check_adapter(lora_path, shapes, max_lora_rank)
        error = None
    except AdapterError as exc:
        error = str(exc)
    with STATE.lock:
        STATE.checked[key] = error
    if error is not None:
        logger.warning("goat vLLM plugin: refused adapter %s: %s", lora_path, error)
        raise AdapterError(error)


def _engine_limits(vllm_config: Any) -> tuple[str, str | None, int]:
    model_config = vllm_config.model_config
    return model_config.model, model_config.revision, vllm_config.lora_config.max_lora_rank


def bad_request(message: str) -> Any:
    from http import HTTPStatus

    from vllm.entrypoints.serve import create_error_response

    return create_error_response(message=message, err_type="BadRequestError",
                                 status_code=HTTPStatus.BAD_REQUEST, param="lora_path")


def install() -> None:
    """Patch the three front-end entry points (idempotent through hooks.install)."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.v1.engine.input_processor import InputProcessor

    original_validate_lora = InputProcessor._validate_lora

    @functools.wraps(original_validate_lora)
    def validate_lora(self: Any, lora_request: Any) -> None:
        original_validate_lora(self, lora_request)
        if lora_request is not None and lora_request.lora_path:
            validate(lora_request.lora_path, *_engine_limits(self.vllm_config))

    InputProcessor._validate_lora = validate_lora

    original_check = OpenAIServingModels._check_load_lora_adapter_request

    @functools.wraps(original_check)
    async def check_load(self: Any, request: Any) -> Any:
        error = await original_check(self, request)
        if error is not None:
            return error
        try:
            validate(request.lora_path, *_engine_limits(self.engine_client.vllm_config))
        except AdapterError as exc:
            return bad_request(f"LoRA adapter '{request.lora_name}' refused: {exc}")
        return None

    OpenAIServingModels._check_load_lora_adapter_request = check_load

    original_resolve = OpenAIServingModels.resolve_lora

    @functools.wraps(original_resolve)
    async def resolve_lora(self: Any, lora_name: str) -> Any:
        # vLLM loads the first adapter a resolver finds: check that one before it does.
        if lora_name not in self.lora_requests:
            for resolver in self.lora_resolvers:
                found = await resolver.resolve_lora(self.model_config.model, lora_name)
                if found is None:
                    continue
                try:
                    validate(found.lora_path, *_engine_limits(self.engine_client.vllm_config))
                except AdapterError as exc:
                    return bad_request(f"LoRA adapter '{lora_name}' refused: {exc}")
                break
        return await original_resolve(self, lora_name)

    OpenAIServingModels.resolve_lora = resolve_lora
