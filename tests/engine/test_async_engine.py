"""The asyncio front: concurrent streams over adapters, abort on close, errors, unload."""

import asyncio
import time

import pytest
from safetensors.torch import load_file

from goat_runtime.engine.async_engine import AsyncEngine
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.outputs import EngineError
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


async def collect(engine: AsyncEngine, request_id: str, adapter: str | None,
                  params: SamplingParams = GREEDY) -> list[int]:
    tokens = []
    async for out in engine.generate(request_id, PROMPT, params, adapter):
        tokens += [t for d in out.outputs for t in d.token_ids]
    return tokens


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
        listed = {i.name: i for i in engine.list_adapters()}
        await engine.unload_adapter("mine")
        with pytest.raises(EngineError) as gone:
            await collect(engine, "g", "mine")
        await engine.shutdown()
        return tokens, listed, gone.value

    tokens, listed, gone = asyncio.run(main())
    assert tokens == REFERENCE["lora0_greedy_1"].tolist()
    assert listed["mine"].loaded and listed["mine"].kind == "lora"
    assert not listed["goat1"].loaded or listed["goat1"].location in ("host", "device")
    assert gone.status == 404
