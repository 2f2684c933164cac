"""GOAT and LoRA adapters served by vLLM through the goat plugin, against the fixture's
reference (greedy tokens and prompt logprobs), alone and mixed with base requests in one batch;
max_loras=1 with base requests beside adapter requests; tensor parallel 2; static components
merged into the base weights; routers in float32 under bfloat16 serving; the refusals.

One engine per scenario (tests/vllm/driver.py), started once per module; slow: ~1 min each."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.vllm.conftest import run_in_vllm

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "goat-peft-tiny"
NAMES = ("base", "goat0", "goat1", "lora0")
LOGPROB_ATOL = 2e-5  # fp32 end to end: measured 1e-6 on the CPU


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "reference_outputs.safetensors"))


def _scenario(python: Path, tmp_path_factory, name: str) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("vllm") / f"{name}.safetensors"
    run_in_vllm(python, "driver", name, str(out))
    return load_file(str(out))


@pytest.fixture(scope="module")
def main_run(vllm_python, tmp_path_factory):
    return _scenario(vllm_python, tmp_path_factory, "main")


@pytest.fixture(scope="module")
def max_loras1_run(vllm_python, tmp_path_factory):
    return _scenario(vllm_python, tmp_path_factory, "max_loras1")


@pytest.fixture(scope="module")
def tp2_run(vllm_python, tmp_path_factory):
    return _scenario(vllm_python, tmp_path_factory, "tp2")


def _check(results, reference, tag: str, name: str, i: int) -> None:
    greedy = results[f"{tag}/{name}/{i}/greedy"]
    expected = reference[f"{name}_greedy_{i}"]
    assert greedy.tolist() == expected.tolist(), f"{tag}: {name} input {i} greedy tokens"
    logprobs = results[f"{tag}/{name}/{i}/prompt_logprobs"]
    expected_lp = torch.log_softmax(reference[f"{name}_logits_{i}"][:-1].double(), -1).float()
    assert not torch.isnan(logprobs).any(), f"{tag}: {name} input {i}: missing logprobs"
    err = (logprobs - expected_lp).abs().max().item()
    assert err < LOGPROB_ATOL, f"{tag}: {name} input {i}: prompt logprobs off by {err:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_alone(main_run, reference, name):
    for i in range(3):
        _check(main_run, reference, "alone", name, i)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_batch_with_prompt_logprobs(main_run, reference, name):
    """All twelve requests (base, goat0, goat1, lora0 x 3 inputs), prompt logprobs on, in one
    batch: stock vLLM 0.32 crashed here in add_lora_logits."""
    for i in range(3):
        _check(main_run, reference, "mixed", name, i)


@pytest.mark.parametrize("bad", ["corrupt", "too_large"])
def test_bad_adapter_fails_alone(main_run, reference, bad):
    """A corrupt or too-large adapter is refused in the front end (stock vLLM 0.32 lets the
    worker fail, which kills the engine); the same engine then serves every adapter and the
    base exactly as before."""
    assert f"refused/{bad}" in main_run, f"{bad} was not refused"
    assert not any(key.startswith(f"bad_{bad}/") for key in main_run), "the batch ran"
    for name in NAMES:
        for i in range(3):
            _check(main_run, reference, "after_bad", name, i)


@pytest.mark.parametrize("adapter", ["goat0", "goat1", "lora0"])
def test_max_loras_1_base_stays_base(max_loras1_run, reference, adapter):
    """One slot: base requests batched beside an adapter's got that adapter in stock vLLM."""
    tag = f"beside_{adapter}"
    for name, i in (("base", 1), (adapter, 1), ("base", 2), (adapter, 0)):
        _check(max_loras1_run, reference, tag, name, i)


@pytest.mark.parametrize("name", NAMES)
def test_tensor_parallel_2(tp2_run, reference, name):
    for i in range(3):
        _check(tp2_run, reference, "mixed", name, i)


@pytest.fixture(scope="module")
def merged_run(vllm_python, tmp_path_factory):
    return _scenario(vllm_python, tmp_path_factory, "merged")


@pytest.fixture(scope="module")
def merged_tp2_run(vllm_python, tmp_path_factory):
    return _scenario(vllm_python, tmp_path_factory, "merged_tp2")


@pytest.mark.parametrize("name", NAMES)
def test_merged_static(merged_run, reference, name):
    """GOAT_VLLM_MERGE_STATIC: the GOAT adapters' shared static term is merged into the base
    weights; GOAT slots drop those rows (--max-lora-rank 16 holds E + r = 12 of them, the
    unmerged 20 would be refused), base and LoRA tokens get the term undone; alone (the base
    after the adapters) and mixed in one batch."""
    for tag in ("alone", "mixed"):
        for i in range(3):
            _check(merged_run, reference, tag, name, i)


@pytest.mark.parametrize("name", NAMES)
def test_merged_static_tensor_parallel_2(merged_tp2_run, reference, name):
    for i in range(3):
        _check(merged_tp2_run, reference, "mixed", name, i)


@pytest.fixture(scope="module")
def bf16_router_run(vllm_python, tmp_path_factory):
    return _scenario(vllm_python, tmp_path_factory, "bf16_router")


def test_bfloat16_serving_routes_with_float32_routers(bf16_router_run):
    """Served in bfloat16, a GOAT adapter chooses its experts as its float32 router does:
    router_fine's two router rows differ by less than bfloat16's resolution (rounded, every
    token ties) and router_exact routes every token as router_fine's float32 rows do with
    bfloat16-exact rows (tests/vllm/router_adapters.py), so the two answer alike, bit for bit,
    only if vLLM's bfloat16 LoRA buffers did not round router_fine's router."""
    results = bf16_router_run
    for i in range(3):
        fine, exact = (results[f"bf16/{name}/{i}/prompt_logprobs"]
                       for name in ("router_fine", "router_exact"))
        assert not torch.isnan(fine).any(), f"input {i}: missing logprobs"
        assert torch.equal(fine, exact), (
            f"input {i}: prompt logprobs differ by {(fine - exact).abs().max().item():.3g}")
        assert torch.equal(results[f"bf16/router_fine/{i}/greedy"],
                           results[f"bf16/router_exact/{i}/greedy"]), f"input {i}"


CHECKS = ("other_version_refused", "pinned_version_accepted", "fully_sharded_refused",
          "merge_without_lora_refused", "resolver_finds_adapters", "adapters_validated",
          "server_refuses_bad_adapters")


@pytest.fixture(scope="module")
def plugin_checks(vllm_python) -> dict[str, str]:
    """Every check of tests/vllm/checks.py in one process (one vLLM import, not seven), in this
    order: other_version_refused first, before anything has loaded the plugins. Each check
    restores what it changes (the version lookup, the environment, the resolver registry);
    check name -> its line."""
    result = run_in_vllm(vllm_python, "checks", *CHECKS, timeout=300)
    lines = {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines()
             if line.startswith(("ok ", "FAIL "))}
    assert list(lines) == list(CHECKS), result.stdout
    return lines


@pytest.mark.parametrize("check", CHECKS)
def test_plugin_checks(plugin_checks, check):
    assert plugin_checks[check] == f"ok {check}", plugin_checks[check]
