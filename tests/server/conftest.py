"""Servers for the HTTP tests: the real engine on the goat-peft-tiny fixture behind a real
uvicorn on 127.0.0.1 (in a thread), and a small scripted fake engine for failures that are hard
to provoke for real (an engine error in the middle of a stream)."""

import asyncio
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from safetensors.torch import load_file

from goat_runtime.engine.outputs import (
    AdapterInfo,
    CompletionDelta,
    EngineError,
    EngineStats,
    RequestOutput,
)
from goat_runtime.engine.sampling import SamplingParams
from server.app import create_app
from server.metrics import ServerMetrics
from server.state import Settings

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"
REFERENCE = {k: v.tolist() for k, v in
             load_file(str(FIXTURE / "reference_outputs.safetensors")).items()
             if "logits" not in k}
PROMPTS = [REFERENCE[f"input_{i}"] for i in range(3)]
ADAPTERS = ["goat0", "goat1", "lora0"]
BASE = "base"  # the fixture base folder's name, hence its served name
API_KEY = "test-key-0123456789"


def greedy(model: str, i: int) -> list[int]:
    """The reference greedy tokens of `model` (BASE or an adapter) after PROMPTS[i]."""
    return REFERENCE[f"{'base' if model == BASE else model}_greedy_{i}"]


def token_ids(text: str) -> list[int]:
    """Token ids from the fixture tokenizer's text ('w5 w6' -> [5, 6])."""
    return [int(word[1:]) for word in text.split()]


class LiveServer:
    """An app served by uvicorn on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app: Any, engine: Any = None, adapter_dir: Path | None = None):
        self.app = app
        self.engine = engine
        self.adapter_dir = adapter_dir
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=f"{self.url}/v1", max_retries=0, timeout=60, **kwargs)

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)


def wait_healthy(proc: "subprocess.Popen[bytes]", url: str, timeout: float = 90.0) -> None:
    """Poll `url`/health until it answers 200; fails with the server's output if the process
    exits first, or if `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)


def copy_adapters(dest: Path) -> Path:
    """A writable copy of the fixture's adapters, so tests can add or break folders."""
    shutil.copytree(FIXTURE / "adapters", dest)
    return dest


def start_real_server(tmp: Path, settings: Settings | None = None,
                      engine_class: Any = None, **config: Any) -> LiveServer:
    """The real engine (fp32, CPU, small KV cache) on the fixture base, with an adapter dir
    copied into `tmp`; `engine_class` AsyncEngine (default) or ProcessEngine."""
    from goat_runtime.engine.async_engine import AsyncEngine
    from goat_runtime.engine.config import EngineConfig

    adapter_dir = copy_adapters(tmp / "adapters")
    options = dict(model_dir=FIXTURE / "base", adapter_dir=adapter_dir, dtype="float32",
                   device="cpu", kv_cache_memory=8 << 20, max_loras=4, max_num_seqs=16,
                   static_cache_dir=tmp / "static")
    options.update(config)
    metrics = ServerMetrics(max_loras=options["max_loras"])
    engine = (engine_class or AsyncEngine)(EngineConfig(**options), listener=metrics)
    app = create_app(engine, settings or Settings(), metrics)
    return LiveServer(app, engine, adapter_dir)


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The shared real server (no API key; tests must leave its adapter set as they found
    it)."""
    live = start_real_server(tmp_path_factory.mktemp("server"))
    yield live
    live.stop()


@pytest.fixture(scope="package")
def client(server: LiveServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="package")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c


# ---- a scripted fake engine ----------------------------------------------------------------

@dataclass
class _FakeConfig:
    adapter_dir: Path | None = None
    max_device_slots: int = 2
    max_num_seqs: int = 4


@dataclass
class FakeEngine:
    """The AsyncEngine API with scripted behaviour: each request emits `steps` tokens (id 10 +
    step) and then, if `fail_after` is set, raises `fault` mid-stream."""

    tokenizer: Any
    base_name: str = BASE
    max_model_len: int = 64
    config: _FakeConfig = field(default_factory=_FakeConfig)
    steps: int = 3
    fail_after: int | None = None
    fault: Exception = field(default_factory=lambda: EngineError("the GPU caught fire", 500))
    step_delay: float = 0.0
    adapters: list[AdapterInfo] = field(default_factory=lambda: [
        AdapterInfo("goat0", "goat", True, "device")])
    alive: bool = False
    aborted: list[str] = field(default_factory=list)
    running: int = 0

    async def start(self) -> None:
        self.alive = True

    async def shutdown(self, timeout: float = 0.0) -> None:
        self.alive = False

    @property
    def is_alive(self) -> bool:
        return self.alive

    @property
    def failure(self) -> str | None:
        return None

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: str | None = None,
                       tenant: str = "") -> AsyncIterator[RequestOutput]:
        finished = False
        self.running += 1
        try:
            for step in range(self.steps):
                if self.fail_after is not None and step == self.fail_after:
                    raise self.fault
                await asyncio.sleep(self.step_delay)
                last = step == self.steps - 1
                finished = last
                yield RequestOutput(
                    request_id, [CompletionDelta(i, f" w{10 + step}", [10 + step], None,
                                                 "length" if last else None)
                                 for i in range(params.n)],
                    finished=last, num_prompt_tokens=len(prompt_token_ids))
        finally:
            self.running -= 1
            if not finished:
                self.aborted.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def list_adapters(self) -> list[AdapterInfo]:
        return list(self.adapters)

    async def adapter_info(self, name: str) -> AdapterInfo | None:
        return next((a for a in self.adapters if a.name == name), None)

    async def load_adapter(self, name: str, path: Path | str) -> None:
        raise EngineError("not in the fake", 400)

    async def unload_adapter(self, name: str) -> None:
        raise EngineError(f"The adapter `{name}` is not loaded.", 404)

    def stats(self) -> EngineStats:
        return EngineStats(self.running, 0, 0.0)


@pytest.fixture(scope="package")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE / "base")


@pytest.fixture
def fake_server(tokenizer: Any) -> Iterator[Callable[..., LiveServer]]:
    """Start servers over FakeEngines: fake_server(settings=None, **engine_fields)."""
    started: list[LiveServer] = []

    def start(settings: Settings | None = None, **fields: Any) -> LiveServer:
        engine = FakeEngine(tokenizer, **fields)
        live = LiveServer(create_app(engine, settings or Settings()), engine)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()
