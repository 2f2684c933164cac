"""The asyncio front of the engine: add a request, get an async stream of its outputs.

The LLMEngine is built and run on its own thread (torch releases the GIL in its kernels, so the
server's event loop stays responsive). Everything that touches engine state runs on that thread:
callers post commands to it, and it posts each output back to the caller's event loop.

A fault charged to requests fails those alone (faults.py). One that is not ends the engine
thread: every open stream fails with a 500 naming it, `failure` names it (the server's /health
answers 503 with it) and nothing is accepted any more; the server process then exits non-zero
for a supervisor to restart it (server/cli.py).
"""

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from pathlib import Path

from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.faults import dead_engine_error, describe
from goat_runtime.engine.outputs import (
    AdapterInfo,
    EngineError,
    EngineListener,
    EngineStats,
    RequestOutput,
    StreamItem,
    stream_outputs,
)
from goat_runtime.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

_Delivery = tuple["asyncio.Queue[StreamItem]", RequestOutput]  # an output and its stream


class AsyncEngine:
    def __init__(self, config: EngineConfig, listener: EngineListener | None = None):
        self._commands: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._go = threading.Event()  # start() or shutdown(): the thread may step or end
        self._stop = False
        # The engine thread builds the engine, then steps it: the CPU's OpenMP runtime keeps a
        # team of threads per thread that ran a parallel region, and with more team threads
        # than cores (the model built here, stepped there) idle ones sleep instead of spinning,
        # so each of a step's parallel regions waits for them to wake: steps 1.4x slower
        # (docs/benchmarks.md section 0).
        built: Future[LLMEngine] = Future()
        self._thread = threading.Thread(target=self._main, args=(config, listener, built),
                                        name="goat-engine", daemon=True)
        self._thread.start()
        self.engine = built.result()  # the build's error, raised here
        self.config = config
        self.tokenizer = self.engine.tokenizer
        self.base_name = config.base_name
        self.max_model_len = self.engine.max_model_len
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop,
                                       asyncio.Queue[StreamItem]]] = {}
        self._unloading: set[str] = set()
        self._accepting = True
        self._error: BaseException | None = None
        self._stats = EngineStats(0, 0, 0.0)

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        self._go.set()

    @property
    def is_alive(self) -> bool:
        return self._go.is_set() and self._thread.is_alive() and self._error is None

    @property
    def failure(self) -> str | None:
        """What killed the engine loop ("Type: message"), None while it has not died."""
        return describe(self._error) if self._error is not None else None

    async def shutdown(self, timeout: float = 0.0) -> None:
        """Stop accepting requests, let running ones finish within `timeout` seconds, abort the
        rest and stop the engine thread."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline and self.is_alive:
            await asyncio.sleep(0.05)
        for request_id in list(self._streams):
            self.abort(request_id)
        self._stop = True
        self._wake.set()
        self._go.set()
        await asyncio.to_thread(self._thread.join, 10)
        self.engine.adapters.shutdown()
        self.engine.grammars.shutdown()

    def _main(self, config: EngineConfig, listener: EngineListener | None,
              built: "Future[LLMEngine]") -> None:
        try:
            engine = LLMEngine(config, listener)
        except BaseException as exc:
            built.set_exception(exc)
            return
        built.set_result(engine)
        self._go.wait()
        self._run()

    def _run(self) -> None:
        try:
            while not self._stop:
                self._run_commands()
                self._refresh_stats()
                if not self.engine.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._deliver(outputs)
                self._refresh_stats()
                if not outputs and not self.engine.scheduler.running:
                    # Only requests whose adapters are loading: wait for a load or a command.
                    self._wake.wait(0.05)
                    self._wake.clear()
            self._run_commands()
        except BaseException as exc:  # the loop is dead: fail every stream, /health turns 503
            logger.exception("engine loop failed")
            self._error = exc  # before the streams are listed: see generate()
            for loop, stream in list(self._streams.values()):
                loop.call_soon_threadsafe(stream.put_nowait, self._dead_error())

    def _dead_error(self, status: int = 500) -> EngineError:
        return dead_engine_error(self.failure, status)

    def _refresh_stats(self) -> None:
        running, waiting, usage = self.engine.stats()
        self._stats = EngineStats(running, waiting, usage)

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _post(self, command: Callable[[], object]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their streams: one wake-up of each event loop per step, not one
        per sequence (each is a write to the loop's self-pipe, on this thread: 4 % of it with
        16 streams, measured with py-spy)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Delivery]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if entry is not None:
                loop, stream = entry
                by_loop.setdefault(loop, []).append((stream, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    # ---- requests ---------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: str | None = None,
                       tenant: str = "") -> AsyncGenerator[RequestOutput, None]:
        """Stream a request's outputs; closing the stream early aborts the request. `tenant`
        (who sent it) is what the fair-share scheduling shares capacity between."""
        self._check_new_request(request_id, prompt_token_ids, params, adapter)
        if params.constraint is not None:  # off the engine thread, within the time limit
            await asyncio.to_thread(self.engine.grammars.compile, params.constraint)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._streams[request_id] = (loop, stream)
        if self._error is not None:  # died since the check above: its handler may miss us
            self._streams.pop(request_id, None)
            raise self._dead_error()

        def close(finished: bool) -> None:
            self._streams.pop(request_id, None)
            if not finished:
                self._post(lambda: self.engine.abort(request_id))

        start = functools.partial(self._post, functools.partial(
            self._add_request, request_id, prompt_token_ids, params, adapter, tenant, loop,
            stream))
        async with contextlib.aclosing(stream_outputs(stream, start, close)) as outputs:
            async for output in outputs:
                yield output

    def _check_new_request(self, request_id: str, prompt_token_ids: list[int],
                           params: SamplingParams, adapter: str | None) -> None:
        """Raise EngineError for a request that cannot be accepted now."""
        if self._error is not None:
            raise self._dead_error(status=503)
        if not self._accepting or not self.is_alive:
            raise EngineError("The server is shutting down.", status=503)
        if adapter in self._unloading:
            raise EngineError(f"The model `{adapter}` does not exist.", status=404)
        self.engine.check_request(prompt_token_ids, params, adapter)
        if request_id in self._streams:
            raise EngineError(f"Request id {request_id!r} is already running.", status=400)

    def _add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     adapter: str | None, tenant: str, loop: asyncio.AbstractEventLoop,
                     stream: asyncio.Queue[StreamItem]) -> None:
        """On the engine thread: add the request (an error goes to its stream) and wake the
        loop when its adapter has loaded."""
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, adapter, tenant)
        except Exception as exc:
            loop.call_soon_threadsafe(stream.put_nowait, exc)
            return
        future = self.engine.adapters.request_load(adapter) if adapter else None
        if future is not None:
            future.add_done_callback(lambda _: self._wake.set())

    def abort(self, request_id: str) -> None:
        entry = self._streams.pop(request_id, None)

        def run() -> None:
            out = self.engine.abort(request_id)
            if out is not None and entry is not None:
                entry[0].call_soon_threadsafe(entry[1].put_nowait, out)

        self._post(run)

    # ---- adapters ---------------------------------------------------------------------------

    async def list_adapters(self) -> list[AdapterInfo]:
        return [i for i in self.engine.adapters.infos() if i.name not in self._unloading]

    async def adapter_info(self, name: str) -> AdapterInfo | None:
        """One adapter's entry (loaded, or available in the adapter directory), or None."""
        if name in self._unloading:
            return None
        return self.engine.adapters.info(name)

    async def load_adapter(self, name: str, path: Path | str) -> None:
        """Load `name` from a local folder or an s3:// / hf:// URL (fetched first)."""
        if self.engine.adapters.is_loaded(name) or self.engine.adapters.status(name) == "loading":
            raise EngineError(f"The adapter `{name}` is already loaded.", status=400)
        future = self.engine.adapters.request_load(name, path)
        await asyncio.wrap_future(future)

    async def unload_adapter(self, name: str) -> None:
        """Forget an adapter once its requests have finished: new requests naming it get 404
        from now on, and the ones already accepted (queued, running, or posted to the engine
        thread and not added yet) complete first. The check that none is left and the unload
        run together on the engine thread, where requests are added."""
        if not self.engine.adapters.is_loaded(name) or name in self._unloading:
            raise EngineError(f"The adapter `{name}` is not loaded.", status=404)
        self._unloading.add(name)
        loop = asyncio.get_running_loop()
        try:
            while True:
                done: asyncio.Future[bool] = loop.create_future()

                def run(done: asyncio.Future[bool] = done) -> None:
                    try:
                        unloaded = not self.engine.adapters.refs(name)
                        if unloaded:
                            self.engine.adapters.unload(name)
                    except Exception as exc:
                        loop.call_soon_threadsafe(done.set_exception, exc)
                    else:
                        loop.call_soon_threadsafe(done.set_result, unloaded)

                self._post(run)
                while not done.done():
                    if not self.is_alive:  # the command will never run
                        raise EngineError("The engine is not running.", status=503)
                    await asyncio.wait({done}, timeout=0.5)
                if done.result():
                    return
                await asyncio.sleep(0.05)
        finally:
            self._unloading.discard(name)

    def stats(self) -> EngineStats:
        return self._stats


def _put_all(items: list[_Delivery]) -> None:
    """On the event loop: a step's outputs into their streams, in the step's order."""
    for stream, out in items:
        stream.put_nowait(out)
