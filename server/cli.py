"""`goat-serve`: start the OpenAI-compatible server (or, with a first argument `adapters`, run
the adapter tools)."""

import argparse
import asyncio
import gc
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from server.protocol import valid_name

if TYPE_CHECKING:  # imported lazily: `goat-serve --help` starts without torch and FastAPI
    from goat_runtime.engine.config import EngineConfig
    from server.engine import ServingEngine
    from server.metrics import ServerMetrics
    from server.state import ServerState, Settings

logger = logging.getLogger("server")

REPO_ADAPTERS = Path(__file__).resolve().parents[1] / "adapters"
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '2GiB', '512MiB', '1G', '1.5gb' or '1048576'. K/M/G/T are powers of 1000,
    Ki/Mi/Gi/Ti powers of 1024; a trailing 'B' is optional."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use bytes or a unit, e.g. 2GiB, 512MiB, 1G")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"size {text!r} must be at least one byte")
    return int(value)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _template(text: str) -> str:
    """--chat-template: the file's text, read while parsing so a wrong path stops the start."""
    try:
        return Path(text).read_text()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read chat template {text!r}: "
                                         f"{exc.strerror}") from exc


def _adapter_dir(text: str) -> Path | str:
    # --adapter-dir and --adapter paths are checked while parsing: before the default model is
    # prepared, before --engine vllm re-executes, before any model loads.
    from goat_runtime.engine.config import check_adapter_dir

    try:
        return check_adapter_dir(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _adapter_root(text: str) -> Path | str:
    from goat_runtime.adapters.store import check_location, is_url

    if not is_url(text):
        return Path(text)
    try:
        return check_location(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _named_adapter(text: str) -> tuple[str, Path | str]:
    name, sep, path = text.partition("=")
    if not sep or not path or not valid_name(name):
        raise argparse.ArgumentTypeError(
            f"expected NAME=PATH with NAME matching [A-Za-z0-9][A-Za-z0-9._-]*, got {text!r}")
    return name, _adapter_dir(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="goat-serve",
        description="Serve a base model with GOAT and LoRA adapters over an OpenAI-compatible "
                    "HTTP API. Run `goat-serve adapters --help` for the adapter tools.")
    p.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", type=Path,
                   help="base model directory (config, safetensors, tokenizer). Default: the "
                        "embedded SmolLM2-135M-Instruct, with the repository's demo adapters")
    g = p.add_argument_group("adapters")
    g.add_argument("--adapter-dir", type=_adapter_dir, metavar="DIR|URL",
                   help="folder of adapter folders, served by folder name and loaded on first "
                        "use: a local folder (must exist), s3://bucket/prefix or "
                        "hf://org/repo[@revision][/folder] (fetched into --adapter-cache-dir "
                        "or the Hub's cache)")
    g.add_argument("--adapter", action="append", type=_named_adapter, default=[],
                   metavar="NAME=PATH", help="preload and pin an adapter: a folder or a URL "
                                             "as for --adapter-dir (repeatable)")
    g.add_argument("--allowed-adapter-root", action="append", type=_adapter_root, default=[],
                   metavar="DIR|URL", help="a further folder or URL prefix "
                                           "/v1/load_lora_adapter may load from (repeatable); "
                                           "by default only --adapter-dir")
    g.add_argument("--adapter-cache-dir", type=Path, metavar="DIR",
                   help="where adapters from S3 are downloaded (default "
                        "$GOAT_CACHE_DIR/adapters; Hub adapters use the Hub's cache)")
    g.add_argument("--max-adapter-size", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="largest remote adapter downloaded, its files together (default 1GiB)")
    g.add_argument("--adapter-download-timeout", type=_positive_float, default=60.0,
                   metavar="S", help="seconds per network call of a download (default 60)")
    g.add_argument("--max-loras", type=_positive, metavar="N",
                   help="accelerator (CUDA) adapter slots, the most distinct adapters one step "
                        "serves there (default 8; with --max-gpu-adapter-memory, as many as it "
                        "holds, up to --max-cpu-adapters). Not a bound on the CPU, whose slots "
                        "are host memory")
    g.add_argument("--max-gpu-adapter-memory", type=parse_size, metavar="SIZE",
                   help="accelerator memory for adapter slots, e.g. 2GiB: the slot count is "
                        "what it holds at one slot's bytes (the largest rank and expert count "
                        "in the pool), at most --max-loras where given; start-up fails if it "
                        "holds no slot (default: --max-loras slots, whatever their size; "
                        "ignored on the CPU; --engine goat only)")
    g.add_argument("--max-cpu-adapters", type=_positive, default=32, metavar="N",
                   help="adapters kept in host memory (default 32)")
    g.add_argument("--max-cpu-adapter-memory", type=parse_size, metavar="SIZE",
                   help="host memory for loaded adapters, e.g. 4GiB: least recently used ones "
                        "are evicted beyond it as beyond --max-cpu-adapters (default: no byte "
                        "bound; adapters in use may exceed it)")
    g.add_argument("--max-lora-rank", type=_positive, default=64, metavar="N",
                   help="largest adapter rank accepted, all experts together (default 64)")
    g.add_argument("--merge-static", action=argparse.BooleanOptionalAction, default=True,
                   help="fold the static correction of the init signature most GOAT adapters in "
                        "--adapter-dir and --adapter share into the base weights, and undo it "
                        "as a low-rank term for the base, LoRA adapters, other signatures and "
                        "untargeted modules: results stay exact, adapters of that signature "
                        "read less per step (default: on; nothing is merged without GOAT "
                        "adapters at start-up; --no-merge-static turns it off; with --engine "
                        "vllm it sets GOAT_VLLM_MERGE_STATIC the same way)")
    m = p.add_argument_group("model and engine")
    m.add_argument("--served-model-name", metavar="NAME",
                   help="name of the base model in the API (default: MODEL_DIR's folder name)")
    m.add_argument("--max-num-seqs", type=_positive, default=64, metavar="N",
                   help="sequences running at once (default 64)")
    m.add_argument("--max-model-len", type=_positive, metavar="N",
                   help="context length, prompt plus output (default: the model's)")
    m.add_argument("--kv-cache-memory", type=parse_size, default=1 << 30, metavar="SIZE",
                   help="KV cache size, e.g. 2GiB, 512MiB, 1G (default 1GiB)")
    m.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weight and activation dtype (default auto)")
    m.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (default auto: cuda if available)")
    m.add_argument("--no-pack-weights", dest="pack_weights", action="store_false",
                   help="on the CPU in float32, do not keep a second copy of the linear weights "
                        "in oneDNN's blocked layout (it makes decode steps faster and doubles "
                        "those weights' memory)")
    m.add_argument("--scheduling-policy", choices=("fair", "fcfs"), default="fair",
                   help="order of the waiting requests under overload: fair shares capacity "
                        "between API keys by tokens served (a Virtual Token Counter per key; "
                        "first come, first served with one key), fcfs ignores keys (default "
                        "fair; --engine goat only)")
    m.add_argument("--engine", choices=("goat", "vllm"), default="goat",
                   help="goat: goat-serve's engine (default); vllm: vLLM's engine with the goat "
                        "plugin, run in the vLLM environment (GOAT_VLLM_VENV, docs/vllm.md)")
    m.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=False,
                   help="run goat-serve's engine in a process of its own, so that the HTTP "
                        "server's Python and the engine's run on two cores instead of taking "
                        "turns on one interpreter (default off; --engine goat only)")
    m.add_argument("--tensor-parallel-size", type=_positive, default=1, metavar="N",
                   help="devices one model is split over (--engine vllm only; default 1)")
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port to bind (default 8000)")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health and "
                        "/metrics (repeatable for several keys; also read from "
                        "GOAT_SERVE_API_KEY, which keeps it out of the process list)")
    s.add_argument("--api-keys-file", type=Path, metavar="PATH",
                   help="tenant keys, YAML or TOML: per key an id, the SHA-256 of its secret, "
                        "the models it may use (names and globs), whether it may load and "
                        "unload adapters (admin), and limits (requests and tokens per minute, "
                        "concurrent requests); re-read on SIGHUP and POST /v1/admin/reload_keys "
                        "(README: Tenant keys). With it, /metrics needs an admin key")
    s.add_argument("--max-queued-requests", type=int, metavar="N",
                   help="sequences allowed to wait for a slot; more get 429 with Retry-After "
                        "(default: no limit)")
    s.add_argument("--max-request-bytes", type=parse_size, default=4 << 20, metavar="SIZE",
                   help="largest request body; larger gets 413 (default 4MiB)")
    s.add_argument("--shutdown-timeout", type=_non_negative_float, default=30.0, metavar="S",
                   help="on SIGTERM, seconds in-flight requests get to finish before they are "
                        "aborted (default 30)")
    s.add_argument("--chat-template", type=_template, metavar="PATH",
                   help="a Jinja chat template file used instead of the model's (default: the "
                   "model's; for tools, a Hermes-style one when the model's ChatML template "
                   "does not render them)")
    s.add_argument("--tool-call-parser", choices=("hermes",), default="hermes",  # tools.py
                   help="how tool calls are read from the output (default hermes: "
                   "<tool_call> JSON blocks)")
    s.add_argument("--grammar-compile-timeout", type=_non_negative_float, default=10.0,
                   metavar="S", help="seconds a structured output's grammar may take to "
                   "compile before the request is refused (default 10)")
    s.add_argument("--log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "adapters":
        # A model directory literally named 'adapters' can still be served as ./adapters.
        from server.adapters_cli import main as adapter_tools

        return adapter_tools(args_list[1:]) or 0
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.engine == "vllm":
        from goat_runtime.adapters.store import is_url

        if args.max_gpu_adapter_memory is not None:
            parser.error("--max-gpu-adapter-memory needs --engine goat (vLLM sizes its slots "
                         "by --max-loras and --max-lora-rank)")

        if any(is_url(s) for s in (args.adapter_dir or "", *(p for _, p in args.adapter))):
            parser.error("--engine vllm serves local adapter folders only (not s3:// or hf://)")
        from goat_runtime.vllm_plugin.async_engine import reexec_in_vllm_venv

        reexec_in_vllm_venv(args_list)  # returns only where vLLM is importable
    elif args.tensor_parallel_size != 1:
        parser.error("--tensor-parallel-size needs --engine vllm")
    serve(args)
    return 0


def reload_keys(state: "ServerState") -> None:
    """SIGHUP: re-read the key file; a bad one is logged and the keys in force stay. (Python
    runs signal handlers on the main thread, the event loop's, between its callbacks.)"""
    from server.tenants import KeyFileError

    try:
        table = state.reload_keys()
    except KeyFileError as exc:
        logger.error("key file refused, the keys in force stay: %s", exc)
        return
    logger.info("key file reloaded: %d keys", len(table.keys))


def _model_and_adapter_dirs(args: argparse.Namespace) -> tuple[Path, Path | str | None]:
    """--model-dir and --adapter-dir, or the embedded default model with the demo adapters."""
    model_dir, adapter_dir = args.model_dir, args.adapter_dir
    if model_dir is None:
        from goat_runtime.default_model import default_model_dir

        try:
            model_dir = default_model_dir()
        except Exception as exc:  # missing wheel, failed conversion: say so, no traceback
            raise SystemExit(f"goat-serve: cannot prepare the default model: {exc}") from exc
        if adapter_dir is None and REPO_ADAPTERS.is_dir():
            adapter_dir = REPO_ADAPTERS
    return Path(model_dir), adapter_dir


def _engine_config(args: argparse.Namespace) -> "EngineConfig":
    from goat_runtime.engine.config import EngineConfig

    model_dir, adapter_dir = _model_and_adapter_dirs(args)
    try:
        return EngineConfig(
            model_dir=model_dir, adapter_dir=adapter_dir, adapters=dict(args.adapter),
            served_model_name=args.served_model_name, dtype=args.dtype, device=args.device,
            max_loras=args.max_loras, max_cpu_adapters=args.max_cpu_adapters,
            max_cpu_adapter_memory=args.max_cpu_adapter_memory,
            max_gpu_adapter_memory=args.max_gpu_adapter_memory,
            max_lora_rank=args.max_lora_rank, max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len, kv_cache_memory=args.kv_cache_memory,
            merge_static=args.merge_static, pack_weights=args.pack_weights,
            adapter_cache_dir=args.adapter_cache_dir, max_adapter_size=args.max_adapter_size,
            adapter_download_timeout=args.adapter_download_timeout,
            scheduling_policy=args.scheduling_policy,
            grammar_compile_timeout=args.grammar_compile_timeout)
    except ValueError as exc:
        raise SystemExit(f"goat-serve: error: {exc}") from exc


def _settings(args: argparse.Namespace) -> "Settings":
    """The HTTP layer's settings; a bad key file stops start-up here, before the model loads."""
    from server.state import Settings
    from server.tenants import KeyFileError, Keyring

    env_key = os.environ.get("GOAT_SERVE_API_KEY")
    settings = Settings(
        api_keys=tuple(args.api_key) + ((env_key,) if env_key else ()),
        api_keys_file=args.api_keys_file,
        allowed_adapter_roots=tuple(args.allowed_adapter_root),
        max_queued_requests=args.max_queued_requests,
        max_request_bytes=args.max_request_bytes, shutdown_timeout=args.shutdown_timeout,
        chat_template=args.chat_template, tool_call_parser=args.tool_call_parser)
    try:
        Keyring(settings.api_keys, settings.api_keys_file)
    except KeyFileError as exc:
        raise SystemExit(f"goat-serve: error: {exc}") from exc
    return settings


def _engine(args: argparse.Namespace, config: "EngineConfig",
            metrics: "ServerMetrics") -> "ServingEngine":
    from goat_runtime.adapters.format import AdapterError
    from goat_runtime.engine.adapter_slots import SlotBudgetError
    from goat_runtime.engine.async_engine import AsyncEngine
    from goat_runtime.engine.process_engine import ProcessEngine

    logger.info("loading %s", config.model_dir)
    if args.engine == "vllm":
        from goat_runtime.vllm_plugin.async_engine import build_engine

        return build_engine(config, metrics, args.tensor_parallel_size)
    try:  # a pinned adapter that cannot be loaded, a slot budget too small: one line
        if args.engine_process:
            return ProcessEngine(config, listener=metrics)
        return AsyncEngine(config, listener=metrics)
    except (AdapterError, SlotBudgetError) as exc:
        raise SystemExit(f"goat-serve: error: {exc}") from exc


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.app import create_app, drain
    from server.metrics import ServerMetrics
    from server.tenants import KeyFileError

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _engine_config(args)
    settings = _settings(args)
    metrics = ServerMetrics(max_loras=config.max_device_slots)
    engine = _engine(args, config, metrics)
    try:
        app = create_app(engine, settings, metrics)
    except KeyFileError as exc:  # changed since the check above
        raise SystemExit(f"goat-serve: error: {exc}") from exc
    if settings.api_keys_file is not None:
        signal.signal(signal.SIGHUP, lambda signum, frame: reload_keys(app.state.server))
    # The model, tokenizer and app are ~400,000 objects that live as long as the process: out of
    # the cyclic GC, whose every full collection walked them all (250 ms on SmolLM2, with the
    # GIL held: a stalled step, at random; docs/benchmarks.md section 7). Start-up's garbage
    # is collected first, not kept.
    gc.collect()
    gc.freeze()

    def engine_failure() -> str | None:
        return engine.failure

    class Server(uvicorn.Server):
        async def on_tick(self, counter: int) -> bool:
            # A dead engine stops the server (its streams have been failed with the cause):
            # the process exits non-zero below, for a supervisor to restart it.
            return await super().on_tick(counter) or engine_failure() is not None

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            # Drain alongside uvicorn's own shutdown: it stops accepting and waits for open
            # connections, while the drain lets in-flight requests finish, then aborts them.
            draining = asyncio.ensure_future(drain(app))
            await super().shutdown(sockets)
            await draining

    # access_log off: the app writes its own, with each request's key id (server/auth.py)
    # uvloop and httptools by name ("auto" would fall back to asyncio's loop and h11 without a
    # word): where the loop's one SSE event per token is the bottleneck, they stream 1.3x the
    # tokens/s (docs/benchmarks.md section 8)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                               loop="uvloop", http="httptools", access_log=False,
                               timeout_graceful_shutdown=args.shutdown_timeout + 5,
                               timeout_keep_alive=5)
    Server(uv_config).run()
    if engine_failure() is not None:
        raise SystemExit(f"goat-serve: the engine failed ({engine_failure()}); exiting so that "
                         "a supervisor restarts the server")
