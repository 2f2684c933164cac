"""The host adapter cache's byte budget (--max-cpu-adapter-memory): adapters of different ranks,
expert counts and targets are counted by their bytes, the least recently used unheld one is
evicted when a load goes over the budget, and the listener hears the bytes and adapters
resident per tier."""

import json
import shutil
from pathlib import Path

import pytest

from goat_runtime.adapters.writer import random_adapter
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.outputs import EngineListener
from goat_runtime.engine.sampling import SamplingParams
from tests.adapters.adapted_model import FIXTURE
from tests.engine.test_engine import REFERENCE, run

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def base_shapes() -> dict[str, tuple[int, int]]:
    """Every projection's (d_out, d_in) from the fixture base's config.json."""
    c = json.loads((FIXTURE / "base" / "config.json").read_text())
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    kv = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
    sizes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
             "o_proj": (hidden, hidden), "gate_proj": (inter, hidden),
             "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}": sizes[p]
            for i in range(c["num_hidden_layers"]) for p in PROJECTIONS}


def expected_bytes(folder: Path) -> int:
    """float32 A [r, d_in] and B [d_out, r] per target, plus for GOAT the router [E, d_in] and
    the unmerged static term (C [r, d_in], D [d_out, r]) of GOAT_SPEC section 3."""
    config = json.loads((folder / "adapter_config.json").read_text())
    r, goat = config["r"], config["peft_type"] == "GOAT"
    total = 0
    for module, (d_out, d_in) in base_shapes().items():
        if module.rsplit(".", 1)[-1] in config["target_modules"]:
            total += r * (d_in + d_out) * (2 if goat else 1)
            total += config["num_experts"] * d_in if goat else 0
    return 4 * total


class MemoryRecorder(EngineListener):
    def __init__(self) -> None:
        self.memory: dict[str, tuple[int, int]] = {}
        self.evicted: list[tuple[str, str]] = []

    def on_adapter_memory(self, tier: str, adapters: int, nbytes: int) -> None:
        self.memory[tier] = (adapters, nbytes)

    def on_adapter_evicted(self, name: str, tier: str) -> None:
        self.evicted.append((name, tier))


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    folder = shutil.copytree(FIXTURE / "adapters", tmp_path / "adapters")
    # Another rank, expert count and set of targets than the fixture's (r 8, E 4, all seven)
    random_adapter(folder / "small", base_shapes(), rank=4, num_experts=2, top_k=1,
                   projections=("q_proj", "v_proj"))
    return folder


@pytest.mark.slow
def test_host_cache_evicts_by_bytes(tmp_path: Path, adapters: Path) -> None:
    """On the CPU an adapter's bytes are its tensors' until its first step writes its slot, then
    its slot's (the only copy: engine/adapter_slots.py), the size of the largest resident
    adapter's."""
    size = {name: expected_bytes(adapters / name) for name in ("goat0", "goat1", "lora0",
                                                                "small")}
    assert len(set(size.values()) - {size["goat0"]}) == 2  # three sizes, goat0 = goat1
    recorder = MemoryRecorder()
    engine = LLMEngine(EngineConfig(
        model_dir=FIXTURE / "base", adapter_dir=adapters, static_cache_dir=tmp_path / "static",
        block_size=4, max_loras=1, max_cpu_adapters=8, merge_static=False, device="cpu",
        dtype="float32", max_cpu_adapter_memory=1 << 40), recorder)
    order = ("goat0", "small", "lora0")  # goat0 first: the largest, it sets the slots' size
    per_slot = 0
    for i, name in enumerate(order):  # all three fit
        engine.adapters.request_load(name).result()
        assert engine.adapters.get(name).nbytes == size[name]
        assert recorder.memory["host"] == (i + 1, i * per_slot + size[name])  # before its step
        run(engine, [(name, REFERENCE["input_0"].tolist(), GREEDY, name)])
        pool = engine.adapters.slots
        per_slot = pool.nbytes() // len(pool._slots)
        assert recorder.memory["host"] == (i + 1, (i + 1) * per_slot)  # after: its slot
    assert per_slot > size["goat0"]  # goat's slot: its rows, its static rows and its router
    assert [e for e in recorder.evicted if e[1] == "host"] == []
    # Room for the three slots and not for goat1's tensors beside them: loading goat1 evicts
    # the least recently used adapter, goat0.
    engine.adapters.max_cpu_memory = 3 * per_slot + size["goat1"] - 1
    tokens = run(engine, [("g", REFERENCE["input_1"].tolist(), GREEDY, "goat1")])["g"]["tokens"]
    assert tokens[0] == REFERENCE["goat1_greedy_1"].tolist()
    assert [n for n in ("goat0", "goat1", "lora0", "small") if engine.adapters.is_loaded(n)] == [
        "goat1", "lora0", "small"]
    assert [e for e in recorder.evicted if e[1] == "host"] == [("goat0", "host")]
    assert recorder.memory["host"] == (3, 3 * per_slot)
    slots, slot_bytes = recorder.memory["device"]  # CPU: every host adapter has its slot
    assert slots == 3 and slot_bytes == sum(
        t.nbytes for linear in engine.model.fused_linears()
        for t in (linear.routed.shrink, linear.routed.router, linear.routed.expand,
                  linear.routed.slice_meta))


def test_budget_flag_takes_sizes() -> None:
    from server.cli import build_parser

    args = build_parser().parse_args(["m", "--max-cpu-adapter-memory", "4GiB"])
    assert args.max_cpu_adapter_memory == 4 << 30
    assert build_parser().parse_args(["m"]).max_cpu_adapter_memory is None
    with pytest.raises(ValueError, match="max_cpu_adapter_memory"):
        EngineConfig(model_dir=FIXTURE / "base", max_cpu_adapter_memory=0)
