"""The GOAT training tool on the fixture's tiny base: initialisation, packing, load balancing,
and the served adapter reproducing the trained model; the synthetic tasks' checkers."""

import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from goat_runtime.adapters.binding import linear_shapes, slice_weights
from goat_runtime.adapters.format import load_adapter
from goat_runtime.adapters.static import RHO, StaticComponents, residual_factors
from goat_runtime.adapters.writer import ALL_PROJECTIONS
from goat_runtime.engine.config import EngineConfig
from goat_runtime.engine.engine import LLMEngine
from goat_runtime.engine.sampling import SamplingParams
from goat_runtime.training.tasks import (
    TASKS,
    NumbersTask,
    ReverseTask,
    UppercaseTask,
    answer_ids,
    number_words,
    prompt_ids,
)
from goat_runtime.training.train import TrainConfig, train
from goat_runtime.training.trainer import (
    AdapterSpec,
    GoatTrainer,
    goat_expert_init,
    load_balancing_loss,
    pack,
)
from tests.adapters.adapted_model import FIXTURE

BASE = FIXTURE / "base"
SPEC = AdapterSpec(rank=8, num_experts=4, top_k=2, target_modules=ALL_PROJECTIONS)
# Fused q/k/v and gate/up with some slices left out, and a single-slice linear.
TRAIN_SPEC = AdapterSpec(rank=8, num_experts=4, top_k=2,
                         target_modules=("q_proj", "v_proj", "up_proj", "down_proj"))
# The fixture's word-level tokenizer knows w3..w319: a reverse task over those words.
FIXTURE_TASK = ReverseTask(words=tuple(f"w{i}" for i in range(3, 40)))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(BASE))


def base_logits(trainer: GoatTrainer, ids: list[int]) -> torch.Tensor:
    with trainer.adapter_disabled():
        return trainer.sequence_logits(ids)


def fixture_sequences(tokenizer, n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    examples = FIXTURE_TASK.examples(n, seed)
    prompts = [prompt_ids(tokenizer, e.prompt) for e in examples]
    return ([p + answer_ids(tokenizer, e.answer) for p, e in zip(prompts, examples, strict=True)],
            [len(p) for p in prompts])


# (1) initialisation


def test_init_follows_the_reference_formulas(tmp_path):
    trainer = GoatTrainer(BASE, SPEC, static_cache_dir=tmp_path)
    name = "model.layers.1.self_attn.q_proj"
    weight = slice_weights(trainer.base.fused_linears())[name]
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    a, b = trainer.lora_a[trainer._key(name)], trainer.lora_b[trainer._key(name)]
    span, er = s.shape[0] // 4, SPEC.expert_rank
    for e in range(4):
        rows = slice(e * er, (e + 1) * er)
        piece = slice(e * span, e * span + er)  # init_type goat: the head of each span
        expected = u[:, piece] @ torch.diag(s[piece]) @ vh[piece] / RHO
        torch.testing.assert_close((SPEC.scale * b[:, rows] @ a[rows]).double(), expected,
                                   atol=1e-6, rtol=0)
    # The residual is the serving one: the same factors a fresh StaticComponents computes.
    c, d = trainer.static[name]
    c2, d2 = residual_factors(weight, SPEC.signature)
    assert torch.equal(c, c2) and torch.equal(d, d2)
    assert SPEC.cof == 1 / 4  # the reference's default init_cof
    # The router: nn.Linear's default init, uniform in +-1/sqrt(d_in).
    router = trainer.router[trainer._key(name)]
    assert router.shape == (4, weight.shape[1])
    assert router.abs().max() <= 1 / math.sqrt(weight.shape[1])


def test_dense_uniform_init_reproduces_the_base_exactly(tmp_path, tokenizer):
    """With every expert chosen at equal weight (k = E, zero router) and init_cof = 1/E, the
    experts add back exactly what the static residual removes: loss and logits are the base's.
    (With top-k < E routing the reference's init is not output-preserving; see trainer.py.)"""
    spec = AdapterSpec(rank=8, num_experts=4, top_k=4, target_modules=ALL_PROJECTIONS)
    trainer = GoatTrainer(BASE, spec, static_cache_dir=tmp_path)
    for router in trainer.router.values():
        router.data.zero_()
    seqs, prompt_lens = fixture_sequences(tokenizer, 3)
    for seq in seqs:
        torch.testing.assert_close(trainer.sequence_logits(seq), base_logits(trainer, seq),
                                   atol=1e-5, rtol=0)
    batch = pack(seqs, prompt_lens)
    with torch.no_grad():
        loss, _ = trainer.losses(batch)
        with trainer.adapter_disabled():
            base_loss, _ = trainer.losses(batch)
    assert loss.item() == pytest.approx(base_loss.item(), abs=1e-6)
    # The same with the reference's top-2 routing: a token's two experts add back only their
    # gate-weighted pieces, so the initial model is near the base, not equal to it.
    trainer = GoatTrainer(BASE, SPEC, static_cache_dir=tmp_path)
    deviation = (trainer.sequence_logits(seqs[0]) - base_logits(trainer, seqs[0])).abs().max()
    assert 1e-4 < deviation < 0.1


def test_expert_init_is_independent_of_the_scale():
    weight = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    products = []
    for alpha in (4.0, 16.0):
        spec = AdapterSpec(rank=4, num_experts=2, lora_alpha=alpha)
        a, b = goat_expert_init(weight, spec)
        products.append(spec.scale * b @ a)
    torch.testing.assert_close(products[0], products[1], atol=1e-6, rtol=0)


# (2) packing


def test_packed_batch_equals_separate_sequences(tmp_path, tokenizer):
    trainer = GoatTrainer(BASE, SPEC, static_cache_dir=tmp_path)
    seqs, prompt_lens = fixture_sequences(tokenizer, 3)
    batch = pack(seqs, prompt_lens)
    assert batch.num_tokens < sum(len(s) for s in seqs)  # the chat prefix is stored once
    with torch.no_grad():
        packed_loss, _ = trainer.losses(batch)
    losses, count = 0.0, 0
    for seq, prompt_len in zip(seqs, prompt_lens, strict=True):
        logits = trainer.sequence_logits(seq)
        targets = torch.tensor(seq[prompt_len:])
        losses += torch.nn.functional.cross_entropy(
            logits[prompt_len - 1 : -1], targets, reduction="sum").item()
        count += len(targets)
    assert packed_loss.item() == pytest.approx(losses / count, abs=1e-5)


# (3) load balancing


def test_load_balancing_loss_values():
    # E = 2, k = 1. Balanced: f = (1/2, 1/2), P = (1/2, 1/2) -> 2 * (1/4 + 1/4) = 1.
    p = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    assert load_balancing_loss(p.log(), 1).item() == pytest.approx(1.0)
    # Both tokens pick expert 0: f = (1, 0), P = (0.7, 0.3) -> 2 * 0.7 = 1.4.
    p = torch.tensor([[0.6, 0.4], [0.8, 0.2]])
    assert load_balancing_loss(p.log(), 1).item() == pytest.approx(1.4)
    # E = 3, k = 2, one token: f = (1, 1, 0), P = p -> 3 * (0.5 + 0.3) = 2.4.
    p = torch.tensor([[0.5, 0.3, 0.2]])
    assert load_balancing_loss(p.log(), 2).item() == pytest.approx(2.4)
    # The gradient flows through P only (f is a count): d/dlogits of E * sum f_e P_e.
    logits = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    load_balancing_loss(logits, 1).backward()
    probs = torch.softmax(logits.detach(), -1)[0]
    f = torch.tensor([1.0, 0.0, 0.0])
    expected = 3 * probs * (f - (f * probs).sum())  # softmax Jacobian applied to 3 f
    torch.testing.assert_close(logits.grad[0], expected)


def test_trainer_sums_the_loss_over_modules(tmp_path, tokenizer):
    trainer = GoatTrainer(BASE, SPEC, static_cache_dir=tmp_path)
    for router in trainer.router.values():
        router.data.zero_()  # uniform probabilities: each module's loss is exactly k
    trainer.train()
    _, aux = trainer.losses(pack(*fixture_sequences(tokenizer, 2)))
    assert len(trainer.router_logits) == len(trainer.module_names) == 14
    assert aux.item() == pytest.approx(SPEC.top_k * 14, abs=1e-5)


# (4) the served adapter reproduces the trained model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    config = TrainConfig(task="reverse", out=root / "adapters" / "fx", model_dir=BASE,
                         adapter=TRAIN_SPEC, steps=3, batch_size=4, lr=5e-2, warmup_steps=1,
                         seed=0, static_cache_dir=root / "static")
    result = train(config, FIXTURE_TASK, progress=False)
    trainer = GoatTrainer(BASE, TRAIN_SPEC, static_cache_dir=root / "static")
    adapter = load_adapter(result.out, linear_shapes(trainer.base.fused_linears()))
    with torch.no_grad():  # the trained weights, read back from disk
        for name, layer in adapter.layers.items():
            key = trainer._key(name)
            trainer.lora_a[key].copy_(layer.lora_a)
            trainer.lora_b[key].copy_(layer.lora_b)
            trainer.router[key].copy_(layer.router)
    trainer.eval()
    return root, result, trainer, adapter


@pytest.mark.slow
def test_saved_adapter_loads(trained):
    _, result, trainer, adapter = trained
    assert adapter.kind == "goat" and set(adapter.layers) == set(trainer.module_names)
    assert adapter.signature == TRAIN_SPEC.signature and len(adapter.layers) == 8
    layer = next(iter(adapter.layers.values()))
    assert (layer.num_experts, layer.top_k, layer.scale) == (4, 2, TRAIN_SPEC.scale)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)


@pytest.fixture(scope="module")
def expected(trained, tokenizer):
    """The trained model's greedy continuations and log-probabilities, in eval mode."""
    _, _, trainer, _ = trained
    prompts = [prompt_ids(tokenizer, e.prompt) for e in FIXTURE_TASK.examples(2, 99)]
    out = []
    for p in prompts:
        cont = trainer.greedy(p, 6)
        logits = trainer.sequence_logits(p + cont)
        moved = (logits - base_logits(trainer, p + cont)).abs().max().item()
        out.append((p, cont, torch.log_softmax(logits, dim=-1), moved))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("merge_static", [False, True], ids=["unmerged", "merged"])
def test_engine_serves_the_trained_model(trained, expected, merge_static):
    root = trained[0]
    engine = LLMEngine(EngineConfig(model_dir=BASE, adapter_dir=root / "adapters",
                                    static_cache_dir=root / "static", block_size=4,
                                    merge_static=merge_static))
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    # Logprobs at every position of prompt + continuation, top 20 alternatives each.
    echo = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=20)
    for i, (prompt, cont, _, _) in enumerate(expected):
        engine.add_request(f"greedy-{i}", prompt, greedy, "fx")
        engine.add_request(f"echo-{i}", prompt + cont, echo, "fx")
    tokens: dict[str, list[int]] = {}
    echoes = {}
    while engine.has_work():
        for out in engine.step():
            assert out.error is None, out.error
            tokens.setdefault(out.request_id, [])
            tokens[out.request_id] += [t for d in out.outputs for t in d.token_ids]
            if out.prompt_logprobs is not None:
                echoes[out.request_id] = out.prompt_logprobs
    for i, (prompt, cont, logprobs, moved) in enumerate(expected):
        assert tokens[f"greedy-{i}"] == cont, i
        seq = prompt + cont
        for pos in range(1, len(seq)):
            for token, value in echoes[f"echo-{i}"][pos].items():
                assert value == pytest.approx(logprobs[pos - 1, token].item(), abs=1e-4)
        assert moved > 0.1  # the training moved the model away from the base: the check bites


# (5) tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_answers_score_true_and_wrong_ones_false(name):
    task = TASKS[name]
    examples = task.examples(30, seed=1)
    assert examples == task.examples(30, seed=1)  # seeded
    assert len({e.prompt for e in examples}) == 30
    held_out = task.examples(30, seed=2, exclude=examples)
    assert not {e.prompt for e in held_out} & {e.prompt for e in examples}
    rng = random.Random(0)
    for e in examples:
        assert task.score(e.prompt, e.answer)
        assert task.score(e.prompt, f"  {e.answer}.\n")  # spacing and a period are fine
        assert not task.score(e.prompt, "")
        assert not task.score(e.prompt, f"Sure! {e.answer}")
        other = rng.choice([x for x in examples if x.answer != e.answer])
        assert not task.score(e.prompt, other.answer)
    with pytest.raises(ValueError):
        task.expected("Tell me a joke")


def test_task_specific_checks():
    reverse, upper, numbers = ReverseTask(), UppercaseTask(), NumbersTask()
    prompt = reverse.lead + "apple river stone"
    assert reverse.expected(prompt) == "stone river apple"
    assert reverse.score(prompt, "Stone river apple")
    assert not reverse.score(prompt, "apple river stone")
    prompt = upper.lead + "green apple"
    assert upper.expected(prompt) == "GREEN APPLE"
    assert not upper.score(prompt, "green apple") and not upper.score(prompt, "Green Apple")
    assert [number_words(n) for n in (0, 15, 40, 47, 100, 342, 999)] == [
        "zero", "fifteen", "forty", "forty-seven", "one hundred", "three hundred forty-two",
        "nine hundred ninety-nine"]
    prompt = numbers.lead + "206"
    assert numbers.score(prompt, "two hundred six")
    assert numbers.score(prompt, "Two hundred and six.")
    assert not numbers.score(prompt, "two hundred sixty")
    assert not numbers.score(prompt, "206")


def test_chat_formatting(tokenizer):
    ids = prompt_ids(tokenizer, "w5 w6")
    assert ids == tokenizer.apply_chat_template(
        [{"role": "user", "content": "w5 w6"}], add_generation_prompt=True)["input_ids"]
    assert answer_ids(tokenizer, "w6 w5") == [6, 5, tokenizer.eos_token_id]


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="multiple of num_experts"):
        AdapterSpec(rank=6, num_experts=4)
    with pytest.raises(ValueError, match="top_k"):
        AdapterSpec(top_k=5)
    with pytest.raises(ValueError, match="target_modules"):
        AdapterSpec(target_modules=("lm_head",))


def test_main_writes_an_adapter(tmp_path, monkeypatch):
    from goat_runtime.training import train as train_module

    monkeypatch.setitem(train_module.TASKS, "reverse", FIXTURE_TASK)
    out = tmp_path / "a"
    status = train_module.main(["--task", "reverse", "--out", str(out), "--model", str(BASE),
                                "--steps", "1", "--batch-size", "2", "--targets", "down_proj",
                                "--quiet"])
    assert status == 0
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    adapter = load_adapter(out, {f"model.layers.{i}.mlp.down_proj": (128, 352) for i in range(2)})
    assert set(adapter.layers) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}


def test_static_cache_is_shared_with_serving(tmp_path):
    trainer = GoatTrainer(BASE, SPEC, static_cache_dir=tmp_path)
    static = StaticComponents(slice_weights(trainer.base.fused_linears()), tmp_path)
    static.factors(SPEC.signature, trainer.module_names)
    assert static.svd_runs == 0  # the trainer's SVDs were cached for the server


# (6) the committed demo adapters

DEMO_ADAPTERS = Path(__file__).resolve().parents[2] / "adapters"


@pytest.mark.slow  # converts the default model on first use (about a minute)
@pytest.mark.parametrize("name", sorted(TASKS))
def test_demo_adapter_serves_on_the_default_model(name):
    from goat_runtime.default_model import default_model_dir
    from server.adapters_cli import inspect_adapter, validate_adapter

    path = DEMO_ADAPTERS / name
    assert validate_adapter(path, default_model_dir()) == []
    info = inspect_adapter(path)
    assert info["kind"] == "GOAT" and info["init_signature"]["slug"] == "r8-e4-goat-c0.25"
    assert info["size_bytes"] < 8 << 20
    assert name in (DEMO_ADAPTERS / "README.md").read_text()


def test_gradients_through_the_model_linears_are_exact():
    """Training runs the model's own linears: their decode-size oneDNN path has no backward,
    so a gradient through x must take F.linear (else autograd silently returns a wrong one)."""
    from goat_runtime.model.layers import fast_linear

    gen = torch.Generator().manual_seed(0)
    weight, grad_out = torch.randn(12, 16, generator=gen), torch.randn(8, 12, generator=gen)
    x = torch.randn(8, 16, generator=gen, requires_grad=True)
    (fast_linear(x, weight) * grad_out).sum().backward()
    torch.testing.assert_close(x.grad, grad_out @ weight)
