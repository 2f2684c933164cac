"""The asyncio front: concurrent streams over adapters, abort on close, errors, unload (and its
races with requests)."""

import asyncio
import logging
import threading
import time
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from goat_runtime.engine.async_engine import AsyncEngine
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.outputs import AdapterInfo, EngineError
from goat_runtime.engine.process_engine import ProcessEngine
from goat_runtime.engine.sampling import SamplingParams
from tests.adapters.adapted_model import FIXTURE

REFERENCE = load_file(str(FIXTURE / "reference_outputs.safetensors"))
PROMPT = REFERENCE["input_1"].tolist()
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def engine(tmp_path):
    async_engine = AsyncEngine(EngineConfig(
        model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters", block_size=4,
        static_cache_dir=tmp_path / "static"))
    yield async_engine
    asyncio.run(async_engine.shutdown())  # ends its thread, started or not


async def collect(engine: AsyncEngine | ProcessEngine, request_id: str, adapter: str | None,
                  params: SamplingParams = GREEDY) -> list[int]:
    tokens = []
    async for out in engine.generate(request_id, PROMPT, params, adapter):
        tokens += [t for d in out.outputs for t in d.token_ids]
    return tokens


@pytest.mark.slow
def test_concurrent_streams_each_get_their_adapter(engine):
    async def main():
        await engine.start()
        names = [None, "goat0", "goat1", "lora0"] * 2
        results = await asyncio.gather(*(collect(engine, f"r{i}", n)
                                         for i, n in enumerate(names)))
        await engine.shutdown()
        return names, results

    names, results = asyncio.run(main())
    for name, tokens in zip(names, results, strict=True):
        assert tokens == REFERENCE[f"{name or 'base'}_greedy_1"].tolist(), name


@pytest.mark.slow
def test_closing_a_stream_aborts_and_frees(engine):
    async def main():
        await engine.start()
        start_free = engine.engine.allocator.num_free
        stream = engine.generate("long", PROMPT, SamplingParams(max_tokens=400), "goat0")
        await stream.__anext__()
        await stream.aclose()
        deadline = time.monotonic() + 10
        while engine.engine.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        free = engine.engine.allocator.num_free
        refs = engine.engine.adapters.refs("goat0")
        await engine.shutdown()
        return start_free, free, refs

    start_free, free, refs = asyncio.run(main())
    assert free == start_free and refs == 0


def test_errors_raise_from_the_stream(engine):
    async def main():
        await engine.start()
        with pytest.raises(EngineError) as unknown:
            await collect(engine, "u", "nope")
        with pytest.raises(EngineError) as too_long:
            await collect(engine, "t", None, SamplingParams(max_tokens=10_000))
        await engine.shutdown()
        with pytest.raises(EngineError) as closed:
            await collect(engine, "c", None)
        return unknown.value, too_long.value, closed.value

    unknown, too_long, closed = asyncio.run(main())
    assert (unknown.status, too_long.status, closed.status) == (404, 400, 503)


def test_load_and_unload_by_path(engine, tmp_path):
    async def main():
        await engine.start()
        await engine.load_adapter("mine", FIXTURE / "adapters" / "lora0")
        with pytest.raises(EngineError):
            await engine.load_adapter("mine", FIXTURE / "adapters" / "lora0")
        tokens = await collect(engine, "m", "mine")
        listed = {i.name: i for i in await engine.list_adapters()}
        await engine.unload_adapter("mine")
        with pytest.raises(EngineError) as gone:
            await collect(engine, "g", "mine")
        await engine.shutdown()
        return tokens, listed, gone.value

    tokens, listed, gone = asyncio.run(main())
    assert tokens == REFERENCE["lora0_greedy_1"].tolist()
    assert listed["mine"] == AdapterInfo("mine", "lora", True, "device")
    assert listed["goat1"] == AdapterInfo("goat1", "goat", False, "disk")  # never requested
    assert gone.status == 404


def test_an_unload_waits_for_a_request_accepted_but_not_added_yet(engine):
    """The window of the race: a request passed generate()'s checks and its add() is posted to
    the engine thread but has not run when the unload starts. The unload waits for it (it
    completes with its tokens), then requests naming the adapter get 404."""
    async def main():
        await engine.start()
        await engine.load_adapter("mine", FIXTURE / "adapters" / "lora0")
        gate = threading.Event()
        engine._post(gate.wait)  # hold the engine thread, so the add stays posted, not run
        request = asyncio.create_task(collect(engine, "r", "mine"))
        await asyncio.sleep(0.05)  # generate() has run its checks and posted its add()
        unload = asyncio.create_task(engine.unload_adapter("mine"))
        await asyncio.sleep(0.05)  # the unload has begun: "mine" is being unloaded
        gate.set()
        tokens = await request
        await unload
        with pytest.raises(EngineError) as gone:
            await collect(engine, "g", "mine")
        refs = engine.engine.adapters.refs("mine")
        await engine.shutdown()
        return tokens, gone.value, refs

    tokens, gone, refs = asyncio.run(main())
    assert tokens == REFERENCE["lora0_greedy_1"].tolist()
    assert gone.status == 404 and refs == 0


def test_unloads_and_loads_in_a_loop_beside_many_requests(engine, caplog):
    """Requests for two adapters keep arriving while both are unloaded (and one loaded again by
    path) in a loop: every request completes with its exact tokens or fails with 404, every
    unload succeeds or answers 404, nothing else is raised or logged, and nothing leaks."""
    expected = {"mine": REFERENCE["lora0_greedy_1"].tolist(),
                "goat0": REFERENCE["goat0_greedy_1"].tolist()}
    outcomes: Counter[str] = Counter()

    async def client(i: int) -> None:
        name = ("mine", "goat0")[i % 2]
        await asyncio.sleep(0.005 * i)
        try:
            tokens = await collect(engine, f"c{i}", name)
        except EngineError as exc:
            assert exc.status == 404, exc
            outcomes["request 404"] += 1
        else:
            assert tokens == expected[name], name
            outcomes["request ok"] += 1

    async def churn() -> None:
        for _ in range(10):
            for name in ("mine", "goat0"):
                try:
                    await engine.unload_adapter(name)
                    outcomes["unloaded"] += 1
                except EngineError as exc:
                    assert exc.status == 404, exc
                    outcomes["unload 404"] += 1
            await engine.load_adapter("mine", FIXTURE / "adapters" / "lora0")
            await asyncio.sleep(0.02)

    async def main():
        await engine.start()
        await engine.load_adapter("mine", FIXTURE / "adapters" / "lora0")
        await asyncio.gather(churn(), *(client(i) for i in range(60)))
        deadline = time.monotonic() + 10
        while engine.engine.has_work() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        leaks = (engine.engine.allocator.num_free - engine.engine.num_blocks,
                 engine.engine.adapters.refs("mine"), engine.engine.adapters.refs("goat0"))
        await engine.shutdown()
        return leaks

    with caplog.at_level(logging.WARNING):
        leaks = asyncio.run(main())
    assert leaks == (0, 0, 0)
    assert outcomes["request ok"] > 0 and outcomes["unloaded"] > 0
    assert outcomes["request ok"] + outcomes["request 404"] == 60
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_an_unload_while_the_adapter_is_loading_is_a_404(engine):
    async def main():
        await engine.start()
        gate = threading.Event()
        engine.engine.adapters._executor.submit(gate.wait)  # hold the loader thread
        load = asyncio.create_task(engine.load_adapter("mine", FIXTURE / "adapters" / "lora0"))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineError) as loading:
            await engine.unload_adapter("mine")
        gate.set()
        await load
        await engine.unload_adapter("mine")
        loaded = engine.engine.adapters.is_loaded("mine")
        await engine.shutdown()
        return loading.value, loaded

    loading, loaded = asyncio.run(main())
    assert loading.status == 404 and "not loaded" in str(loading)
    assert not loaded


def test_one_thread_builds_and_steps_the_engine_and_loads_run_torch_single_threaded(
        tmp_path, monkeypatch):
    """The OpenMP runtime keeps a team per thread that ran a parallel region; more team threads
    than cores and the idle ones sleep instead of spinning, which made every step 1.4x slower
    when the model was built on another thread than the one stepping it. So the engine thread
    builds the engine, and adapter loads (on threads of their own) run torch on one thread."""
    threads: Counter[tuple[str, str]] = Counter()
    build, step = LLMEngine.__init__, LLMEngine.step

    def recording_build(self, *args, **kwargs):
        threads["build", threading.current_thread().name] += 1
        build(self, *args, **kwargs)

    def recording_step(self):
        threads["step", threading.current_thread().name] += 1
        return step(self)

    monkeypatch.setattr(LLMEngine, "__init__", recording_build)
    monkeypatch.setattr(LLMEngine, "step", recording_step)
    engine = AsyncEngine(EngineConfig(
        model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters", block_size=4,
        static_cache_dir=tmp_path / "static"))
    assert not engine.is_alive  # built, not started

    async def main():
        await engine.start()
        tokens = await collect(engine, "r0", "goat0")
        loader_threads = await asyncio.wrap_future(
            engine.engine.adapters._executor.submit(torch.get_num_threads))
        await engine.shutdown()
        return tokens, loader_threads

    tokens, loader_threads = asyncio.run(main())
    assert tokens == REFERENCE["goat0_greedy_1"].tolist()
    assert {where for where, _ in threads} == {"build", "step"}
    assert {name for _, name in threads} == {"goat-engine"}, threads
    assert loader_threads == 1


def test_an_engine_that_fails_to_build_raises_in_the_caller(tmp_path):
    with pytest.raises(ValueError, match="missing config"):
        AsyncEngine(EngineConfig(model_dir=tmp_path / "missing", static_cache_dir=tmp_path))
