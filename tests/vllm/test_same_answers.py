"""Same answers by default: `goat-serve --engine vllm` and goat-serve's own engine, both at
`--dtype auto` (float32 on the CPU), give the same greedy answers on the default model
(SmolLM2-135M-Instruct) with the demo adapters (GOAT) and the base, with the static components
merged into the base (`--merge-static`) and not. The shared fixture is checked the same way in
test_server_vllm.py and tests/engine (both against its reference tokens). Slow: one native and
two vLLM servers, about 4 minutes."""

import json
from pathlib import Path

import pytest

from goat_runtime.training.tasks import eval_examples, get_task
from tests.vllm.serving import call, goat_serve

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

REPO = Path(__file__).resolve().parents[2]
DEMO = sorted(p.name for p in (REPO / "adapters").iterdir()
              if (p / "adapter_config.json").is_file())
PROMPTS_PER_ADAPTER = 3
COMMON = ("--kv-cache-memory", "256MiB", "--max-model-len", "512", "--max-num-seqs", "8")


def greedy_answers(base: str) -> dict[tuple[str, str], str]:
    """(model, prompt) -> greedy chat answer, for the base and every demo adapter."""
    status, body = call(base, "/v1/models")
    assert status == 200, body
    models = json.loads(body)["data"]
    root = next(m["id"] for m in models if m.get("parent") is None)
    answers = {}
    for name in DEMO:
        for example in eval_examples(get_task(name), PROMPTS_PER_ADAPTER):
            for model in (name, root):
                status, body = call(base, "/v1/chat/completions", {
                    "model": model, "temperature": 0, "max_tokens": 24,
                    "messages": [{"role": "user", "content": example.prompt}]})
                assert status == 200, body
                key = (name if model == name else "base", example.prompt)
                answers[key] = json.loads(body)["choices"][0]["message"]["content"]
    return answers


@pytest.fixture(scope="module")
def native(tmp_path_factory) -> dict[tuple[str, str], str]:
    log = tmp_path_factory.mktemp("native") / "server.log"
    with goat_serve(log, *COMMON) as base:
        return greedy_answers(base)


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_vllm_engine_answers_as_the_native_engine(vllm_python, native, merge, tmp_path):
    assert len(DEMO) >= 3, DEMO
    log = tmp_path / "server.log"
    with goat_serve(log, "--engine", "vllm", *COMMON,
                    *(["--merge-static"] if merge else [])) as base:
        answers = greedy_answers(base)
    assert "dtype=torch.float32" in log.read_text()  # auto: float32 on the CPU, as native
    assert "nothing merged" not in log.read_text()  # the demo adapters share one signature
    differ = {key: (native[key], answers[key]) for key in native if native[key] != answers[key]}
    assert not differ, differ
    assert len(answers) == len(native) == len(DEMO) * PROMPTS_PER_ADAPTER * 2
