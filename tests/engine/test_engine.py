"""The engine end to end on the fixture: reference greedy tokens and prompt logprobs for every
adapter, alone and mixed; batch invariance under preemption; seeds; abort; chunked prefill;
prefix caching; adapter slots and on-demand loading."""

import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.outputs import EngineError, EngineListener
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.model import layers
from goat_runtime.model.kv_cache import block_bytes
from tests.adapters.adapted_model import FIXTURE
from tests.devices import DEVICES, check_logprobs_close

REFERENCE = load_file(str(FIXTURE / "reference_outputs.safetensors"))
PROMPTS = [REFERENCE[f"input_{i}"].tolist() for i in range(3)]
NAMES = [None, "goat0", "goat1", "lora0"]  # None: the base
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def reference_key(name: str | None) -> str:
    return name or "base"


def make_engine(tmp_path: Path, **overrides) -> LLMEngine:
    """The fixture's engine, on the CPU in float32 unless overridden (the engine's own default,
    "auto", would pick CUDA in bfloat16 where there is a GPU)."""
    options = dict(model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters",
                   static_cache_dir=tmp_path / "static", block_size=4, max_loras=4,
                   device="cpu", dtype="float32")
    options.update(overrides)
    return LLMEngine(EngineConfig(**options))


def step_all(engine: LLMEngine, timeout: float = 120.0):
    """Step until no request is left, yielding outputs; waits while adapters load."""
    deadline = time.monotonic() + timeout
    while engine.has_work() and time.monotonic() < deadline:
        outputs = engine.step()
        if not outputs and not engine.scheduler.running:
            time.sleep(0.01)  # only requests whose adapter is loading on the loader thread
        yield from outputs


def run(engine: LLMEngine,
        requests: list[tuple[str, list[int], SamplingParams, str | None]]) -> dict[str, dict]:
    """Add all requests, step until done; request id -> {"tokens": [per completion], "text",
    "finish", "prompt_logprobs"}."""
    results: dict[str, dict] = {}
    for request_id, prompt, params, adapter in requests:
        engine.add_request(request_id, prompt, params, adapter)
        results[request_id] = {"tokens": [[] for _ in range(params.n)],
                               "text": [""] * params.n, "finish": [None] * params.n,
                               "logprobs": [[] for _ in range(params.n)]}
    for out in step_all(engine):
        assert out.error is None, out.error
        r = results[out.request_id]
        if out.prompt_logprobs is not None:
            r["prompt_logprobs"] = out.prompt_logprobs
            r["prompt_ranks"] = out.prompt_logprob_ranks
        for d in out.outputs:
            r["tokens"][d.index] += d.token_ids
            r["text"][d.index] += d.text
            if d.logprobs:
                r["logprobs"][d.index] += d.logprobs
            if d.finish_reason:
                r["finish"][d.index] = d.finish_reason
    assert not engine.has_work(), "requests did not finish"
    return results


def reference_requests(prompt_logprobs: int | None = None):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                            prompt_logprobs=prompt_logprobs)
    return [(f"{reference_key(name)}-{i}", prompt, params, name)
            for name in NAMES for i, prompt in enumerate(PROMPTS)]


def check_reference(results: dict[str, dict], prompt_logprobs: bool = False) -> None:
    for name in NAMES:
        key = reference_key(name)
        for i, prompt in enumerate(PROMPTS):
            r = results[f"{key}-{i}"]
            assert r["tokens"][0] == REFERENCE[f"{key}_greedy_{i}"].tolist(), (key, i)
            assert r["finish"] == ["length"]
            if prompt_logprobs:
                expected = torch.log_softmax(REFERENCE[f"{key}_logits_{i}"], dim=-1)
                got = r["prompt_logprobs"]
                assert got[0] is None and len(got) == len(prompt)
                for pos in range(1, len(prompt)):
                    token = prompt[pos]
                    assert got[pos][token] == pytest.approx(
                        expected[pos - 1, token].item(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("merge_static", [False, True])
def test_reference_each_alone(tmp_path, merge_static):
    engine = make_engine(tmp_path, merge_static=merge_static)
    for request in reference_requests(prompt_logprobs=2):
        check_reference_one(run(engine, [request]), request)
    # Cached prefix blocks with no owner left count as free (a later allocation reuses them).
    assert engine.allocator.num_free == engine.num_blocks


def check_reference_one(results, request):
    request_id, prompt, _, _ = request
    key, i = request_id.rsplit("-", 1)
    r = results[request_id]
    assert r["tokens"][0] == REFERENCE[f"{key}_greedy_{i}"].tolist(), request_id
    expected = torch.log_softmax(REFERENCE[f"{key}_logits_{i}"], dim=-1)
    for pos in range(1, len(prompt)):
        assert r["prompt_logprobs"][pos][prompt[pos]] == pytest.approx(
            expected[pos - 1, prompt[pos]].item(), abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merge_static", [False, True])
def test_reference_all_in_one_mixed_batch(tmp_path, merge_static, device):
    engine = make_engine(tmp_path, merge_static=merge_static, max_num_batched_tokens=4096,
                         device=device)
    results = run(engine, reference_requests(prompt_logprobs=3))
    check_reference(results, prompt_logprobs=True)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_greedy_close_to_float32(tmp_path, device):
    """bfloat16 greedy decoding against the float32 engine on the same device (which gives the
    reference tokens, above): the same tokens up to the first near-tie, then within each other's
    top 5 (tests/devices.py). 24 tokens, prompts decoded together in one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=5)
    requests = [(f"{reference_key(name)}-{i}", prompt, params, name)
                for name in NAMES for i, prompt in enumerate(PROMPTS)]
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        results = run(make_engine(tmp_path, dtype=dtype, device=device), requests)
        outputs[dtype] = [(results[r[0]]["tokens"][0], results[r[0]]["logprobs"][0])
                          for r in requests]
    check_logprobs_close(outputs["float32"], outputs["bfloat16"],
                         names=[r[0] for r in requests])


@pytest.mark.slow
def test_weights_packed_once_final(tmp_path, monkeypatch):
    """The engine packs the base weights for oneDNN after merging static terms, and serves
    the reference tokens from them; --no-pack-weights serves the plain ones. The fixture's
    weights are below oneDNN's size (layers.ONEDNN_MIN_WEIGHT: F.linear serves them, and they
    get no packed copy), so here every weight is made big enough."""
    small = make_engine(tmp_path, merge_static=True)
    assert all(linear.packed is None for linear in small.model.fused_linears())
    assert small.model.lm_head_packed is None
    monkeypatch.setattr(layers, "ONEDNN_MIN_WEIGHT", 0)
    packed = make_engine(tmp_path, merge_static=True)
    assert all(linear.packed is not None for linear in packed.model.fused_linears())
    assert packed.model.lm_head_packed is not None
    check_reference(run(packed, reference_requests()))
    plain = make_engine(tmp_path, pack_weights=False)
    assert all(linear.packed is None for linear in plain.model.fused_linears())
    assert plain.model.lm_head_packed is None
    check_reference(run(plain, reference_requests()))


def test_chunked_prefill_same_tokens(tmp_path):
    engine = make_engine(tmp_path, max_num_batched_tokens=7, enable_prefix_caching=False)
    check_reference(run(engine, reference_requests()))


def extra_adapter(tmp_path: Path, source: str, name: str, seed: int) -> Path:
    """A fourth adapter: `source`'s weights perturbed."""
    target = tmp_path / "adapters" / name
    shutil.copytree(FIXTURE / "adapters" / source, target)
    tensors = load_file(str(target / "adapter_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    noise = {k: 0.05 * torch.randn(v.shape, generator=gen) for k, v in sorted(tensors.items())}
    # The reference saves each expert twice (lora_A.<e> and moe_layer.experts.<e>.lora_A):
    # both copies get the same perturbation.
    tensors = {k: v + noise[re.sub(r"moe_layer\.experts\.(\d+)\.lora_([AB])", r"lora_\2.\1", k)]
               for k, v in tensors.items()}
    save_file(tensors, str(target / "adapter_model.safetensors"))
    return target


def adapter_dir_with_four(tmp_path: Path) -> Path:
    for name in ("goat0", "goat1", "lora0"):
        shutil.copytree(FIXTURE / "adapters" / name, tmp_path / "adapters" / name)
    extra_adapter(tmp_path, "goat1", "goat2", seed=3)
    return tmp_path / "adapters"


@pytest.mark.slow
def test_batch_invariance_under_preemption(tmp_path):
    adapters = adapter_dir_with_four(tmp_path)
    names = [None, "goat0", "goat1", "lora0", "goat2"]
    gen = torch.Generator().manual_seed(0)
    requests = []
    for j in range(15):
        prompt = torch.randint(3, 320, (int(torch.randint(3, 30, (1,), generator=gen)),),
                               generator=gen).tolist()
        params = SamplingParams(temperature=0.0, max_tokens=int(8 + j % 5), ignore_eos=True)
        requests.append((f"r{j}", prompt, params, names[j % len(names)]))
    alone_engine = make_engine(tmp_path, adapter_dir=adapters)
    alone = {r[0]: run(alone_engine, [r])[r[0]]["tokens"] for r in requests}
    # 12 blocks of 4 tokens: a few requests at a time, so the cache runs out and preempts.
    config = alone_engine.model.config
    engine = make_engine(tmp_path, adapter_dir=adapters, max_loras=2,
                         kv_cache_memory=12 * block_bytes(config, 4, torch.float32))
    together = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for request_id, tokens in alone.items():
        assert together[request_id]["tokens"] == tokens, request_id
    assert engine.allocator.num_free == engine.num_blocks


def test_seeded_sampling_independent_of_the_batch(tmp_path):
    engine = make_engine(tmp_path)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, n=2,
                            ignore_eos=True)
    alone = run(engine, [("s", PROMPTS[1], params, "goat0")])["s"]["tokens"]
    others = [(f"o{i}", PROMPTS[i % 3], SamplingParams(temperature=0.8, seed=i, max_tokens=7),
               NAMES[i % 4]) for i in range(6)]
    mixed = run(engine, [*others[:3], ("s", PROMPTS[1], params, "goat0"), *others[3:]])
    assert mixed["s"]["tokens"] == alone
    assert alone[0] != alone[1]  # n completions draw independently


def test_abort_frees_every_block(tmp_path):
    engine = make_engine(tmp_path, enable_prefix_caching=False)
    start = engine.allocator.num_free
    for i, name in enumerate(NAMES):
        # ignore_eos: sampled at temperature 1 from the unseeded global generator, a request
        # could draw EOS in its first two steps (1 run in 40 global seeds) and not be running.
        engine.add_request(f"a{i}", PROMPTS[2], SamplingParams(max_tokens=50, ignore_eos=True),
                           name)
    engine.step()
    engine.step()
    assert engine.allocator.num_free < start
    for i in range(len(NAMES)):
        out = engine.abort(f"a{i}")
        assert out is not None and out.finished
        assert {d.finish_reason for d in out.outputs} == {"abort"}
    assert engine.allocator.num_free == start
    assert not engine.has_work()
    assert all(engine.adapters.refs(n) == 0 for n in NAMES if n)


@pytest.mark.slow
def test_prefix_cache_hits_same_tokens(tmp_path, monkeypatch):
    engine = make_engine(tmp_path)
    added = []
    monkeypatch.setattr(engine.scheduler, "add", lambda seq: (
        added.append(seq), type(engine.scheduler).add(engine.scheduler, seq)))
    first = run(engine, reference_requests())
    # Each (adapter, prompt) is new: nothing comes from the cache (it is keyed per adapter).
    assert [s.num_cached_hits for s in added] == [0] * len(added)
    added.clear()
    # The same prompts again: every full block but the one holding the last token comes from
    # the cache, and the tokens are the same.
    second = run(engine, reference_requests())
    assert [s.num_cached_hits for s in added] == [
        (len(s.request.prompt_token_ids) - 1) // 4 * 4 for s in added]
    assert sum(s.num_cached_hits for s in added) > 0
    assert first == second
    check_reference(second)


@pytest.mark.slow
def test_prefix_cache_is_per_adapter(tmp_path):
    engine = make_engine(tmp_path)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    run(engine, [("warm", PROMPTS[2], params, "goat0")])
    engine.add_request("same", PROMPTS[2], params, "goat0")
    seq = engine.requests["same"].sequences[0]
    next(step_all(engine))
    assert seq.num_cached_hits == (len(PROMPTS[2]) - 1) // 4 * 4
    engine.add_request("other", PROMPTS[2], params, "goat1")
    seq = engine.requests["other"].sequences[0]
    list(step_all(engine))
    assert seq.num_cached_hits == 0


@pytest.mark.slow
def test_unknown_adapter_and_bad_requests(tmp_path):
    engine = make_engine(tmp_path)
    with pytest.raises(EngineError, match="does not exist") as info:
        engine.add_request("x", PROMPTS[0], GREEDY, "nope")
    assert info.value.status == 404
    with pytest.raises(EngineError, match="maximum context length"):
        engine.add_request("y", PROMPTS[0], SamplingParams(max_tokens=600), None)
    with pytest.raises(EngineError, match="empty"):
        engine.add_request("z", [], GREEDY, None)
    with pytest.raises(EngineError, match="out of vocabulary"):
        engine.add_request("w", [5, 999], GREEDY, None)


@pytest.mark.slow
def test_invalid_adapter_fails_its_requests_alone(tmp_path):
    adapters = adapter_dir_with_four(tmp_path)
    (adapters / "broken").mkdir()
    shutil.copy(adapters / "goat0" / "adapter_config.json", adapters / "broken")
    (adapters / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    engine = make_engine(tmp_path, adapter_dir=adapters)
    engine.add_request("bad", PROMPTS[0], GREEDY, "broken")
    engine.add_request("good", PROMPTS[0], GREEDY, "goat0")
    errors, tokens = [], []
    for out in step_all(engine):
        if out.error is not None:
            errors.append((out.request_id, out.error))
        else:
            tokens += [t for d in out.outputs for t in d.token_ids]
    assert [e[0] for e in errors] == ["bad"]
    assert errors[0][1].status == 400 and "broken" in str(errors[0][1])
    assert tokens == REFERENCE["goat0_greedy_0"].tolist()


@pytest.mark.slow
def test_stop_conditions(tmp_path):
    engine = make_engine(tmp_path)
    ref = REFERENCE["goat0_greedy_1"].tolist()
    stop_id = ref[4]
    r = run(engine, [("t", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=12,
                                                      stop_token_ids=(stop_id,)), "goat0")])["t"]
    assert r["tokens"][0] == ref[: ref.index(stop_id) + 1] and r["finish"] == ["stop"]
    word = f"w{ref[3]}"
    r = run(engine, [("s", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=12,
                                                      stop=(word,)), "goat0")])["s"]
    assert word not in r["text"][0] and r["finish"] == ["stop"]


@pytest.mark.slow
def test_more_adapters_than_slots(tmp_path):
    engine = make_engine(tmp_path, max_loras=1)
    results = run(engine, reference_requests())
    check_reference(results)


@pytest.mark.slow
def test_host_lru_eviction_reloads(tmp_path):
    adapters = adapter_dir_with_four(tmp_path)
    engine = make_engine(tmp_path, adapter_dir=adapters, max_loras=1, max_cpu_adapters=1)
    for _ in range(2):
        for name in ("goat0", "goat1", "lora0"):
            r = run(engine, [("e", PROMPTS[0], GREEDY, name)])["e"]
            assert r["tokens"][0] == REFERENCE[f"{name}_greedy_0"].tolist()
    assert sum(engine.adapters.is_loaded(n) for n in ("goat0", "goat1", "lora0")) == 1


class LoadRecorder(EngineListener):
    """An EngineListener that records adapter loads and expert selections."""

    def __init__(self):
        self.loads: list[str] = []
        self.selections: dict[str, list[int]] = {}

    def on_step(self, num_seqs, num_tokens, adapters):
        pass

    def on_adapter_loaded(self, name, seconds):
        self.loads.append(name)

    def on_adapter_evicted(self, name, tier):
        pass

    def on_adapter_location(self, name, location):
        pass

    def on_expert_selections(self, adapter, counts):
        totals = self.selections.setdefault(adapter, [0] * len(counts))
        self.selections[adapter] = [a + b for a, b in zip(totals, counts, strict=True)]


@pytest.mark.slow
def test_same_adapter_requested_twice_loads_once_and_routers_are_counted(tmp_path):
    recorder = LoadRecorder()
    engine = LLMEngine(EngineConfig(model_dir=FIXTURE / "base", adapter_dir=FIXTURE / "adapters",
                                    static_cache_dir=tmp_path / "static", block_size=4,
                                    enable_prefix_caching=False), recorder)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    results = run(engine, [("a", PROMPTS[0], params, "goat0"), ("b", PROMPTS[1], params, "goat0"),
                           ("c", PROMPTS[0], params, "lora0")])
    assert sorted(recorder.loads) == ["goat0", "lora0"]
    assert results["a"]["tokens"][0] == REFERENCE["goat0_greedy_0"].tolist()[:3]
    # Every token of both goat0 requests picks top_k = 2 experts in each of the 14 adapted
    # modules (2 layers x 7 projections); LoRA has no router.
    tokens = len(PROMPTS[0]) + 2 + len(PROMPTS[1]) + 2
    assert sum(recorder.selections["goat0"]) == tokens * 2 * 14
    assert "lora0" not in recorder.selections
