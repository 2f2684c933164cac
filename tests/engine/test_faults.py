"""Fault isolation: faults injected into mixed batches (base, GOAT and LoRA adapters) fail the
requests they happen for, with a 500 naming the cause, and no other: every other request gets
exactly its reference greedy tokens (or, seeded, the tokens it gets alone), and the KV blocks
and adapter references all come back. A fault no request explains kills the engine."""

import asyncio
import shutil
import sys
import threading
from collections import Counter

import pytest
import torch

import goat_runtime.engine.adapter_slots as adapter_slots
import goat_runtime.engine.engine as engine_module
import goat_runtime.model.layers as layers
from goat_runtime.engine.async_engine import AsyncEngine
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.faults import EngineDeadError
from goat_runtime.engine.outputs import EngineError
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.model.context import get_step_context
from tests.adapters.adapted_model import FIXTURE
from tests.engine.test_engine import (
    GREEDY,
    NAMES,
    PROMPTS,
    REFERENCE,
    adapter_dir_with_four,
    make_engine,
    reference_requests,
    step_all,
)

# Faults injected and survived per kind, printed at the end of the module (-s) for the record.
INJECTED: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def report_injected():
    yield
    print("\nfaults injected:", dict(INJECTED))


def run_faulty(engine, requests) -> tuple[dict[str, list[int]], dict[str, EngineError]]:
    """Add the requests, step until done; (request id -> tokens of completion 0 it emitted,
    request id -> its error) for every request."""
    tokens: dict[str, list[int]] = {}
    errors: dict[str, EngineError] = {}
    for request_id, prompt, params, adapter in requests:
        engine.add_request(request_id, prompt, params, adapter)
        tokens[request_id] = []
    for out in step_all(engine):
        assert out.request_id not in errors, "an output after the request's error"
        if out.error is not None:
            assert out.finished
            errors[out.request_id] = out.error
        for d in out.outputs:
            if d.index == 0:
                tokens[out.request_id] += d.token_ids
    assert not engine.has_work(), "requests did not finish"
    return tokens, errors


def assert_all_returned(engine) -> None:
    """No block, adapter reference or queue place left behind."""
    assert engine.allocator.num_free == engine.num_blocks
    assert all(engine.allocator.ref_count(b) == 0 for b in range(engine.num_blocks))
    assert all(engine.adapters.refs(n) == 0 for n in NAMES if n)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert not engine.requests


def assert_charged(errors: dict[str, EngineError], failed: set[str], cause: str) -> None:
    assert set(errors) == failed
    for error in errors.values():
        assert error.status == 500 and cause in str(error), str(error)


def assert_reference(tokens: dict[str, list[int]], skip: set[str]) -> None:
    for request_id, got in tokens.items():
        if request_id not in skip:
            key, i = request_id.rsplit("-", 1)
            assert got == REFERENCE[f"{key}_greedy_{i}"].tolist(), request_id


def adapter_in_step(engine, name: str, slots: torch.Tensor) -> bool:
    return any(engine.adapters.slot_owner(s) == name for s in slots.unique().tolist())


@pytest.mark.slow
@pytest.mark.parametrize("after_steps", [0, 5])
def test_a_kernel_fault_for_one_adapter_fails_its_requests_alone(tmp_path, monkeypatch,
                                                                  after_steps):
    """The routed op raises whenever lora0's tokens are in its batch: from the prefill on, or
    from lora0's sixth step on (its requests then fail mid-stream)."""
    engine = make_engine(tmp_path, max_num_batched_tokens=4096)
    op, forward, lora_forwards = layers.add_routed_lora, engine.model.forward, []

    def counting_forward(input_ids, positions):
        if adapter_in_step(engine, "lora0", get_step_context().token_adapter_slots):
            lora_forwards.append(input_ids.numel())
        return forward(input_ids, positions)

    def faulty_op(y, x, slots, weights, counts=None):
        if adapter_in_step(engine, "lora0", slots) and len(lora_forwards) > after_steps:
            INJECTED["routed op raises for lora0"] += 1
            raise RuntimeError("injected kernel fault")
        return op(y, x, slots, weights, counts)

    monkeypatch.setattr(engine.model, "forward", counting_forward)
    monkeypatch.setattr(layers, "add_routed_lora", faulty_op)
    tokens, errors = run_faulty(engine, reference_requests())
    lora = {f"lora0-{i}" for i in range(3)}
    assert_charged(errors, lora, "RuntimeError: injected kernel fault")
    assert_reference(tokens, skip=lora)
    for request_id in lora:  # what they emitted before the fault was right
        expected = REFERENCE[f"lora0_greedy_{request_id[-1]}"].tolist()
        assert tokens[request_id] == expected[: len(tokens[request_id])]
        assert len(tokens[request_id]) == (after_steps if after_steps else 0)
    assert_all_returned(engine)
    # Alone in its step, a lora0 request still fails alone: the engine lives on.
    tokens, errors = run_faulty(engine, [("lora0-1", PROMPTS[1], GREEDY, "lora0")])
    assert_charged(errors, {"lora0-1"}, "injected kernel fault")
    tokens, errors = run_faulty(engine, [("goat1-1", PROMPTS[1], GREEDY, "goat1")])
    assert not errors
    assert_reference(tokens, skip=set())
    assert_all_returned(engine)


@pytest.mark.slow
def test_a_sampler_fault_restores_the_generators_of_the_others(tmp_path, monkeypatch):
    """The sampler raises after drawing for every row of a batch that holds one request's row:
    that request fails; seeded requests that shared the batch draw as they do alone."""
    seeded = [(f"s{i}", PROMPTS[i % 3], SamplingParams(temperature=1.0, top_p=0.9, seed=i,
                                                       max_tokens=10, ignore_eos=True),
               NAMES[i % 4]) for i in range(8)]
    engine = make_engine(tmp_path)
    alone = {r[0]: run_faulty(engine, [r])[0][r[0]] for r in seeded}
    victim = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    sample = engine_module.sample

    def faulty_sample(logits, rows, token_bitmask=None):
        result = sample(logits, rows, token_bitmask)  # every row's generator has drawn
        if any(row.params is victim for row in rows):
            INJECTED["sampler raises for one request"] += 1
            raise ValueError("injected sampler fault")
        return result

    monkeypatch.setattr(engine_module, "sample", faulty_sample)
    requests = [*seeded[:4], ("goat0-2", PROMPTS[2], victim, "goat0"), *seeded[4:],
                *reference_requests()[:3]]
    tokens, errors = run_faulty(engine, requests)
    assert_charged(errors, {"goat0-2"}, "ValueError: injected sampler fault")
    for request_id, expected in alone.items():
        assert tokens[request_id] == expected, request_id
    assert_reference({k: v for k, v in tokens.items() if k.startswith("base-")}, skip=set())
    assert_all_returned(engine)


@pytest.mark.slow
def test_an_adapter_that_vanishes_between_scheduling_and_binding(tmp_path, monkeypatch):
    """goat1's folder is deleted and its host copy lost (as an eviction racing the step would)
    after the scheduler admitted its requests: binding it raises, its requests fail with 500,
    the others complete; a later goat1 request is a 404."""
    adapters = adapter_dir_with_four(tmp_path)
    engine = make_engine(tmp_path, adapter_dir=adapters, max_num_batched_tokens=4096)
    schedule = engine.scheduler.schedule

    def schedule_then_vanish(max_tokens: int | None = None):
        scheduled = schedule(max_tokens)
        if any(i.seq.adapter == "goat1" for i in scheduled) and (adapters / "goat1").exists():
            INJECTED["adapter vanishes before binding"] += 1
            shutil.rmtree(adapters / "goat1")
            with engine.adapters._lock:
                engine.adapters._host.pop("goat1")
        return scheduled

    monkeypatch.setattr(engine.scheduler, "schedule", schedule_then_vanish)
    tokens, errors = run_faulty(engine, reference_requests())
    goat1 = {f"goat1-{i}" for i in range(3)}
    assert_charged(errors, goat1, "adapter goat1 is not loaded")
    assert_reference(tokens, skip=goat1)
    assert_all_returned(engine)
    with pytest.raises(EngineError) as gone:
        engine.add_request("again", PROMPTS[0], GREEDY, "goat1")
    assert gone.value.status == 404


@pytest.mark.slow
@pytest.mark.parametrize("where", ["_start", "schedule"])
def test_a_block_allocation_failure_fails_one_request(tmp_path, monkeypatch, where):
    """The block allocator raises once in a chunked, mixed run, when a waiting sequence is
    admitted (`_start`) or a running one grows (`schedule`): the request it was allocating for
    fails, the others complete."""
    engine = make_engine(tmp_path, max_num_batched_tokens=16)
    allocate, calls = engine.allocator.allocate, []

    def faulty_allocate(n=1):
        caller = sys._getframe(2).f_code.co_name  # _grow's caller
        calls.append(caller)
        if caller == where and calls.count(where) == 3:
            INJECTED[f"block allocator raises (in {where})"] += 1
            raise MemoryError("injected: no memory for KV blocks")
        return allocate(n)

    monkeypatch.setattr(engine.allocator, "allocate", faulty_allocate)
    tokens, errors = run_faulty(engine, reference_requests())
    assert calls.count(where) > 3 and len(errors) == 1
    assert_charged(errors, set(errors), "MemoryError: injected: no memory for KV blocks")
    assert_reference(tokens, skip=set(errors))
    assert_all_returned(engine)


@pytest.mark.slow
def test_transient_allocation_failures_cost_no_request(tmp_path, monkeypatch):
    """Growing the adapter slots fails once (a torch allocation), and the forward runs out of
    memory for any batch of more than 40 tokens: the step's sequences run again in smaller
    groups, and every request completes with its reference tokens."""
    engine = make_engine(tmp_path, max_num_batched_tokens=4096)
    allocate_slots, forward = adapter_slots.allocate_slots, engine.model.forward
    failed_once = []

    def faulty_allocate_slots(*args, **kwargs):
        if not failed_once:
            failed_once.append(True)
            INJECTED["slot allocation raises once"] += 1
            raise torch.OutOfMemoryError("injected: slot allocation")
        return allocate_slots(*args, **kwargs)

    def faulty_forward(input_ids, positions):
        if input_ids.numel() > 40:
            INJECTED["forward out of memory over 40 tokens"] += 1
            raise torch.OutOfMemoryError("injected: batch too big")
        return forward(input_ids, positions)

    monkeypatch.setattr(adapter_slots, "allocate_slots", faulty_allocate_slots)
    monkeypatch.setattr(engine.model, "forward", faulty_forward)
    tokens, errors = run_faulty(engine, reference_requests())
    assert failed_once and not errors
    assert_reference(tokens, skip=set())
    assert_all_returned(engine)


@pytest.mark.slow
def test_a_fault_of_the_engine_kills_it(tmp_path, monkeypatch):
    """Every forward raises: each request fails alone, then the base-model probe fails too, and
    the engine is dead (the step raises)."""
    engine = make_engine(tmp_path)

    def broken(input_ids, positions):
        INJECTED["every forward raises (engine dead)"] += 1
        raise RuntimeError("injected: device lost")

    monkeypatch.setattr(engine.model, "forward", broken)
    for i, name in enumerate(NAMES):
        engine.add_request(f"r{i}", PROMPTS[i % 3], GREEDY, name)
    with pytest.raises(EngineDeadError, match=r"device lost.*probe then failed too.*device lost"):
        for _ in step_all(engine):
            pass


@pytest.mark.slow
def test_a_dead_async_engine_fails_every_stream_and_says_why(tmp_path, monkeypatch):
    """Every stream open when the engine dies fails with a 500 naming the cause; a request
    sent after that is refused with a 503 naming it."""
    engine = AsyncEngine(EngineConfig(model_dir=FIXTURE / "base",
                                      adapter_dir=FIXTURE / "adapters", block_size=4,
                                      static_cache_dir=tmp_path / "static"))
    # The first forward waits for every stream to open: otherwise the engine can die before a
    # later request is sent, which is then refused with a 503 (what "late" checks).
    all_open = threading.Event()

    def broken(input_ids, positions):
        all_open.wait(10)
        raise RuntimeError("injected: device lost")

    monkeypatch.setattr(engine.engine.model, "forward", broken)

    async def release_when_all_open() -> None:
        for _ in range(1000):  # 10 s at most: a request refused at once never opens one
            if len(engine._streams) >= len(NAMES):
                break
            await asyncio.sleep(0.01)
        all_open.set()

    async def main():
        await engine.start()
        results = await asyncio.gather(*(collect(engine, f"r{i}", name)
                                         for i, name in enumerate(NAMES)),
                                       release_when_all_open(), return_exceptions=True)
        results = results[: len(NAMES)]
        late = await asyncio.gather(collect(engine, "late", None), return_exceptions=True)
        alive, failure = engine.is_alive, engine.failure
        await engine.shutdown()
        return results + late, alive, failure

    results, alive, failure = asyncio.run(main())
    assert not alive and "device lost" in failure
    for result in results:
        assert isinstance(result, EngineError), result
        assert result.status in (500, 503) and (
            "device lost" in str(result) or "shutting down" in str(result)), str(result)
    assert all(r.status == 500 for r in results[: len(NAMES)])


async def collect(engine: AsyncEngine, request_id: str, adapter: str | None) -> list[int]:
    tokens = []
    async for out in engine.generate(request_id, PROMPTS[1], GREEDY, adapter):
        tokens += [t for d in out.outputs for t in d.token_ids]
    return tokens



@pytest.mark.slow
def test_a_detokenizer_fault_fails_its_request_alone(tmp_path):
    """Detokenizing goat1's third token raises (in a step that samples the whole batch): goat1
    fails, after two tokens; the others complete."""
    engine = make_engine(tmp_path, max_num_batched_tokens=4096)
    requests = reference_requests()
    for request_id, prompt, params, adapter in requests:
        engine.add_request(request_id, prompt, params, adapter)
    detokenizer = engine.requests["goat1-2"].sequences[0].detokenizer
    add, calls = detokenizer.add, []

    def faulty_add(token_ids):
        calls.append(token_ids)
        if len(calls) == 3:
            INJECTED["detokenizer raises for one request"] += 1
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return add(token_ids)

    detokenizer.add = faulty_add
    tokens = {r[0]: [] for r in requests}
    errors = {}
    for out in step_all(engine):
        if out.error is not None:
            errors[out.request_id] = out.error
        for d in out.outputs:
            tokens[out.request_id] += d.token_ids
    assert_charged(errors, {"goat1-2"}, "UnicodeDecodeError")
    assert tokens["goat1-2"] == REFERENCE["goat1_greedy_2"].tolist()[:2]
    assert_reference(tokens, skip={"goat1-2"})
    assert_all_returned(engine)
