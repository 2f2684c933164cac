"""End to end: `goat-serve` with no arguments (the embedded SmolLM2 and the demo adapters), one
concurrent batch of chat requests over every demo adapter and the base, on the same held-out
prompts: each adapter's effect shows in its answers and not in the base's."""

import asyncio
from pathlib import Path

import httpx
import pytest

from goat_runtime.training.tasks import eval_examples, get_task

REPO = Path(__file__).resolve().parents[2]
DEMO_ADAPTERS = sorted(p.name for p in (REPO / "adapters").iterdir()
                       if (p / "adapter_config.json").is_file())
PROMPTS_PER_TASK = 6

pytestmark = pytest.mark.slow


def test_demo_adapters_change_the_answers(server_url):
    assert len(DEMO_ADAPTERS) >= 3, DEMO_ADAPTERS
    models = httpx.get(server_url + "/v1/models").json()["data"]
    base = next(m["id"] for m in models if m.get("parent") is None)
    assert set(DEMO_ADAPTERS) <= {m["id"] for m in models}

    cases = [(name, example.prompt) for name in DEMO_ADAPTERS
             for example in eval_examples(get_task(name), PROMPTS_PER_TASK)]

    async def ask(client: httpx.AsyncClient, model: str, prompt: str) -> str:
        response = await client.post("/v1/chat/completions", json={
            "model": model, "temperature": 0, "max_tokens": 32,
            "messages": [{"role": "user", "content": prompt}]})
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    async def ask_all() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(base_url=server_url, timeout=300) as client:
            return list(await asyncio.gather(*(
                asyncio.gather(ask(client, name, prompt), ask(client, base, prompt))
                for name, prompt in cases)))

    answers = asyncio.run(ask_all())
    for name in DEMO_ADAPTERS:
        task = get_task(name)
        mine = [(p, a) for (n, p), a in zip(cases, answers, strict=True) if n == name]
        adapter_ok = sum(task.score(p, adapter) for p, (adapter, _) in mine)
        base_ok = sum(task.score(p, base_answer) for p, (_, base_answer) in mine)
        assert adapter_ok >= PROMPTS_PER_TASK // 2 + 1, (name, mine)
        assert base_ok <= 1, (name, mine)
