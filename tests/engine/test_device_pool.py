"""The accelerator's slot pool, on CPU tensors (DeviceSlots with slots_on_host=False runs the
accelerator's logic, the routed op reads the same layout): the slot count follows from
--max-gpu-adapter-memory and one slot's bytes, is recomputed when a larger adapter changes the
slot size, slots are reused least recently used within the budget, a budget too small for one
slot is refused, and the scheduler never puts more distinct adapters in a step than the pool
has slots. The engine test runs on CUDA too where there is a device (benchmarks/gpu_check.py
also checks the pool there)."""

import functools
import shutil
from pathlib import Path

import pytest
import torch

import goat_runtime.engine.adapter_manager as adapter_manager
from goat_runtime.adapters.format import AdapterError
from goat_runtime.engine.adapter_manager import AdapterManager
from goat_runtime.engine.adapter_slots import DeviceSlots
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.outputs import EngineListener
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.model.loader import load_model
from tests.adapters.adapted_model import FIXTURE
from tests.devices import DEVICES
from tests.engine.test_engine import REFERENCE, run

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


class PoolRecorder(EngineListener):
    def __init__(self) -> None:
        self.slots: list[tuple[int, int, bool]] = []  # on_adapter_slots calls
        self.steps: list[set[str]] = []
        self.evicted: list[tuple[str, str]] = []

    def on_adapter_slots(self, slots: int, slot_bytes: int, bounded: bool) -> None:
        self.slots.append((slots, slot_bytes, bounded))

    def on_step(self, num_seqs: int, num_tokens: int, adapters: list[str]) -> None:
        self.steps.append(set(adapters))

    def on_adapter_evicted(self, name: str, tier: str) -> None:
        self.evicted.append((name, tier))


@pytest.fixture
def accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every AdapterManager made from here on keeps its slots as an accelerator would."""
    monkeypatch.setattr(adapter_manager, "DeviceSlots",
                        functools.partial(DeviceSlots, slots_on_host=False))


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    """The fixture's adapters and goat2, a third GOAT adapter of the same size."""
    folder = shutil.copytree(FIXTURE / "adapters", tmp_path / "adapters")
    shutil.copytree(folder / "goat1", folder / "goat2")
    return folder


def _manager(tmp_path: Path, adapters: Path, *, max_loras: int = 32, budget: int | None = None,
             listener: EngineListener | None = None, device: str = "cpu") -> AdapterManager:
    linears = load_model(FIXTURE / "base", device=device).fused_linears()
    manager = AdapterManager(linears, adapter_dir=adapters, max_loras=max_loras,
                             max_cpu_adapters=32, max_lora_rank=64,
                             static_cache_dir=tmp_path / "static", listener=listener,
                             max_device_memory=budget)
    assert not manager.slots.slots_on_host
    return manager


def _load(manager: AdapterManager, *names: str) -> None:
    for name in names:
        manager.request_load(name).result(timeout=60)


def _slot_bytes(tmp_path: Path, adapters: Path, name: str, device: str = "cpu") -> int:
    """Bytes of one slot sized for `name`, read off the allocated tensors of an unbudgeted
    pool (not from the pool's own cost model)."""
    manager = _manager(tmp_path, adapters, max_loras=4, device=device)
    _load(manager, name)
    manager.bind({name})
    assert manager.slots.nbytes() % 4 == 0
    return manager.slots.nbytes() // 4


def _held(manager: AdapterManager) -> set[str]:
    return {name for name, _ in manager.slots.owners() if name is not None}


@pytest.mark.usefixtures("accelerator")
def test_slot_count_follows_from_the_budget_and_the_slot_size(tmp_path: Path,
                                                              adapters: Path) -> None:
    goat, lora = (_slot_bytes(tmp_path, adapters, n) for n in ("goat0", "lora0"))
    assert lora < goat  # no router, no static rows: the pool holds more LoRA slots
    budget = 3 * goat + goat // 2
    recorder = PoolRecorder()
    manager = _manager(tmp_path, adapters, budget=budget, listener=recorder)
    _load(manager, "goat0", "lora0")
    manager.bind({"lora0"})
    pool = manager.slots
    assert pool.num_slots() == budget // lora and pool.slot_bytes() == lora
    assert pool.nbytes() == pool.num_slots() * lora <= budget
    # A larger adapter: the slots grow, and fewer fit the same budget; lora0 stays.
    manager.bind({"goat0"})
    assert pool.num_slots() == 3 and pool.slot_bytes() == goat
    assert pool.nbytes() == 3 * goat <= budget
    assert _held(manager) == {"goat0", "lora0"}
    assert recorder.slots[-1] == (3, goat, True)  # what /metrics shows
    # --max-loras bounds the count below what the bytes hold
    capped = _manager(tmp_path, adapters, max_loras=2, budget=budget)
    _load(capped, "lora0")
    capped.bind({"lora0"})
    assert capped.slots.num_slots() == 2


@pytest.mark.usefixtures("accelerator")
def test_the_base_slot_takes_its_share_of_the_budget(tmp_path: Path, adapters: Path) -> None:
    goat = _slot_bytes(tmp_path, adapters, "goat0")
    budget = 4 * goat
    manager = _manager(tmp_path, adapters, budget=budget)
    manager.merge_static(manager.start_up_adapters({}))
    assert manager.base is not None  # the fixture's GOAT adapters share a signature
    _load(manager, "goat0", "goat1", "lora0")
    slots = manager.bind({"goat0", "lora0"})
    pool = manager.slots
    used = (pool.num_slots() + 1) * pool.slot_bytes()  # the base's slot is the extra one
    assert pool.nbytes() == used <= budget < used + pool.slot_bytes()
    assert slots[None] == pool.num_slots()


@pytest.mark.usefixtures("accelerator")
def test_slots_are_reused_least_recently_used_within_the_budget(tmp_path: Path,
                                                                adapters: Path) -> None:
    goat = _slot_bytes(tmp_path, adapters, "goat0")
    recorder = PoolRecorder()
    manager = _manager(tmp_path, adapters, budget=2 * goat + goat // 2, listener=recorder)
    _load(manager, "goat0", "goat1", "goat2")
    for step in ({"goat0"}, {"goat1"}, {"goat0"}):
        slots = manager.bind(step)
        if step == {"goat1"}:
            goat1 = manager.linears[0].routed.shrink[slots["goat1"]].clone()
    assert manager.slots.num_slots() == 2 and _held(manager) == {"goat0", "goat1"}
    assert not manager.can_bind({"goat0", "goat1"}, "goat2")  # two slots: not a third
    assert manager.can_bind({"goat0"}, "goat2")
    slots = manager.bind({"goat2"})  # goat1 was used longest ago
    assert _held(manager) == {"goat0", "goat2"} and recorder.evicted == [("goat1", "device")]
    assert manager.slots.nbytes() == 2 * goat
    # goat2's slot holds goat2's rows (the same weights as goat1's: it is a copy)
    assert manager.slot_owner(slots["goat2"]) == "goat2"
    assert torch.equal(manager.linears[0].routed.shrink[slots["goat2"]], goat1)


@pytest.mark.slow
@pytest.mark.usefixtures("accelerator")
def test_a_budget_too_small_is_refused(tmp_path: Path, adapters: Path) -> None:
    goat = _slot_bytes(tmp_path, adapters, "goat0")
    lora = _slot_bytes(tmp_path, adapters, "lora0")
    with pytest.raises(ValueError, match=r"--max-gpu-adapter-memory .* cannot hold an adapter"):
        _manager(tmp_path, adapters, budget=64)
    # Room for a LoRA slot, not a GOAT one: the GOAT adapter's load fails, saying why.
    manager = _manager(tmp_path, adapters, budget=(lora + goat) // 2)
    _load(manager, "lora0")
    with pytest.raises(AdapterError, match="cannot hold adapter goat0's slot"):
        _load(manager, "goat0")
    # At start-up, a pinned adapter that cannot fit stops the engine.
    with pytest.raises(AdapterError, match="max-gpu-adapter-memory"):
        LLMEngine(EngineConfig(
            model_dir=FIXTURE / "base", adapters={"pinned": adapters / "goat0"},
            static_cache_dir=tmp_path / "static", device="cpu", dtype="float32",
            max_gpu_adapter_memory=(lora + goat) // 2, merge_static=False))


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_the_scheduler_never_puts_more_adapters_in_a_step_than_slots(
        tmp_path: Path, adapters: Path, device: str, request: pytest.FixtureRequest) -> None:
    if device == "cpu":  # on CUDA the pool is the accelerator's as it is
        request.getfixturevalue("accelerator")
    goat = _slot_bytes(tmp_path, adapters, "goat0", device)
    recorder = PoolRecorder()
    engine = LLMEngine(EngineConfig(
        model_dir=FIXTURE / "base", adapter_dir=adapters, static_cache_dir=tmp_path / "static",
        block_size=4, device=device, dtype="float32", merge_static=False,
        max_gpu_adapter_memory=2 * goat + goat // 2), recorder)
    assert not engine.adapters.slots.slots_on_host
    prompt = REFERENCE["input_0"].tolist()
    names = ("goat0", "goat1", "goat2", "lora0")
    results = run(engine, [(f"{n}-{i}", prompt, GREEDY, n) for n in names for i in range(2)]
                  + [("base", prompt, GREEDY, None)])
    for name in names:
        want = REFERENCE[f"{'goat1' if name == 'goat2' else name}_greedy_0"].tolist()[:8]
        assert results[f"{name}-0"]["tokens"][0] == results[f"{name}-1"]["tokens"][0] == want
    assert results["base"]["tokens"][0] == REFERENCE["base_greedy_0"].tolist()[:8]
    assert engine.adapters.slots.num_slots() == 2
    assert max(len(step) for step in recorder.steps) == 2  # the bound, reached, not passed


@pytest.mark.usefixtures("accelerator")
def test_goat_serve_reports_a_budget_too_small_in_one_line() -> None:
    """goat-serve stops with the budget's message, not a traceback."""
    from server import cli
    from server.metrics import ServerMetrics

    args = cli.build_parser().parse_args([str(FIXTURE / "base"), "--max-gpu-adapter-memory",
                                          "64", "--no-merge-static"])
    with pytest.raises(SystemExit, match=r"^goat-serve: error: .*--max-gpu-adapter-memory"):
        cli._engine(args, cli._engine_config(args), ServerMetrics())
