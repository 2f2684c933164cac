"""`ProcessEngine`: the server's engine interface on an engine in a process of its own
(engine_core.py), so that the server's event loop and the engine's Python run on two cores
instead of taking turns on one interpreter.

This side keeps only what the server reads between steps (the tokenizer, the engine's stats,
whether it lives) and one asyncio queue per request; the event loop that started it reads the
engine process's messages (a step's outputs in one), puts each output in its stream, and
replays the engine's listener events on the server's listener (its metrics). Adapter lookups,
loads and unloads are calls answered by the engine process. If that process dies, every open
stream fails with a 500 naming it and `failure` says so, as when `AsyncEngine`'s thread dies.
"""

import asyncio
import contextlib
import functools
import itertools
import logging
import multiprocessing
import threading
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from goat_runtime.engine import engine_core
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import load_tokenizer
from goat_runtime.engine.faults import dead_engine_error
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

_Stream = tuple[asyncio.AbstractEventLoop, "asyncio.Queue[StreamItem]"]
_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class ProcessEngine:
    def __init__(self, config: EngineConfig, listener: EngineListener | None = None):
        """Start the engine process and wait until its model has loaded; an error building
        the engine there (a bad adapter pinned, a slot budget too small) is raised here."""
        self.config = config
        self.base_name = config.base_name
        self._listener = listener
        context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=engine_core.main, name="goat-engine",
            args=(config, child_conn, logging.getLogger().getEffectiveLevel()))
        self._streams: dict[str, _Stream] = {}
        self._calls: dict[int, _Call] = {}
        self._call_ids = itertools.count()
        self._send_lock = threading.Lock()
        self._stats = EngineStats(0, 0, 0.0)
        self._failure: str | None = None
        self._accepting = True
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None  # the one that reads the pipe
        self._process.start()
        child_conn.close()
        self.max_model_len = self._wait_ready()
        self.tokenizer = load_tokenizer(config)

    def _wait_ready(self) -> int:
        try:
            messages = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited while starting (exit code "
                               f"{self._process.exitcode})") from None
        self._replay(messages)
        kind, value = messages[0][:2]
        if kind == engine_core.FAILED:
            self._process.join()
            raise engine_core.unpack_error(value)
        return int(value)

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._on_readable)

    @property
    def is_alive(self) -> bool:
        return self._failure is None and self._loop is not None and self._process.is_alive()

    @property
    def failure(self) -> str | None:
        """What killed the engine (its loop, or its process), None while it lives."""
        return self._failure

    async def shutdown(self, timeout: float = 0.0) -> None:
        """As AsyncEngine.shutdown, in the engine process; then that process exits."""
        self._accepting = False
        self._stopping = True
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._send((engine_core.SHUTDOWN, timeout))
            await asyncio.to_thread(self._process.join, timeout + 20)
        if self._process.is_alive():
            logger.warning("the engine process did not stop; terminating it")
            self._process.terminate()
            await asyncio.to_thread(self._process.join, 5)
        self._stop_reading()
        self._conn.close()

    def _dead_error(self, status: int = 500) -> EngineError:
        return dead_engine_error(self._failure, status)

    # ---- the engine process's messages (on the event loop) --------------------------------

    def _on_readable(self) -> None:
        """Every message waiting in the pipe. Read on the event loop itself: a reader thread
        would wait for the loop's GIL to unpickle, then the loop for that thread's."""
        try:
            while self._conn.poll():
                messages = self._conn.recv()
                self._replay(messages)
                if messages and messages[-1][0] == engine_core.STOPPED:
                    self._stop_reading()
                    return
        except (EOFError, OSError):
            if not self._stopping:
                self._process.join(1)
                self._failure = (f"EngineProcessExited: the engine process exited (exit code "
                                 f"{self._process.exitcode})")
                logger.error("%s", self._failure)
            self._stop_reading()

    def _stop_reading(self) -> None:
        """No more messages: every open stream and call fails (the engine is gone)."""
        if self._loop is not None and not self._conn.closed:
            self._loop.remove_reader(self._conn.fileno())
        error = (self._dead_error() if self._failure is not None
                 else EngineError("The engine has stopped.", status=503))
        for loop, stream in list(self._streams.values()):
            loop.call_soon_threadsafe(stream.put_nowait, error)
        for call_id in list(self._calls):
            call = self._calls.pop(call_id, None)
            if call is not None:
                call[0].call_soon_threadsafe(_resolve, (call[1], None, error))

    def _replay(self, messages: list[tuple[Any, ...]]) -> None:
        """One message list: outputs to their streams (one call per event loop), replies to
        their callers, events to the listener."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]] = {}
        for message in messages:
            kind = message[0]
            if kind in (engine_core.OUTPUT, engine_core.ERROR):
                entry = self._streams.get(message[1])
                if entry is not None:
                    item = (message[2] if kind == engine_core.OUTPUT
                            else engine_core.unpack_error(message[2]))
                    by_loop.setdefault(entry[0], []).append((entry[1].put_nowait, item))
            elif kind == engine_core.REPLY:
                call = self._calls.pop(message[1], None)
                if call is not None:
                    error = None if message[3] is None else engine_core.unpack_error(message[3])
                    by_loop.setdefault(call[0], []).append(
                        (_resolve, (call[1], message[2], error)))
            elif kind == engine_core.EVENTS:
                if self._listener is not None:
                    for method, args in message[1]:
                        getattr(self._listener, method)(*args)
            elif kind == engine_core.STATS:
                self._stats = message[1]
            elif kind == engine_core.DEAD:
                self._failure = message[1]
        self._hand_over(by_loop)

    def _hand_over(self, by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any]]]) -> None:
        for loop, items in by_loop.items():
            if loop is self._loop:
                _apply_all(items)
            else:  # a stream opened on another thread's event loop
                loop.call_soon_threadsafe(_apply_all, items)

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            self._conn.send(message)

    # ---- requests ---------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, adapter: str | None = None,
                       tenant: str = "") -> AsyncGenerator[RequestOutput, None]:
        """As AsyncEngine.generate; the engine process checks the request (its error is the
        stream's first item, raised before any output)."""
        if self._failure is not None:
            raise self._dead_error(status=503)
        if not self._accepting or not self.is_alive:
            raise EngineError("The server is shutting down.", status=503)
        if request_id in self._streams:
            raise EngineError(f"Request id {request_id!r} is already running.", status=400)
        stream: asyncio.Queue[StreamItem] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), stream)

        def close(finished: bool) -> None:
            self._streams.pop(request_id, None)
            if not finished and self.is_alive:
                with contextlib.suppress(OSError):  # a process gone has nothing to abort
                    self._send((engine_core.ABORT, request_id))

        start = functools.partial(self._send, (engine_core.GENERATE, request_id,
                                               prompt_token_ids, params, adapter, tenant))
        async with contextlib.aclosing(stream_outputs(stream, start, close)) as outputs:
            async for output in outputs:
                yield output

    # ---- adapters: calls into the engine process ------------------------------------------

    async def _call(self, method: str, *args: Any) -> Any:
        if not self.is_alive:
            raise (self._dead_error(status=503) if self._failure is not None
                   else EngineError("The engine is not running.", status=503))
        loop = asyncio.get_running_loop()
        call_id = next(self._call_ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._calls[call_id] = (loop, future)
        try:
            self._send((engine_core.CALL, call_id, method, args))
            return await future
        finally:
            self._calls.pop(call_id, None)

    async def list_adapters(self) -> list[AdapterInfo]:
        infos: list[AdapterInfo] = await self._call("list_adapters")
        return infos

    async def adapter_info(self, name: str) -> AdapterInfo | None:
        info: AdapterInfo | None = await self._call("adapter_info", name)
        return info

    async def load_adapter(self, name: str, path: Path | str) -> None:
        await self._call("load_adapter", name, path)

    async def unload_adapter(self, name: str) -> None:
        await self._call("unload_adapter", name)

    def stats(self) -> EngineStats:
        return self._stats


def _apply_all(items: list[tuple[Any, Any]]) -> None:
    """On the event loop: each (setter, value) of one message list, in order."""
    for setter, value in items:
        setter(value)


def _resolve(reply: tuple["asyncio.Future[Any]", Any, BaseException | None]) -> None:
    """A call's reply to its future, unless its caller has given up (cancelled)."""
    future, value, error = reply
    if future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)
