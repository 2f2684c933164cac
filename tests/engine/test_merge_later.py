"""Static merge with adapters loaded after start-up: a GOAT adapter of the merged signature sees
exactly what it sees unmerged whether its targets are a superset, a subset of or disjoint from
the merged modules (issue 16 item 3); the base and plain LoRA stay exact beside them."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from goat_runtime.adapters.writer import random_adapter
from goat_runtime.engine.sampling import SamplingParams
from tests.adapters.adapted_model import FIXTURE
from tests.engine.test_engine import PROMPTS, make_engine, run

MERGED_PROJECTIONS = ("q_proj", "k_proj", "v_proj")  # what the start-up store's adapter targets
LATER = {  # adapters of the same (default) signature, registered by path after start-up
    "superset": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "subset": ("q_proj",),
    "disjoint": ("gate_proj", "up_proj", "down_proj"),
}
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, prompt_logprobs=4)


def base_shapes() -> dict[str, tuple[int, int]]:
    weights = load_file(str(FIXTURE / "base" / "model.safetensors"))  # a tiny model
    return {key.removesuffix(".weight"): tuple(w.shape) for key, w in weights.items()
            if key.endswith("_proj.weight")}


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("merge-later")
    shapes = base_shapes()
    # init_cof 1 (random_adapter's default): the static term moves logits far beyond the
    # tolerance below, so a module that misses it cannot pass.
    random_adapter(root / "store" / "qkv", shapes, num_experts=4, projections=MERGED_PROJECTIONS)
    later = {name: random_adapter(root / "later" / name, shapes, num_experts=4, seed=1 + i,
                                  projections=projections)
             for i, (name, projections) in enumerate(LATER.items())}
    later["lora"] = random_adapter(root / "later" / "lora", shapes, kind="lora", seed=9)
    return root / "store", later


def outputs(tmp_path: Path, store: Path, later: dict[str, Path], merge: bool) -> dict[str, dict]:
    engine = make_engine(tmp_path, adapter_dir=store, merge_static=merge, max_loras=6,
                         max_num_batched_tokens=4096)
    merged = engine.adapters.static.merged_modules
    assert (len(merged) > 0) == merge  # the merge happened (or not) as the test means
    for name, path in later.items():  # after start-up: not part of the merge decision
        engine.adapters.request_load(name, path).result()
    names = [None, "qkv", *later]
    requests = [(f"{name}-{i}", prompt, PARAMS, name)
                for name in names for i, prompt in enumerate(PROMPTS)]
    return run(engine, requests)  # one mixed batch: every adapter beside the others


@pytest.mark.slow
def test_merged_equals_unmerged_for_adapters_loaded_later(tmp_path, stores):
    store, later = stores
    unmerged = outputs(tmp_path / "u", store, later, merge=False)
    merged = outputs(tmp_path / "m", store, later, merge=True)
    for request_id, expected in unmerged.items():
        got = merged[request_id]
        assert got["tokens"] == expected["tokens"], request_id
        prompt = PROMPTS[int(request_id.rsplit("-", 1)[1])]
        for pos in range(1, len(prompt)):
            a, b = got["prompt_logprobs"][pos], expected["prompt_logprobs"][pos]
            assert prompt[pos] in a and prompt[pos] in b
            for token in a.keys() & b.keys():  # a near tie may swap the last of the top N
                assert a[token] == pytest.approx(b[token], abs=2e-5), (request_id, pos, token)


@pytest.mark.slow
def test_later_adapters_differ_from_each_other(tmp_path, stores):
    """The comparison above means something: the adapters' static terms and deltas change the
    logits far more than its tolerance."""
    store, later = stores
    results = outputs(tmp_path, store, later, merge=False)

    def prompt_logprobs(request_id: str) -> torch.Tensor:
        got = results[request_id]["prompt_logprobs"]
        return torch.tensor([got[pos][token] for pos, token in enumerate(PROMPTS[0]) if pos])

    base = prompt_logprobs("None-0")
    for name in ("superset", "subset", "disjoint"):
        assert (prompt_logprobs(f"{name}-0") - base).abs().max() > 1e-3, name


@pytest.mark.slow
def test_merged_by_default_only_with_goat_adapters(tmp_path, stores):
    """Default flags merge the start-up store's GOAT signature; an empty store (or one of LoRA
    adapters only) merges nothing and gives the base no undo slot."""
    store, later = stores
    merged = make_engine(tmp_path / "a", adapter_dir=store)
    assert merged.adapters.static.merged is not None
    assert merged.adapters.static.merged_modules and merged.adapters.base is not None
    (tmp_path / "empty").mkdir()
    lora_only = tmp_path / "lora-only"
    lora_only.mkdir()
    (lora_only / "lora").symlink_to(later["lora"])
    for adapter_dir in (tmp_path / "empty", lora_only, None):
        engine = make_engine(tmp_path / "b", adapter_dir=adapter_dir)
        assert engine.adapters.static.merged is None, adapter_dir
        assert engine.adapters.base is None, adapter_dir
