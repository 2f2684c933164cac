"""Odd input, tried as a new user (or a fuzzer) would, against the real server: wrong types,
values at and past their caps, odd prompts and bodies. Each gets an OpenAI-shaped 4xx naming the
parameter, or the exact greedy tokens; never a 5xx."""

import types
from typing import Any, Union, get_args, get_origin

import httpx
import pytest

from goat_runtime.engine.sampling import MAX_LOGPROBS, MAX_N
from server.prompts import MAX_PROMPTS
from server.protocol import ChatCompletionRequest, CompletionRequest
from tests.server.conftest import BASE, PROMPTS, greedy, token_ids
from tests.server.test_http import assert_openai_error

COMPLETION = {"model": BASE, "prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0}
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 2,
        "temperature": 0}
ROUTES = {"/v1/completions": (CompletionRequest, COMPLETION),
          "/v1/chat/completions": (ChatCompletionRequest, CHAT)}


def _scalars(annotation: Any) -> set[type]:
    """The scalar types a field accepts ({int, NoneType} for `int | None`); empty for lists,
    dicts and models."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_scalars(arg) for arg in get_args(annotation)))
    return {annotation} if annotation in (int, float, bool, str, type(None)) else set()


def _fields(model: type, kind: type) -> list[str]:
    """The fields whose only scalar type (besides None) is `kind`."""
    return [name for name, field in model.model_fields.items()
            if _scalars(field.annotation) - {type(None)} == {kind}]


def _typed_cases() -> list[tuple[str, str, Any]]:
    cases = []
    for route, (model, _) in ROUTES.items():
        numbers = _fields(model, int) + _fields(model, float)
        assert {"n", "max_tokens", "temperature", "min_p", "seed"} <= set(numbers)
        cases += [(route, name, value) for name in numbers for value in ("4", True)]
        cases += [(route, name, value) for name in _fields(model, bool) for value in ("true", 1)]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("route", "param", "value"), _typed_cases())
def test_strict_types(http: httpx.Client, route: str, param: str, value: Any) -> None:
    """Strings are not numbers, booleans are not numbers, numbers are not booleans."""
    body = {**ROUTES[route][1], param: value}
    error = assert_openai_error(http.post(route, json=body), 400, param)
    assert error["code"] == "invalid_type"


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/completions", {"stop_token_ids": ["4"]}, "stop_token_ids[0]"),
    ("/v1/completions", {"stop_token_ids": [True]}, "stop_token_ids[0]"),
    ("/v1/completions", {"prompt": [5, "6"]}, "prompt"),
    ("/v1/completions", {"prompt": [True]}, "prompt"),
    ("/v1/completions", {"logit_bias": {"5": "1"}}, "logit_bias"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": "yes"}, "stream": True},
     "stream_options.include_usage"),
])
def test_strict_types_inside(http: httpx.Client, route: str, body: dict, param: str) -> None:
    assert_openai_error(http.post(route, json={**ROUTES[route][1], **body}), 400, param)


@pytest.mark.parametrize(("call", "param"), [
    ({"id": "c", "type": "function", "function": [""]}, "function"),  # found by the fuzz test
    ({"id": "c", "type": "function", "function": {"arguments": "{}"}}, "function.name"),
    ({"id": "c", "type": "function", "function": {"name": "f", "arguments": 3}},
     "function.arguments"),
    ({"type": "function", "function": {"name": "f", "arguments": "{}"}}, "id"),
    ({"id": "c", "type": "web", "function": {"name": "f", "arguments": "{}"}}, "type"),
    ("call", ""),
])
def test_malformed_tool_calls_in_history(http: httpx.Client, call: Any, param: str) -> None:
    """An assistant turn's tool calls, sent back by the client, are checked as OpenAI's shape."""
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [call]}]
    where = "messages[1].tool_calls[0]" + (f".{param}" if param else "")
    assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}),
                        400, where)


def test_tool_choice_needs_tools(http: httpx.Client) -> None:
    for choice in ("auto", "none", {"type": "function", "function": {"name": "f"}}):
        error = assert_openai_error(
            http.post("/v1/chat/completions", json={**CHAT, "tool_choice": choice}), 400,
            "tool_choice")
        assert "only allowed when 'tools' are specified" in error["message"]
    # with tools, on the fixture (its chat template renders no tools and is not ChatML, so the
    # Hermes fallback does not fit it), the refusal is about tools
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    error = assert_openai_error(http.post(
        "/v1/chat/completions", json={**CHAT, "tools": tools, "tool_choice": "auto"}), 400,
        "tools")
    assert "--chat-template" in error["message"]


@pytest.mark.parametrize("prompt", [[320], [-1], [2**70], [[5, 6], [7, 320]], [[5], [-3]]])
def test_out_of_vocabulary_token_ids(http: httpx.Client, prompt: list) -> None:
    response = http.post("/v1/completions", json={**COMPLETION, "prompt": prompt})
    error = assert_openai_error(response, 400, "prompt")
    assert "[0, 320)" in error["message"]  # the fixture's vocabulary


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/completions", {"prompt": ""}), ("/v1/completions", {"prompt": []}),
    ("/v1/completions", {"prompt": [[]]}), ("/v1/completions", {"prompt": [""]}),
    ("/v1/completions", {"prompt": ["w5", ""]}), ("/v1/completions", {"prompt": [[5], []]}),
    ("/v1/chat/completions", {"messages": []}),
])
def test_empty_prompts(http: httpx.Client, route: str, body: dict) -> None:
    param = "prompt" if route == "/v1/completions" else "messages"
    assert_openai_error(http.post(route, json={**ROUTES[route][1], **body}), 400, param)


def test_prompt_lists_of_lists(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={**COMPLETION, "prompt": PROMPTS, "n": 2})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == list(range(2 * len(PROMPTS)))
    for c in choices:  # choice prompt_index * n + i
        assert token_ids(c["text"]) == greedy(BASE, c["index"] // 2)[:2]
    # at the cap of prompts per request, and past it
    many = {**COMPLETION, "max_tokens": 1, "prompt": [PROMPTS[0]] * MAX_PROMPTS}
    response = http.post("/v1/completions", json=many)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == MAX_PROMPTS
    many["prompt"] = [PROMPTS[0]] * (MAX_PROMPTS + 1)
    assert_openai_error(http.post("/v1/completions", json=many), 400, "prompt")
    # lists of lists must hold token ids only
    for prompt in ([[5], 6], [[5], ["w6"]], [["w5"]], [[[5]]]):
        assert_openai_error(http.post("/v1/completions", json={**COMPLETION, "prompt": prompt}),
                            400, "prompt")


def test_n_at_and_past_its_cap(http: httpx.Client) -> None:
    for route, (_, base) in ROUTES.items():
        response = http.post(route, json={**base, "n": MAX_N})
        assert response.status_code == 200, response.text
        assert len(response.json()["choices"]) == MAX_N  # greedy: all alike
        for n in (MAX_N + 1, 0, -1, 2**64):
            assert_openai_error(http.post(route, json={**base, "n": n}), 400, "n")


@pytest.mark.slow
def test_max_tokens_at_and_past_its_cap(http: httpx.Client) -> None:
    room = 512 - len(PROMPTS[0])  # the fixture's max_model_len, less the prompt
    body = {**COMPLETION, "max_tokens": room, "ignore_eos": True}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == room
    for value in (room + 1, 2**64):
        error = assert_openai_error(
            http.post("/v1/completions", json={**body, "max_tokens": value}), 400, "max_tokens")
        assert error["code"] == "context_length_exceeded"
    for value in (0, -1):
        assert_openai_error(http.post("/v1/completions", json={**body, "max_tokens": value}),
                            400, "max_tokens")
    for param in ("max_tokens", "max_completion_tokens"):
        assert_openai_error(http.post("/v1/chat/completions", json={**CHAT, param: 10**6}), 400,
                            param)


def test_logprobs_at_and_past_their_cap(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={**COMPLETION, "logprobs": MAX_LOGPROBS,
                                                  "echo": True})
    assert response.status_code == 200, response.text
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["top_logprobs"][0] is None  # the first prompt token has none
    assert all(len(top) in (MAX_LOGPROBS, MAX_LOGPROBS + 1) for top in logprobs["top_logprobs"][1:])
    for value in (MAX_LOGPROBS + 1, -1):
        assert_openai_error(http.post("/v1/completions", json={**COMPLETION, "logprobs": value}),
                            400, "logprobs")
    chat = {**CHAT, "logprobs": True, "top_logprobs": MAX_LOGPROBS}
    response = http.post("/v1/chat/completions", json=chat)
    assert response.status_code == 200, response.text
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert all(len(entry["top_logprobs"]) == MAX_LOGPROBS for entry in content)
    assert_openai_error(http.post("/v1/chat/completions",
                                  json={**chat, "top_logprobs": MAX_LOGPROBS + 1}), 400,
                        "top_logprobs")


def test_100_stop_strings(http: httpx.Client) -> None:
    expected = greedy(BASE, 0)
    stops = [f"no such text {i}" for i in range(100)]
    body = {**COMPLETION, "max_tokens": 4, "ignore_eos": True, "stop": stops}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert token_ids(response.json()["choices"][0]["text"]) == expected[:4]
    # the last of 100 stops matches the third token: the text ends before it
    body["stop"] = [*stops[:99], f" w{expected[2]}"]
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    assert token_ids(choice["text"]) == expected[:2] and choice["finish_reason"] == "stop"
    assert_openai_error(http.post("/v1/completions", json={**body, "stop": [*stops, ""]}), 400,
                        "stop")


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/completions", b'{"model": "base", "prompt": "w5 \xff\xfe"}'),  # invalid UTF-8
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", '
     b'"content": "\xc3\x28"}]}'),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "goat0\x80"}'),
    ("/v1/completions", b'{"model": "base", "prompt": ' + b"[" * 100_000 + b"]" * 100_000
     + b"}"),  # deeper than any JSON parser recurses
    ("/v1/completions", b"[" * 1_000_000),
    ("/v1/completions", b'{"model": "base", "prompt": "w5", "max_tokens": 1e400}'),
])
def test_undecodable_bodies(http: httpx.Client, route: str, body: bytes) -> None:
    response = http.post(route, content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, None)
    assert error["message"].startswith(("Malformed JSON body: ", "Invalid value for"))
    assert error["code"] in ("invalid_json", "invalid_type")


@pytest.mark.parametrize(("route", "body", "param"), [
    ("/v1/completions", b'{"model": "base", "prompt": "w5 \\ud800"}', "prompt"),
    ("/v1/completions", b'{"model": "base", "prompt": ["w5", "\\udcff"]}', "prompt"),
    ("/v1/chat/completions", b'{"model": "base", "messages": [{"role": "user", '
     b'"content": "w5 \\udfff"}]}', "messages"),
    ("/v1/load_lora_adapter", b'{"lora_name": "x", "lora_path": "goat0\\ud800"}', "lora_path"),
])
def test_lone_surrogates(http: httpx.Client, route: str, body: bytes, param: str) -> None:
    """Valid JSON, but no Unicode text: a 400 naming the field, not a tokenizer's 500."""
    response = http.post(route, content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, param)
    assert "lone surrogate" in error["message"]


def test_deeply_nested_extra_field(http: httpx.Client) -> None:
    """Nested 600 deep (as deep as the JSON parser goes): parsed, kept as an unknown field."""
    body = (b'{"model": "base", "prompt": [5, 6], "max_tokens": 2, "temperature": 0, '
            b'"metadata": ' + b'{"a": [' * 300 + b"1" + b"]}" * 300 + b"}")
    response = http.post("/v1/completions", content=body,
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == http.post("/v1/completions", json={
        **COMPLETION, "prompt": [5, 6]}).json()["choices"][0]["text"]


@pytest.mark.parametrize(("route", "extra"), [
    ("/v1/completions", {"store": True, "prompt_cache_key": "k"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "w5 w6", "x": 1}],
                              "metadata": {"k": "v"}, "parallel_tool_calls": False}),
    ("/v1/chat/completions", {"stream": True, "stream_options": {
        "include_usage": True, "include_obfuscation": False, "continuous_usage_stats": False}}),
])
def test_extra_fields_are_ignored(http: httpx.Client, route: str, extra: dict) -> None:
    """Fields ignored on purpose (server/request_fields.py) change nothing; messages' own
    extra fields are not checked."""
    body = {**ROUTES[route][1], **extra}
    plain = http.post(route, json={**ROUTES[route][1], **{k: v for k, v in extra.items()
                                                         if k == "messages"}})
    response = http.post(route, json=body)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        assert response.json()["choices"] == plain.json()["choices"]
    else:
        assert response.text.endswith("data: [DONE]\n\n") and '"usage"' in response.text
