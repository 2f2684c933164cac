"""The engine process: `AsyncEngine` in a process of its own, driven over a pipe by
`ProcessEngine` (process_engine.py), as vLLM's engine core is driven by its API server.

Why a process: the engine's Python (scheduling, sampling, detokenizing) and the server's
(HTTP, JSON, one SSE event per token) otherwise take turns on one interpreter, and every
wake-up of the event loop (a request's arrival, its first token) waits for the engine
thread's Python between two torch calls.

The wire: the server sends tuples (`GENERATE`, `ABORT`, `CALL`, `SHUTDOWN`); this process
sends lists of tuples, one list per turn of its event loop (a step's outputs, listener events,
the engine's stats, replies), so that a step costs one pickle and one write whatever its
batch.
"""

import asyncio
import gc
import inspect
import logging
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from goat_runtime.adapters.reader import shared_reader
from goat_runtime.engine.async_engine import AsyncEngine
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.outputs import EngineStats
from goat_runtime.engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

# server -> engine process
GENERATE = "generate"  # (GENERATE, request_id, prompt_token_ids, params, adapter, tenant)
ABORT = "abort"  # (ABORT, request_id)
CALL = "call"  # (CALL, call_id, method, args): one of CALLS, its value or error replied
SHUTDOWN = "shutdown"  # (SHUTDOWN, timeout_s): drain as AsyncEngine.shutdown does, then exit
# engine process -> server
READY = "ready"  # (READY, max_model_len), once the model has loaded
FAILED = "failed"  # (FAILED, packed error): the engine could not be built
OUTPUT = "output"  # (OUTPUT, request_id, RequestOutput)
ERROR = "error"  # (ERROR, request_id, packed error): the request's stream raises it
REPLY = "reply"  # (REPLY, call_id, value, packed error or None)
EVENTS = "events"  # (EVENTS, [(listener method, args), ...])
STATS = "stats"  # (STATS, EngineStats)
DEAD = "dead"  # (DEAD, failure): the engine loop died (AsyncEngine.failure)
STOPPED = "stopped"  # (STOPPED,): shut down; the process exits

CALLS = frozenset({"list_adapters", "adapter_info", "load_adapter", "unload_adapter"})
TICK_S = 0.05  # how often listener events and stats go out when no output carries them
# How long the engine thread may hold the GIL while this process's event loop waits for it (a
# command in, a step's outputs out); Python's default, 5 ms, is a step of a small model.
SWITCH_INTERVAL_S = 0.0002

PackedError = tuple[type[BaseException], tuple[Any, ...], dict[str, Any]]


def pack_error(exc: BaseException) -> PackedError:
    """An exception as (type, args, attributes): errors whose __init__ takes other arguments
    than their args (EngineError's status, SamplingParamsError's param) unpickle whole."""
    return type(exc), exc.args, dict(vars(exc))


def unpack_error(packed: PackedError) -> BaseException:
    cls, args, attributes = packed
    exc = cls.__new__(cls)
    exc.args = args
    vars(exc).update(attributes)
    return exc


class ForwardingListener:
    """An EngineListener that records its calls, for the server process to replay on its own
    listener (the metrics). Called from the engine thread and download threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[tuple[str, tuple[Any, ...]]] = []

    def take(self) -> list[tuple[str, tuple[Any, ...]]]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def _record(self, method: str, *args: Any) -> None:
        with self._lock:
            self._events.append((method, args))

    def on_step(self, num_seqs: int, num_tokens: int, adapters: list[str]) -> None:
        self._record("on_step", num_seqs, num_tokens, adapters)

    def on_step_time(self, seconds: float) -> None:
        self._record("on_step_time", seconds)

    def on_adapter_loaded(self, name: str, seconds: float) -> None:
        self._record("on_adapter_loaded", name, seconds)

    def on_adapter_evicted(self, name: str, tier: str) -> None:
        self._record("on_adapter_evicted", name, tier)

    def on_adapter_location(self, name: str, location: str | None) -> None:
        self._record("on_adapter_location", name, location)

    def on_expert_selections(self, adapter: str, counts: list[int]) -> None:
        self._record("on_expert_selections", adapter, counts)

    def on_adapter_memory(self, tier: str, adapters: int, nbytes: int) -> None:
        self._record("on_adapter_memory", tier, adapters, nbytes)

    def on_adapter_slots(self, slots: int, slot_bytes: int, bounded: bool) -> None:
        self._record("on_adapter_slots", slots, slot_bytes, bounded)

    def on_adapter_download(self, store: str, nbytes: int, seconds: float) -> None:
        self._record("on_adapter_download", store, nbytes, seconds)

    def on_adapter_download_failed(self, store: str, reason: str) -> None:
        self._record("on_adapter_download_failed", store, reason)


def main(config: EngineConfig, conn: Connection, log_level: int) -> None:
    """The engine process's entry point (multiprocessing's target, spawned)."""
    # Ctrl-C reaches the whole process group: the server decides when this process stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s")
    listener = ForwardingListener()
    try:
        try:
            engine = AsyncEngine(config, listener=listener)
        except BaseException as exc:
            conn.send([(FAILED, pack_error(exc)), (EVENTS, listener.take())])
            return
        # As the server does for its own (server/cli.py): the model's objects out of the
        # cyclic GC, whose full collections would walk them all with the GIL held.
        gc.collect()
        gc.freeze()
        uvloop.run(_Core(engine, conn, listener).serve())  # as the server's loop (cli.py)
    finally:
        # A spawned process joins its children before the interpreter's exit hooks run, and
        # only those would stop the reader's pool: stopped here, or the join never returns.
        shared_reader().shutdown()


class _Core:
    """The engine process's event loop: commands in, batched messages out."""

    def __init__(self, engine: AsyncEngine, conn: Connection, listener: ForwardingListener):
        self.engine = engine
        self.conn = conn
        self.listener = listener
        self._outbox: list[tuple[Any, ...]] = []
        self._flush_scheduled = False
        self._requests: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # calls and the shutdown, kept referenced
        self._stats = EngineStats(0, 0, 0.0)
        self._dead_sent = False
        self._shutting_down = False
        self._done: asyncio.Future[None] | None = None

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        await self.engine.start()
        self.conn.send([(READY, self.engine.max_model_len)])
        loop.add_reader(self.conn.fileno(), self._on_readable)
        ticker = asyncio.create_task(self._tick())
        await self._done
        ticker.cancel()

    def _on_readable(self) -> None:
        """Every command waiting in the pipe, read on the event loop itself (a thread reading
        it would wait for the GIL, then the loop for that thread's); the server gone (EOF):
        shut down."""
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.conn.fileno())
            self._handle((SHUTDOWN, 0.0))

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == GENERATE:
            self._requests[message[1]] = asyncio.create_task(self._generate(*message[1:]))
        elif kind == ABORT:
            aborted = self._requests.pop(message[1], None)
            if aborted is not None:
                aborted.cancel()  # closes the engine stream, which aborts the request
        elif kind == CALL:
            self._spawn(self._call(*message[1:]))
        elif kind == SHUTDOWN:
            if not self._shutting_down:  # the server's command, then its end of the pipe
                self._shutting_down = True
                self._spawn(self._shutdown(message[1]))
        else:
            logger.error("unknown command %r", kind)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _generate(self, request_id: str, prompt_token_ids: list[int],
                        params: SamplingParams, adapter: str | None, tenant: str) -> None:
        try:
            async for output in self.engine.generate(request_id, prompt_token_ids, params,
                                                     adapter, tenant):
                self._emit((OUTPUT, request_id, output))
        except asyncio.CancelledError:
            pass  # aborted by the server: its stream is closed already
        except BaseException as exc:
            self._emit((ERROR, request_id, pack_error(exc)))
        finally:
            if self._requests.get(request_id) is asyncio.current_task():
                del self._requests[request_id]

    async def _call(self, call_id: int, method: str, args: tuple[Any, ...]) -> None:
        try:
            if method not in CALLS:
                raise ValueError(f"not an engine call: {method!r}")
            value = getattr(self.engine, method)(*args)
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            self._emit((REPLY, call_id, None, pack_error(exc)))
        else:
            self._emit((REPLY, call_id, value, None))

    async def _shutdown(self, timeout: float) -> None:
        await self.engine.shutdown(timeout)
        if self._requests:  # the aborted requests' last outputs, on their way to the outbox
            await asyncio.wait(list(self._requests.values()), timeout=1.0)
        self._emit((STOPPED,))
        self._flush()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    async def _tick(self) -> None:
        """Listener events and stats while no output carries them; the engine's death."""
        while True:
            await asyncio.sleep(TICK_S)
            failure = self.engine.failure
            if failure is not None and not self._dead_sent:
                self._dead_sent = True
                self._emit((DEAD, failure))
            self._schedule_flush()

    def _emit(self, message: tuple[Any, ...]) -> None:
        self._outbox.append(message)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # after the callbacks already queued: a step's outputs wake their requests' tasks
            # in one turn of the loop, and all of them go out in one message
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        messages, self._outbox = self._outbox, []
        events = self.listener.take()
        if events:
            messages.insert(0, (EVENTS, events))
        stats = self.engine.stats()
        if stats != self._stats:
            self._stats = stats
            messages.append((STATS, stats))
        if not messages:
            return
        try:
            self.conn.send(messages)
        except (OSError, ValueError):  # the server is gone; _receive shuts this process down
            logger.warning("the server closed the engine pipe")
