"""On the CPU the adapter slots are host memory, not a bound: any number of distinct adapters
share a step whatever --max-loras says, each adapter is written into its slot once per load
(not per use), and a slot is reused once its adapter has left the host."""

import shutil
from pathlib import Path

import pytest

from goat_runtime.engine.adapter_slots import DeviceSlots
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.outputs import EngineListener
from goat_runtime.engine.sampling import SamplingParams
from tests.adapters.adapted_model import FIXTURE
from tests.engine.test_engine import REFERENCE, run

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
NAMES = ("goat0", "goat1", "lora0")


class StepRecorder(EngineListener):
    def __init__(self) -> None:
        self.step_adapters: list[set[str]] = []
        self.memory: dict[str, tuple[int, int]] = {}

    def on_step(self, num_seqs: int, num_tokens: int, adapters: list[str]) -> None:
        self.step_adapters.append(set(adapters))

    def on_adapter_memory(self, tier: str, adapters: int, nbytes: int) -> None:
        self.memory[tier] = (adapters, nbytes)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the adapters written into a slot for a step (not a pool's regrowth copies)."""
    written: list[str] = []
    write_host = DeviceSlots._write_host

    def counting(self, slot, host, routed=None):
        if routed is None and host.adapter is not None:
            written.append(host.adapter.name)
        return write_host(self, slot, host, routed)

    monkeypatch.setattr(DeviceSlots, "_write_host", counting)
    return written


def _engine(tmp_path: Path, adapters: Path, recorder: EngineListener, **options) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_dir=FIXTURE / "base", adapter_dir=adapters, static_cache_dir=tmp_path / "static",
        block_size=4, max_loras=1, device="cpu", dtype="float32", **options), recorder)


def _requests(i: int) -> list:
    prompt = REFERENCE[f"input_{i}"].tolist()
    return [(f"{name}-{i}", prompt, GREEDY, name) for name in NAMES] + [
        (f"base-{i}", prompt, GREEDY, None)]


def test_one_step_serves_more_adapters_than_max_loras(tmp_path: Path, writes: list[str]) -> None:
    recorder = StepRecorder()
    engine = _engine(tmp_path, FIXTURE / "adapters", recorder, max_cpu_adapters=8)
    for i in range(2):
        results = run(engine, _requests(i))
        for name in (*NAMES, "base"):
            assert results[f"{name}-{i}"]["tokens"][0] == REFERENCE[f"{name}_greedy_{i}"].tolist()
    assert max(len(a) for a in recorder.step_adapters) == 3  # max_loras is 1
    assert sorted(writes) == sorted(NAMES)  # once each, not again for the second round
    assert recorder.memory["device"][0] == 3


def test_the_host_pool_starts_at_the_lru_bound_and_grows_only_past_it(tmp_path: Path) -> None:
    """Growing the pool copies every slot in a step (1-2 s for 64 SmolLM2-sized slots), so the
    CPU pool starts with a slot for each adapter the host LRU keeps, whatever --max-loras says;
    adapters held beyond that bound by their requests grow it, and keep their tokens."""
    roomy = _engine(tmp_path, FIXTURE / "adapters", StepRecorder(), max_cpu_adapters=8)
    assert roomy.adapters.slots.num_slots() == 8
    run(roomy, _requests(0))
    assert roomy.adapters.slots.num_slots() == 8
    tight = _engine(tmp_path, FIXTURE / "adapters", StepRecorder(), max_cpu_adapters=1)
    assert tight.adapters.slots.num_slots() == 1
    for name in NAMES:  # all three on the host at once, held as their requests hold them
        tight.adapters.acquire(name)
        tight.adapters.request_load(name).result()
    results = run(tight, _requests(0))  # three adapters in one step
    for name in NAMES:
        tight.adapters.release(name)
    for name in (*NAMES, "base"):
        assert results[f"{name}-0"]["tokens"][0] == REFERENCE[f"{name}_greedy_0"].tolist()
    assert tight.adapters.slots.num_slots() == 4  # 1 -> 2 -> 4


def test_a_slot_is_reused_once_its_adapter_left_the_host(tmp_path: Path,
                                                         writes: list[str]) -> None:
    adapters = shutil.copytree(FIXTURE / "adapters", tmp_path / "adapters")
    recorder = StepRecorder()
    # A one-byte budget: adapters leave the host as soon as their requests are done.
    engine = _engine(tmp_path, adapters, recorder, max_cpu_adapters=8, max_cpu_adapter_memory=1)
    prompt = REFERENCE["input_0"].tolist()
    run(engine, [("a", prompt, GREEDY, "goat0"), ("b", prompt, GREEDY, "goat1")])
    assert not engine.adapters.is_loaded("goat0") and not engine.adapters.is_loaded("goat1")
    slots, pool = recorder.memory["device"]
    assert slots == 0 and pool > 0
    # goat0 again, changed on disk: the new load must not read the old load's slot, which
    # still holds the old weights under the same name, and reuses a slot: the pool stays.
    shutil.rmtree(adapters / "goat0")
    shutil.copytree(FIXTURE / "adapters" / "goat1", adapters / "goat0")
    tokens = run(engine, [("c", prompt, GREEDY, "goat0")])["c"]["tokens"][0]
    assert tokens == REFERENCE["goat1_greedy_0"].tolist()
    assert sorted(writes[:2]) == ["goat0", "goat1"] and writes[2:] == ["goat0"]
    assert recorder.memory["device"][1] == pool


def test_the_slot_is_a_cpu_adapters_only_copy(tmp_path: Path, writes: list[str]) -> None:
    """Once written, an adapter's host tensors are released (meta tensors: shapes, no memory),
    the host tier counts its slot, and the pool's regrowth (more value rows for a bigger
    adapter) copies the released slots: the smaller adapter still serves its
    reference tokens afterwards."""
    recorder = StepRecorder()
    engine = _engine(tmp_path, FIXTURE / "adapters", recorder, max_cpu_adapters=8,
                     merge_static=False)
    prompt = REFERENCE["input_0"].tolist()
    order = ("lora0", "goat0", "goat1", "lora0")  # lora0's slot is grown, then read again
    for i, name in enumerate(order):
        tokens = run(engine, [(f"{name}-{i}", prompt, GREEDY, name)])[f"{name}-{i}"]
        assert tokens["tokens"][0] == REFERENCE[f"{name}_greedy_0"].tolist()
    assert writes == ["lora0", "goat0", "goat1"]
    slots = engine.adapters.slots
    for name in ("lora0", "goat0", "goat1"):
        host = engine.adapters.get(name)
        assert host.in_slot and bool(host.terms) == name.startswith("goat")  # nothing merged
        tensors = [t for layer in host.adapter.layers.values()
                   for t in (layer.lora_a, layer.lora_b, layer.router) if t is not None]
        tensors += [t for factors in host.terms.values() for t in factors]
        assert all(t.is_meta for t in tensors)  # no host copy left beside the slot
    per_slot = slots.nbytes() // len(slots._slots)
    assert recorder.memory["host"] == (3, 3 * per_slot)
    assert engine.adapters.memory()["host"] == (3, 3 * per_slot)


def test_each_release_hands_the_freed_pages_back(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """glibc keeps freed temporaries in its heap (RSS 26.5 MB an adapter for 18.8 MB of slots):
    each release of an adapter's host copies calls malloc_trim(0), where libc has it."""
    import goat_runtime.engine.adapter_slots as adapter_slots

    calls: list[int] = []
    monkeypatch.setattr(adapter_slots, "_malloc_trim", lambda: calls.append)
    engine = _engine(tmp_path, FIXTURE / "adapters", StepRecorder(), max_cpu_adapters=8,
                     merge_static=False)
    run(engine, _requests(0))
    assert calls == [0, 0, 0]  # goat0, goat1, lora0: one release each


def test_a_grown_unset_pool_holds_the_copied_slot_and_zero_padding() -> None:
    """The CPU pool is allocated unset (its pages untouched until written): a slot copied into
    a larger one is the old slot, padded with zeros, whatever the new memory held."""
    import torch

    from goat_runtime.adapters.slots import allocate_slots
    from goat_runtime.engine.adapter_slots import copy_slot

    old = allocate_slots(2, [6, 4], 8, value_rows=3, max_experts=2)
    for t in (old.shrink, old.router, old.expand):
        t.copy_(torch.randn(t.shape))
    old.slice_meta[1] = torch.tensor([[2, 1, 1, 3], [0, 0, 0, 2]], dtype=torch.int32)
    new = allocate_slots(4, [6, 4], 8, value_rows=5, max_experts=4, zeroed=False)
    assert int(new.slice_meta.abs().sum()) == 0  # metadata is zeroed either way
    for t in (new.shrink, new.router, new.expand):
        t.fill_(float("nan"))
    copy_slot(old, new, 1)
    assert torch.equal(new.shrink[1, :, :3], old.shrink[1])
    assert torch.equal(new.router[1, :, :2], old.router[1])
    assert torch.equal(new.expand[1, :3], old.expand[1])
    assert not new.shrink[1, :, 3:].any() and not new.router[1, :, 2:].any()
    assert not new.expand[1, 3:].any()
    assert torch.equal(new.slice_meta[1], old.slice_meta[1])
