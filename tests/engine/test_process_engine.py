"""The engine in a process of its own (`--engine-process`): the same tokens as in process, the
same errors (status included), adapter calls, aborts, the listener's events in the server
process, start-up errors, shutdown, and the engine process's death."""

import asyncio
import os
import signal

import pytest

from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine_core import pack_error, unpack_error
from goat_runtime.engine.outputs import EngineError
from goat_runtime.engine.process_engine import ProcessEngine
from goat_runtime.engine.sampling import SamplingParams, SamplingParamsError
from tests.adapters.adapted_model import FIXTURE
from tests.engine.test_async_engine import PROMPT, REFERENCE, collect


class Recorder:
    """A listener that keeps the names of the events it was called with."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def __getattr__(self, name: str):
        if not name.startswith("on_"):
            raise AttributeError(name)
        return lambda *args: self.events.append(name)


def config(tmp_path, **options) -> EngineConfig:
    return EngineConfig(model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters",
                        block_size=4, static_cache_dir=tmp_path / "static", device="cpu",
                        dtype="float32", **options)


@pytest.fixture
def engine(tmp_path):
    """An engine process, read by the event loop of the test's asyncio.run (start())."""
    recorder = Recorder()
    process_engine = ProcessEngine(config(tmp_path), recorder)
    process_engine.recorder = recorder  # type: ignore[attr-defined]
    yield process_engine
    if process_engine._process.is_alive():
        asyncio.run(process_engine.shutdown())


def test_errors_cross_the_pipe_whole():
    for error in (EngineError("gone", status=404),
                  SamplingParamsError("top_p", "must be in (0, 1]")):
        back = unpack_error(pack_error(error))
        assert type(back) is type(error) and str(back) == str(error)
        assert vars(back) == vars(error)


@pytest.mark.slow
def test_tokens_errors_adapters_and_events(engine):
    async def main():
        await engine.start()
        names = [None, "goat0", "goat1", "lora0"] * 2
        results = await asyncio.gather(*(collect(engine, f"r{i}", n)
                                         for i, n in enumerate(names)))
        for name, tokens in zip(names, results, strict=True):
            assert tokens == REFERENCE[f"{name or 'base'}_greedy_1"].tolist(), name

        with pytest.raises(EngineError) as missing:
            await collect(engine, "x", "nobody")
        assert missing.value.status == 404
        with pytest.raises(EngineError) as too_long:
            await collect(engine, "y", None, SamplingParams(max_tokens=100_000))
        assert too_long.value.status == 400

        listed = {i.name: i for i in await engine.list_adapters()}
        assert set(listed) == {"goat0", "goat1", "lora0"} and listed["goat0"].loaded
        assert (await engine.adapter_info("lora0")).kind == "lora"
        assert await engine.adapter_info("nobody") is None
        await engine.load_adapter("mine", FIXTURE / "adapters" / "lora0")
        assert (await engine.adapter_info("mine")).loaded
        assert await collect(engine, "m", "mine") == REFERENCE["lora0_greedy_1"].tolist()
        await engine.unload_adapter("mine")
        assert await engine.adapter_info("mine") is None
        with pytest.raises(EngineError) as unloaded:
            await engine.unload_adapter("mine")
        assert unloaded.value.status == 404

    asyncio.run(main())
    # the engine process's listener events, replayed on this process's listener
    assert {"on_step", "on_step_time", "on_adapter_loaded"} <= set(engine.recorder.events)


@pytest.mark.slow
def test_closing_a_stream_aborts_it_in_the_engine_process(engine):
    async def main():
        await engine.start()
        stream = engine.generate("long", PROMPT, SamplingParams(max_tokens=400), "goat0")
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()
        for _ in range(100):  # the stats come back within a tick of the abort
            if engine.stats().num_running == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats().num_running == 0
        # and the engine still serves
        assert await collect(engine, "after", None) == REFERENCE["base_greedy_1"].tolist()

    asyncio.run(main())


def test_an_engine_that_cannot_start_raises_its_error_here(tmp_path):
    with pytest.raises(ValueError, match="holds no KV block"):
        ProcessEngine(config(tmp_path, kv_cache_memory=16))


@pytest.mark.slow
def test_shutdown_lets_a_running_request_finish_then_the_process_exits(tmp_path):
    engine = ProcessEngine(config(tmp_path))

    async def main():
        await engine.start()
        run = asyncio.create_task(collect(engine, "r", "goat0"))
        await asyncio.sleep(0.2)
        await engine.shutdown(timeout=30)
        return await run

    assert asyncio.run(main()) == REFERENCE["goat0_greedy_1"].tolist()
    assert not engine._process.is_alive() and engine._process.exitcode == 0
    assert engine.failure is None and not engine.is_alive


@pytest.mark.slow
def test_a_dead_engine_process_fails_every_stream_and_names_itself(tmp_path):
    engine = ProcessEngine(config(tmp_path))

    async def main():
        await engine.start()
        stream = engine.generate("long", PROMPT, SamplingParams(max_tokens=400), None)
        await anext(stream)
        os.kill(engine._process.pid, signal.SIGKILL)
        with pytest.raises(EngineError) as failed:
            async for _ in stream:
                pass
        assert failed.value.status == 500 and "exit code -9" in str(failed.value)
        assert not engine.is_alive and "exited" in engine.failure
        with pytest.raises(EngineError) as refused:
            await collect(engine, "next", None)
        assert refused.value.status == 503
        with pytest.raises(EngineError):
            await engine.list_adapters()
        await engine.shutdown()

    asyncio.run(main())
