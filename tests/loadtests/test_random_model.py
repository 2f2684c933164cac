"""benchmarks/random_model.py, the model and adapters the benchmarks and load tests share: on a
tiny config, a checkpoint the engine's config reads, a tokenizer in which the load generator's
prompt words are single distinct tokens, and adapters of both kinds that load for that base."""

import json

from transformers import AutoTokenizer

from benchmarks.random_model import (
    SMOLLM2_135M,
    write_goat_and_lora,
    write_random_model,
)
from goat_runtime.adapters.binding import base_linear_shapes
from goat_runtime.adapters.format import load_adapter
from loadtests.workload import WORDS

TINY = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024}


def test_prompt_words_are_single_distinct_tokens(tmp_path):
    config = write_random_model(tmp_path, {**SMOLLM2_135M, **TINY}, words=WORDS)
    assert (config.vocab_size, config.num_layers) == (1024, 2)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok(" ".join(WORDS), add_special_tokens=False).input_ids
    assert ids == list(range(3, 3 + len(WORDS)))  # one token per word, none <unk>
    assert tok.decode([3 + len(WORDS)]) == f"w{3 + len(WORDS)}"  # every other id decodes
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float32"


def test_adapters_of_both_kinds_fit_the_base(tmp_path):
    write_random_model(tmp_path / "model", {**SMOLLM2_135M, **TINY})
    shapes = base_linear_shapes(tmp_path / "model")
    assert shapes["model.layers.1.mlp.down_proj"] == (64, 96)
    assert len(shapes) == 7 * TINY["num_hidden_layers"]
    goat, lora = write_goat_and_lora(tmp_path / "goat", tmp_path / "lora", shapes, count=2)
    assert (goat, lora) == (["goat0", "goat1"], ["lora0", "lora1"])
    assert load_adapter(tmp_path / "goat" / "goat1", shapes).signature is not None
    assert load_adapter(tmp_path / "lora" / "lora0", shapes).signature is None
