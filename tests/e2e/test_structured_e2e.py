"""Structured outputs and tool calls with the official client on the default server (SmolLM2
and the demo adapters), issue 19's proof: `parse()` with a pydantic model is valid for 20 of 20
prompts on the base and on each demo adapter; a tool-call round trip; `tool_choice: "required"`
never returns invalid arguments over 50 varied prompts. Requests go concurrently (one batch)."""

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_default_server import DEMO_ADAPTERS

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Perth", "Rome", "Kyiv"]
ASKS = ["What is the weather in {}?", "Is it raining in {} today?", "How warm is {} now?",
        "Should I take an umbrella in {}?", "Tell me the temperature in {}, in fahrenheit."]


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad", "calm"]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)


def base_model(url: str) -> str:
    models = httpx.get(url + "/v1/models").json()["data"]
    return next(m["id"] for m in models if m.get("parent") is None)


def test_parse_pydantic_20_of_20_on_base_and_each_adapter(server_url):
    api = client(server_url)
    subjects = ["a baker", "a pilot", "a child", "a poet", "a farmer", "a doctor", "a nurse",
                "a judge", "a singer", "a sailor", "a chef", "a miner", "a monk", "a tailor",
                "a guard", "a clerk", "a diver", "a smith", "a scout", "a coach"]
    models = [base_model(server_url), *DEMO_ADAPTERS]

    def ask(case: tuple[str, str]) -> Person | None:
        model, subject = case
        reply = api.chat.completions.parse(
            model=model, temperature=0, max_tokens=100, response_format=Person,
            messages=[{"role": "user", "content": f"Describe {subject} as a person."}])
        return reply.choices[0].message.parsed  # parse() raises on invalid or cut JSON

    cases = [(m, s) for m in models for s in subjects]
    with ThreadPoolExecutor(len(cases)) as pool:
        people = list(pool.map(ask, cases))
    assert all(isinstance(p, Person) for p in people), people


def test_tool_call_round_trip(server_url):
    api = client(server_url)
    model = base_model(server_url)
    messages: list = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = api.chat.completions.create(model=model, temperature=0, max_tokens=60,
                                        messages=messages, tools=[WEATHER],
                                        tool_choice="required", parallel_tool_calls=False)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"city": arguments["city"], "temperature": 21,
                                         "sky": "sunny"})}]
    final = api.chat.completions.create(model=model, temperature=0, max_tokens=40,
                                        messages=messages, tools=[WEATHER], tool_choice="none")
    answer = final.choices[0].message
    assert answer.content and not answer.tool_calls
    # the tool's result was rendered into the prompt
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_required_tool_calls_always_parse_over_50_prompts(server_url):
    api = client(server_url)
    model = base_model(server_url)
    prompts = [ask.format(city) for ask in ASKS for city in CITIES]
    assert len(prompts) == 50

    def ask(prompt: str, stream: bool) -> list[dict]:
        args = dict(model=model, max_tokens=80, tools=[WEATHER], tool_choice="required",
                    messages=[{"role": "user", "content": prompt}], seed=len(prompt))
        if not stream:
            reply = api.chat.completions.create(**args)
            assert reply.choices[0].finish_reason in ("tool_calls", "length")
            return [c.function.model_dump() for c in reply.choices[0].message.tool_calls]
        calls: dict[int, dict] = {}
        for chunk in api.chat.completions.create(stream=True, **args):
            for part in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = calls.setdefault(part.index, {"name": "", "arguments": ""})
                entry["name"] += part.function.name or ""
                entry["arguments"] += part.function.arguments or ""
        return list(calls.values())

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(ask, prompts, [i % 2 == 1 for i in range(50)]))
    for prompt, calls in zip(prompts, results, strict=True):
        assert calls, prompt
        for call in calls:
            assert call["name"] == "get_weather"
            arguments = json.loads(call["arguments"])
            assert isinstance(arguments["city"], str), (prompt, arguments)
            assert arguments["unit"] in ("celsius", "fahrenheit"), (prompt, arguments)


def test_readme_example(server_url, capsys):
    """The README's structured-output and tool-call example prints what the README says."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S)
                 if "response_format=City" in b)
    expected = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    exec(block.replace("http://127.0.0.1:8000", server_url), {})
    assert capsys.readouterr().out.splitlines() == expected
