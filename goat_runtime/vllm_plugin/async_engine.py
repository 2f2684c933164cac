"""`goat-serve --engine vllm`: goat-serve's HTTP server on vLLM's AsyncLLM.

`VllmAsyncEngine` has the interface the server uses of `goat_runtime.engine.async_engine.
AsyncEngine` (generate, abort, adapters, stats, lifecycle, tokenizer, base_name, max_model_len,
config), so `server/` runs unchanged on either engine: same routes, errors, metrics and adapter
management, with vLLM's scheduler, kernels and tensor parallelism underneath and the goat plugin
serving GOAT adapters in it.

vLLM lives in its own virtual environment (it pins its own torch), so the whole server runs
there: `reexec_in_vllm_venv` builds that environment on first use (`venv.py`: GOAT_VLLM_VENV,
default ~/.cache/goat-serve/vllm-venv) and restarts `python -m server ...` with its python,
unless vLLM is importable already.
"""

import asyncio
import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from pathlib import Path
from typing import Any

from goat_runtime.adapters.format import CONFIG_FILE, AdapterError
from goat_runtime.adapters.store import is_url
from goat_runtime.engine.config import EngineConfig, resolve_dtype
from goat_runtime.engine.outputs import (
    AdapterInfo,
    CompletionDelta,
    EngineError,
    EngineListener,
    EngineStats,
    RequestOutput,
    check_prompt,
)
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.vllm_plugin.venv import ensure_vllm_venv, vllm_venv

logger = logging.getLogger(__name__)

_REEXEC_MARK = "GOAT_SERVE_VLLM_REEXEC"
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank values


def reexec_in_vllm_venv(argv: Sequence[str]) -> None:
    """Return if vLLM is importable here; else build the vLLM environment if it is not ready
    (`venv.ensure_vllm_venv`, one progress line per step, minutes the first time) and replace
    this process by `python -m server ARGV` there, with the goat plugin enabled and this
    checkout importable."""
    if importlib.util.find_spec("vllm") is not None:
        return
    if os.environ.get(_REEXEC_MARK):
        raise SystemExit(f"goat-serve: --engine vllm: vLLM is not importable in "
                         f"{sys.executable} (GOAT_VLLM_VENV={vllm_venv()})")
    try:
        python = ensure_vllm_venv()
    except RuntimeError as exc:
        raise SystemExit(f"goat-serve: --engine vllm: {exc}") from exc
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, _REEXEC_MARK: "1", "VLLM_PLUGINS": "goat",
           "PYTHONPATH": os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)}
    env.pop("VIRTUAL_ENV", None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(python), [str(python), "-m", "server", *argv], env)


def vllm_max_lora_rank(rows: int) -> int:
    """The smallest vLLM --max-lora-rank that holds `rows` LoRA rows per slot."""
    for rank in VLLM_RANKS:
        if rank >= rows:
            return rank
    raise ValueError(f"--max-lora-rank {rows} is over vLLM's largest ({VLLM_RANKS[-1]})")


def _kind(path: Path) -> str:
    try:
        peft_type = json.loads((path / CONFIG_FILE).read_text()).get("peft_type", "")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return {"GOAT": "goat", "LORA": "lora"}.get(peft_type, "unknown")


def to_vllm_params(params: SamplingParams) -> Any:
    from vllm import SamplingParams as VllmParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    structured = None
    if (c := params.constraint) is not None:  # vLLM's own structured outputs (xgrammar too)
        value: Any = c.spec
        if c.kind in ("json_object", "choice"):
            value = True if c.kind == "json_object" else json.loads(c.spec)
        structured = StructuredOutputsParams(**{c.kind: value},
                                             disable_any_whitespace=not c.any_whitespace)
    return VllmParams(
        structured_outputs=structured,
        n=params.n, max_tokens=params.max_tokens, min_tokens=params.min_tokens,
        temperature=params.temperature, top_p=params.top_p,
        top_k=max(params.top_k, 0), min_p=params.min_p, seed=params.seed,
        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty, stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids), ignore_eos=params.ignore_eos,
        logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
        skip_special_tokens=params.skip_special_tokens, output_kind=RequestOutputKind.DELTA)


def _logprobs(entries: Any) -> list[Any] | None:
    """Token id -> logprob per position; an entry is None only for the first prompt token (a
    completion's list has none), hence list[Any] for both uses."""
    if entries is None:
        return None
    return [None if e is None else {t: lp.logprob for t, lp in e.items()} for e in entries]


def _deltas(outputs: Any) -> list[CompletionDelta]:
    """vLLM's CompletionOutputs as deltas; EngineError (500) for one that vLLM's engine ended
    with an error, as vLLM's own server answers it, never as a finished completion."""
    if any(c.finish_reason == "error" for c in outputs):
        raise EngineError("vLLM's engine ended the request with an error (for example a "
                          "structured output the vocabulary cannot write; the server log says "
                          "which).", status=500)
    return [CompletionDelta(c.index, c.text, list(c.token_ids), _logprobs(c.logprobs),
                            c.finish_reason, c.stop_reason) for c in outputs]


def _ranks(entries: Any, prompt_token_ids: list[int]) -> list[int | None] | None:
    """Each prompt token's rank from vLLM's prompt logprobs (None for the first)."""
    if entries is None:
        return None
    return [None if e is None else e[t].rank for e, t in zip(entries, prompt_token_ids,
                                                              strict=True)]


class _Stats:
    """A vLLM stat logger (one per engine core) feeding the server's gauges and step metrics;
    vLLM calls `record` on the API server's event loop after each engine step."""

    def __init__(self, engine: "VllmAsyncEngine"):
        self.engine = engine

    def factory(self, vllm_config: Any, engine_index: int = 0) -> Any:
        from vllm.v1.metrics.loggers import StatLoggerBase

        owner = self.engine

        class Logger(StatLoggerBase):  # type: ignore[misc]  # vllm is untyped here
            def __init__(self, vllm_config: Any, engine_index: int = 0):
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any,
                       mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    owner._stats = EngineStats(scheduler_stats.num_running_reqs,
                                               scheduler_stats.num_waiting_reqs,
                                               float(scheduler_stats.kv_cache_usage))
                if iteration_stats is not None and owner.listener is not None:
                    tokens = iteration_stats.num_generation_tokens + getattr(
                        iteration_stats.prompt_token_stats, "computed", 0) or 0
                    if tokens:
                        owner.listener.on_step(owner._stats.num_running, tokens,
                                               sorted(owner._running_adapters()))

            def log_engine_initialized(self) -> None:
                pass

        return Logger(vllm_config, engine_index)


class VllmAsyncEngine:
    """goat-serve's engine interface on vLLM's AsyncLLM (see the module docstring)."""

    def __init__(self, config: EngineConfig, listener: EngineListener | None = None, *,
                 tensor_parallel_size: int = 1):
        from transformers import AutoTokenizer

        self.config = config
        self.listener = listener
        self.tensor_parallel_size = tensor_parallel_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(config.model_dir))
        self.base_name = config.base_name
        self.max_model_len = config.max_model_len or 0  # the engine's, once started
        self.max_lora_rank = vllm_max_lora_rank(config.max_lora_rank)
        self.llm: Any = None
        self._stats = EngineStats(0, 0, 0.0)
        self._accepting = True
        self._streams: dict[str, str | None] = {}  # running request id -> adapter
        self._adapters: dict[str, Any] = {}  # loaded adapter name -> vLLM LoRARequest
        self._unloading: set[str] = set()
        self._next_id = 1

    # ---- lifecycle --------------------------------------------------------------------------

    def engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        # goat-serve's meaning of --dtype, not vLLM's (whose auto is bfloat16 on the CPU)
        dtype = resolve_dtype(self.config.dtype, current_platform.device_type)
        return AsyncEngineArgs(
            model=str(self.config.model_dir), served_model_name=[self.base_name], dtype=dtype,
            max_model_len=self.config.max_model_len, max_num_seqs=self.config.max_num_seqs,
            enable_lora=True, max_loras=self.config.max_device_slots,
            max_cpu_loras=self.config.max_cpu_adapters, max_lora_rank=self.max_lora_rank,
            tensor_parallel_size=self.tensor_parallel_size,
            kv_cache_memory_bytes=self.config.kv_cache_memory, disable_log_stats=False,
            enable_prefix_caching=True)

    async def start(self) -> None:
        """Start vLLM (its engine core and workers are processes of their own), then load the
        pinned adapters (--adapter NAME=PATH)."""
        if self.llm is not None:
            return
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.config.merge_static:
            self._request_merge()
        self.llm = AsyncLLM.from_engine_args(
            self.engine_args(), usage_context=UsageContext.OPENAI_API_SERVER,
            stat_loggers=[_Stats(self).factory])
        self.max_model_len = self.llm.model_config.max_model_len
        for name, path in sorted(self.config.adapters.items()):
            await self.load_adapter(name, Path(path))

    def _request_merge(self) -> None:
        """--merge-static: the plugin merges the signature most GOAT adapters among --adapter
        and --adapter-dir share (merge.py); vLLM's processes inherit the setting."""
        from goat_runtime.vllm_plugin import merge
        from goat_runtime.vllm_plugin.state import linear_shapes

        paths = [*self.config.adapters.values(), *filter(None, [self.config.adapter_dir])]
        os.environ[merge.ENV] = os.pathsep.join(str(p) for p in paths)
        try:
            merge.merge_target(linear_shapes(Path(self.config.model_dir)))
        except RuntimeError as exc:
            # On by default: a store without GOAT adapters is the ordinary case, not a fault.
            logger.info("--merge-static: nothing merged: %s", exc)
            del os.environ[merge.ENV]

    @property
    def is_alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

    @property
    def failure(self) -> str | None:
        """vLLM's engine core died (its own log names the cause): the server exits non-zero."""
        if self.llm is not None and self.llm.errored:
            return "vLLM's engine core died (EngineDeadError; see the log above)"
        return None

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop accepting, let running requests finish within `timeout` s, abort the rest."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        if self.llm is not None:
            if self._streams and self.is_alive:
                await self.llm.abort(list(self._streams))
            self.llm.shutdown()

    # ---- requests ---------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: str | None = None,
                       tenant: str = "") -> AsyncGenerator[RequestOutput, None]:  # tenant: unused
        """Stream a request's outputs (deltas); closing the stream early aborts the request
        (vLLM's generator aborts on close)."""
        if not self._accepting or not self.is_alive:
            raise EngineError("The server is shutting down.", status=503)
        if adapter in self._unloading:
            raise EngineError(f"The model `{adapter}` does not exist.", status=404)
        check_prompt(prompt_token_ids, params.max_tokens, len(self.tokenizer),
                     self.max_model_len)
        if request_id in self._streams:
            raise EngineError(f"Request id {request_id!r} is already running.", status=400)
        lora = await self._lora_request(adapter) if adapter else None
        from vllm.inputs import TokensPrompt

        self._streams[request_id] = adapter
        arrival = time.time()
        first_token = None
        stream = self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_token_ids)),
                                   to_vllm_params(params), request_id, lora_request=lora)
        try:
            first = True
            async for out in stream:
                if first_token is None and any(c.token_ids for c in out.outputs):
                    first_token = time.time()
                deltas = _deltas(out.outputs)
                result = RequestOutput(
                    request_id, deltas, out.finished, len(prompt_token_ids),
                    prompt_logprobs=_logprobs(out.prompt_logprobs) if first else None,
                    prompt_logprob_ranks=_ranks(out.prompt_logprobs, prompt_token_ids)
                    if first else None)
                if out.finished:
                    now = time.time()
                    result.metrics = {"arrival_time": arrival, "first_scheduled_time": arrival,
                                      "first_token_time": first_token or now,
                                      "finished_time": now}
                first = False
                yield result
                if out.finished:
                    return
        except ValueError as exc:  # vLLM's input checks, the plugin's adapter check
            raise EngineError(str(exc), status=400) from exc
        except (EngineError, GeneratorExit, asyncio.CancelledError):
            raise
        except Exception as exc:
            if not self.is_alive:
                raise EngineError(f"The engine failed: {exc}", status=500) from exc
            raise
        finally:
            self._streams.pop(request_id, None)
            await stream.aclose()  # vLLM aborts a request whose stream closes unfinished

    def abort(self, request_id: str) -> None:
        if self.llm is not None and request_id in self._streams:
            asyncio.get_running_loop().create_task(self.llm.abort(request_id))

    def _running_adapters(self) -> set[str]:
        return {a for a in self._streams.values() if a}

    # ---- adapters ---------------------------------------------------------------------------

    def _path_of(self, name: str) -> Path | None:
        if name in self._adapters:
            return Path(self._adapters[name].lora_path)
        if self.config.adapter_dir is None:
            return None
        from goat_runtime.vllm_plugin.resolver import find_adapter

        return find_adapter(Path(self.config.adapter_dir), name)

    def _validate(self, path: Path) -> None:
        from goat_runtime.vllm_plugin.validate import validate

        validate(str(path), str(self.config.model_dir), None, self.max_lora_rank)

    async def _lora_request(self, name: str) -> Any:
        """The vLLM LoRARequest of a loaded adapter, or of one in the adapter directory (loaded
        on first use, like goat-serve's engine)."""
        if name in self._adapters:
            return self._adapters[name]
        path = self._path_of(name)
        if path is None:
            raise EngineError(f"The model `{name}` does not exist.", status=404)
        await self.load_adapter(name, path, on_first_use=True)
        return self._adapters[name]

    async def list_adapters(self) -> list[AdapterInfo]:
        infos = {name: AdapterInfo(name, _kind(Path(r.lora_path)), True, "host")
                 for name, r in self._adapters.items() if name not in self._unloading}
        root = self.config.adapter_dir
        if root is not None and Path(root).is_dir():
            for path in sorted(Path(root).iterdir()):
                if path.name not in infos and (path / CONFIG_FILE).is_file():
                    infos[path.name] = AdapterInfo(path.name, _kind(path), False, "disk")
        return sorted(infos.values(), key=lambda i: i.name)

    async def adapter_info(self, name: str) -> AdapterInfo | None:
        if name in self._unloading:
            return None
        if name in self._adapters:
            return AdapterInfo(name, _kind(Path(self._adapters[name].lora_path)), True, "host")
        path = self._path_of(name)
        return AdapterInfo(name, _kind(path), False, "disk") if path is not None else None

    async def load_adapter(self, name: str, path: Path | str, *,
                           on_first_use: bool = False) -> None:
        """Check the adapter with goat-serve's loader (AdapterError: a 400), then hand it to
        vLLM, which reads it into its host cache; a failed check never reaches vLLM. Local
        folders only: s3:// and hf:// adapters are the native engine's."""
        from vllm.lora.request import LoRARequest

        if is_url(str(path)):
            raise EngineError("--engine vllm loads adapters from local folders only (s3:// and "
                              "hf:// adapters need the native engine)", status=400)
        if name in self._adapters:
            if on_first_use:
                return
            raise EngineError(f"The adapter `{name}` is already loaded.", status=400)
        start = time.monotonic()
        await asyncio.to_thread(self._validate, Path(path))
        if name in self._adapters:  # loaded meanwhile by a concurrent first use
            return
        request = LoRARequest(name, self._next_id, str(path))
        self._next_id += 1
        self._adapters[name] = request
        try:
            await self.llm.add_lora(request)
        except Exception as exc:
            self._adapters.pop(name, None)
            raise EngineError(f"vLLM could not load adapter `{name}`: {exc}", status=500
                              ) from exc
        if self.listener is not None:
            self.listener.on_adapter_loaded(name, time.monotonic() - start)
            self.listener.on_adapter_location(name, "host")

    async def unload_adapter(self, name: str) -> None:
        """Forget an adapter once its running requests have finished (new ones get 404)."""
        if name not in self._adapters or name in self._unloading:
            raise EngineError(f"The adapter `{name}` is not loaded.", status=404)
        self._unloading.add(name)
        try:
            while name in self._running_adapters():
                await asyncio.sleep(0.05)
            request = self._adapters.pop(name)
            await self.llm.remove_lora(request.lora_int_id)
            if self.listener is not None:
                self.listener.on_adapter_location(name, None)
        finally:
            self._unloading.discard(name)

    def stats(self) -> EngineStats:
        return self._stats

    def native_metric_families(self) -> Iterator[Any]:
        """vLLM's own Prometheus families (`vllm:`: queue, KV cache, TTFT, inter-token
        latency, lora_requests_info, ...), for the server's /metrics. AsyncLLM records them in
        this process (its PrometheusStatLogger runs beside the output handler), in
        prometheus_client's default registry, or, where PROMETHEUS_MULTIPROC_DIR is set, in
        that directory's files, which `get_prometheus_registry` reads."""
        if self.llm is None:
            return
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        for family in get_prometheus_registry().collect():
            if family.name.startswith("vllm:"):
                yield family


def build_engine(config: EngineConfig, listener: EngineListener | None,
                 tensor_parallel_size: int) -> VllmAsyncEngine:
    """The server's engine for --engine vllm (AdapterError and ValueError: bad options)."""
    try:
        return VllmAsyncEngine(config, listener, tensor_parallel_size=tensor_parallel_size)
    except (AdapterError, ValueError) as exc:
        raise SystemExit(f"goat-serve: error: {exc}") from exc
