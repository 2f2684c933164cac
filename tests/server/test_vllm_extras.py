"""vLLM's small extras on the live server: `prompt_logprobs` on completions and chat (shaped and
placed as vLLM 0.32 answers), POST /tokenize and /detokenize per model, and request fields
goat-serve does not implement refused by name (server/request_fields.py)."""

import inspect

import httpx
import openai
import pytest
from openai.resources.chat.completions import Completions

from server.request_fields import HANDLED_ELSEWHERE, IGNORED, OFF
from tests.server.conftest import ADAPTERS, BASE, PROMPTS, greedy, token_ids
from tests.server.test_http import assert_openai_error

CHAT = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w5 w6"}]


def check_prompt_logprobs(prompt_logprobs: list, prompt: list[int], top: int) -> None:
    """vLLM's shape: None first, then per prompt token {token id: {logprob, rank,
    decoded_token}} with the prompt's own token first and the top `top` ranked 1..top."""
    assert len(prompt_logprobs) == len(prompt) and prompt_logprobs[0] is None
    for pos, entry in enumerate(prompt_logprobs[1:], start=1):
        ids = [int(k) for k in entry]
        assert ids[0] == prompt[pos], pos
        assert len(ids) in (top, top + 1)
        for token_id, value in zip(ids, entry.values(), strict=True):
            assert set(value) == {"logprob", "rank", "decoded_token"}
            assert value["decoded_token"] == f"w{token_id}" or token_id < 3
            assert value["logprob"] < 0
        by_rank = sorted(entry.values(), key=lambda v: v["rank"])
        assert [v["rank"] for v in by_rank][:top] == list(range(1, top + 1))
        assert [v["logprob"] for v in by_rank] == sorted((v["logprob"] for v in by_rank),
                                                          reverse=True)


@pytest.mark.parametrize("model", [BASE, "goat0"])
def test_completion_prompt_logprobs_agree_with_echo(http: httpx.Client, model: str) -> None:
    """Each choice carries the prompt's logprobs; they are those echo reports for the same
    prompt, and the generated tokens are unchanged."""
    prompt = PROMPTS[1]
    body = {"model": model, "prompt": prompt, "max_tokens": 3, "temperature": 0, "n": 2}
    response = http.post("/v1/completions", json={**body, "prompt_logprobs": 2})
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    echo = http.post("/v1/completions", json={**body, "echo": True, "logprobs": 2})
    echoed = echo.json()["choices"][0]
    for choice in choices:
        assert token_ids(choice["text"]) == greedy(model, 1)[:3]
        assert choice["logprobs"] is None
        check_prompt_logprobs(choice["prompt_logprobs"], prompt, 2)
        assert choice["prompt_logprobs"] == choices[0]["prompt_logprobs"]
    got = [None] + [next(iter(e.values()))["logprob"] for e in choices[0]["prompt_logprobs"][1:]]
    assert got == echoed["logprobs"]["token_logprobs"][:len(prompt)]
    for entry, top in zip(choices[0]["prompt_logprobs"][1:],
                          echoed["logprobs"]["top_logprobs"][1:len(prompt)], strict=True):
        assert {v["decoded_token"]: v["logprob"] for v in entry.values()} == top
    assert echoed["prompt_logprobs"] == choices[0]["prompt_logprobs"]  # as vLLM: echo too


def test_prompt_logprob_ranks_are_the_vocabulary_ranks(http: httpx.Client) -> None:
    """A prompt token has its rank over the whole vocabulary: its place in the top list when it
    is in it (the greedy tokens appended to the prompt: rank 1), else one more than the tokens
    at least as likely (which a longer list shows)."""
    prompt = PROMPTS[0] + greedy("lora0", 0)[:2]
    body = {"model": "lora0", "prompt": prompt, "max_tokens": 1}
    few = http.post("/v1/completions", json={**body, "prompt_logprobs": 0}).json()
    many = http.post("/v1/completions", json={**body, "prompt_logprobs": 20}).json()
    check_prompt_logprobs(many["choices"][0]["prompt_logprobs"], prompt, 20)
    ranks = []
    for pos, (one, top) in enumerate(zip(few["choices"][0]["prompt_logprobs"][1:],
                                         many["choices"][0]["prompt_logprobs"][1:],
                                         strict=True), start=1):
        (token, value), = one.items()
        ranks.append(value["rank"])
        assert value["logprob"] == pytest.approx(top[token]["logprob"], abs=1e-5)
        assert value["rank"] == top[token]["rank"]
        alternatives = [v for k, v in top.items() if k != token]
        if value["rank"] <= 20:
            assert sum(v["logprob"] > value["logprob"] for v in alternatives) == value["rank"] - 1
        else:
            assert all(v["logprob"] >= value["logprob"] for v in alternatives), pos
    assert ranks[-2:] == [1, 1] and any(r > 20 for r in ranks)


def test_chat_prompt_logprobs_top_level(client: openai.OpenAI, http: httpx.Client) -> None:
    """Chat puts them on the response, not on the choices (vLLM's place), over the rendered
    conversation's tokens; the official client keeps them as an extra field."""
    out = client.chat.completions.create(model="goat1", messages=CHAT, max_tokens=2,
                                         temperature=0, extra_body={"prompt_logprobs": 1})
    rendered = http.post("/tokenize", json={"model": "goat1", "messages": CHAT}).json()
    prompt_logprobs = out.model_extra["prompt_logprobs"]
    check_prompt_logprobs(prompt_logprobs, rendered["tokens"], 1)
    assert "prompt_logprobs" not in out.choices[0].model_extra
    plain = http.post("/v1/chat/completions", json={"model": "goat1", "messages": CHAT,
                                                    "max_tokens": 2, "temperature": 0})
    assert plain.json()["prompt_logprobs"] is None
    assert plain.json()["choices"][0]["message"]["content"] == out.choices[0].message.content


@pytest.mark.parametrize(("route", "extra", "param"), [
    ("/v1/completions", {"prompt_logprobs": 2, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": 0, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"prompt_logprobs": 21}, "prompt_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": "2"}, "prompt_logprobs"),
])
def test_prompt_logprobs_refusals(http: httpx.Client, route: str, extra: dict,
                                  param: str) -> None:
    base = ({"prompt": "w5 w6"} if route == "/v1/completions" else {"messages": CHAT})
    body = {"model": BASE, "max_tokens": 2, **base, **extra}
    assert_openai_error(http.post(route, json=body), 400, param)


# ---- /tokenize and /detokenize ------------------------------------------------------------

@pytest.mark.parametrize("model", [None, BASE, *ADAPTERS])
def test_tokenize_detokenize_round_trip(http: httpx.Client, model: str | None) -> None:
    named = {} if model is None else {"model": model}
    text = "w5 w6 w300 w7"
    out = http.post("/tokenize", json={**named, "prompt": text, "return_token_strs": True})
    assert out.status_code == 200, out.text
    body = out.json()
    assert body == {"count": 4, "max_model_len": 512, "tokens": [5, 6, 300, 7],
                    "token_strs": ["w5", "w6", "w300", "w7"]}
    back = http.post("/detokenize", json={**named, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}


def test_tokenize_chat_is_what_chat_completions_run(client: openai.OpenAI,
                                                    http: httpx.Client) -> None:
    """Messages through the chat template: the same tokens chat completions count as the
    prompt; add_generation_prompt and continue_final_message as for chat completions."""
    chat = http.post("/tokenize", json={"model": "lora0", "messages": CHAT}).json()
    out = client.chat.completions.create(model="lora0", messages=CHAT, max_tokens=1)
    assert chat["count"] == len(chat["tokens"]) == out.usage.prompt_tokens
    assert chat["token_strs"] is None
    bare = http.post("/tokenize", json={"messages": CHAT, "add_generation_prompt": False})
    assert bare.json()["count"] < chat["count"]
    assert chat["tokens"][:bare.json()["count"]] == bare.json()["tokens"]
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "w5 w6" in text


def test_tokenize_add_special_tokens(http: httpx.Client) -> None:
    with_bos = http.post("/tokenize", json={"prompt": "w5", "add_special_tokens": True}).json()
    without = http.post("/tokenize", json={"prompt": "w5", "add_special_tokens": False}).json()
    default = http.post("/tokenize", json={"prompt": "w5"}).json()
    assert default == with_bos and without["tokens"] == [5]


@pytest.mark.parametrize(("route", "body", "status", "param"), [
    ("/tokenize", {"model": "no-such-model", "prompt": "w5"}, 404, "model"),
    ("/detokenize", {"model": "no-such-model", "tokens": [5]}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "w5", "messages": CHAT}, 400, "messages"),
    ("/tokenize", {"messages": []}, 400, "messages"),
    ("/tokenize", {"prompt": "w5", "add_generation_prompt": False}, 400,
     "add_generation_prompt"),
    ("/tokenize", {"messages": CHAT, "add_special_tokens": True}, 400, "add_special_tokens"),
    ("/tokenize", {"prompt": "w5", "tools": []}, 400, "tools"),
    ("/tokenize", {"prompt": "w5", "store": True}, 400, "store"),
    ("/detokenize", {"tokens": [5, 99999]}, 400, "tokens[1]"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": ["5"]}, 400, "tokens[0]"),
    ("/detokenize", {"tokens": [5], "skip_special_tokens": True}, 400, "skip_special_tokens"),
])
def test_tokenizer_route_errors(http: httpx.Client, route: str, body: dict, status: int,
                                param: str) -> None:
    assert_openai_error(http.post(route, json=body), status, param)


# ---- fields refused by name, or ignored on purpose -----------------------------------------

def _request(route: str, **extra: object) -> dict:
    base = {"prompt": PROMPTS[0]} if route == "/v1/completions" else {"messages": CHAT}
    return {"model": "goat0", "max_tokens": 2, "temperature": 0, **base, **extra}


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(("extra", "param"), [
    ({"not_a_field": 1}, "not_a_field"),
    ({"guided_json": {"type": "object"}}, "guided_json"),  # removed by vLLM 0.32
    ({"cache_salt": "abc"}, "cache_salt"),
    ({"bad_words": ["w5"]}, "bad_words"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"use_beam_search": 0}, "use_beam_search"),  # 0 is no false
    ({"priority": 1}, "priority"),
    ({"include_stop_str_in_output": True}, "include_stop_str_in_output"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
    ({"stream": True, "stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
])
def test_unimplemented_fields_are_refused_by_name(http: httpx.Client, route: str,
                                                   extra: dict, param: str) -> None:
    error = assert_openai_error(http.post(route, json=_request(route, **extra)), 400, param)
    assert error["code"] == "unsupported_parameter" and param in error["message"]


def test_chat_only_fields_at_their_off_value(http: httpx.Client) -> None:
    for extra in ({"modalities": ["text"]}, {"echo": False}, {"add_special_tokens": False}):
        assert http.post("/v1/chat/completions", json=_request("/v1/chat/completions",
                                                                **extra)).status_code == 200
    for extra, param in (({"modalities": ["text", "audio"]}, "modalities"),
                         ({"echo": True}, "echo"), ({"add_special_tokens": True},
                                                    "add_special_tokens")):
        assert_openai_error(http.post("/v1/chat/completions", json=_request(
            "/v1/chat/completions", **extra)), 400, param)
    assert_openai_error(http.post("/v1/completions", json=_request(
        "/v1/completions", add_special_tokens=False)), 400, "add_special_tokens")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_every_ignored_field_is_accepted_and_changes_nothing(http: httpx.Client,
                                                             route: str) -> None:
    endpoint = "completions" if route == "/v1/completions" else "chat"
    values = {"store": True, "metadata": {"k": "v"}, "service_tier": "auto",
              "safety_identifier": "user-1", "prompt_cache_key": "key",
              "prompt_cache_retention": "24h"}
    assert set(values) == IGNORED
    extra = {**values, **OFF[endpoint]}
    if endpoint == "chat":
        extra["parallel_tool_calls"] = True  # without tools: nothing to run in parallel
    plain = http.post(route, json=_request(route)).json()
    response = http.post(route, json=_request(route, **extra))
    assert response.status_code == 200, response.text
    assert response.json()["choices"] == plain["choices"]
    assert response.json()["usage"] == plain["usage"]


def test_handled_elsewhere_names_are_real_fields() -> None:
    """The fields left to structured outputs and tool calls are request fields of the official
    client (a misspelt name would let the real one be refused and itself pass) or vLLM 0.32's
    `structured_outputs` (its old guided_* fields are gone, so they are refused)."""
    chat = set(inspect.signature(Completions.create).parameters)
    legacy = set(inspect.signature(openai.resources.Completions.create).parameters)
    assert HANDLED_ELSEWHERE["chat"] - {"structured_outputs"} <= chat
    assert HANDLED_ELSEWHERE["completions"] - {"structured_outputs", "response_format"} <= legacy
    assert all("structured_outputs" in names for names in (HANDLED_ELSEWHERE["chat"],
                                                           HANDLED_ELSEWHERE["completions"]))
    assert not any(name.startswith("guided_") for names in HANDLED_ELSEWHERE.values()
                   for name in names)


def test_openai_client_defaults_pass(client: openai.OpenAI) -> None:
    """What the official client sends by itself (plain, streamed, with usage) is accepted."""
    out = client.chat.completions.create(model="goat0", messages=CHAT, max_tokens=2,
                                         temperature=0)
    assert out.usage.completion_tokens == 2
    stream = client.chat.completions.create(model="goat0", messages=CHAT, max_tokens=2,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    assert [c.usage.completion_tokens for c in stream if c.usage] == [2]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="goat0", prompt="w5", max_tokens=2,
                                  extra_body={"unknown_extra": True})
    assert info.value.body["param"] == "unknown_extra"


def test_echo_with_more_prompt_logprobs_keeps_logprobs_alternatives(http: httpx.Client) -> None:
    """echo's logprobs list the top `logprobs` even where prompt_logprobs asks for more (as
    vLLM: only prompt_logprobs carries the longer lists)."""
    out = http.post("/v1/completions", json={
        "model": BASE, "prompt": PROMPTS[2], "max_tokens": 2, "echo": True, "logprobs": 1,
        "prompt_logprobs": 3}).json()["choices"][0]
    assert all(1 <= len(top) <= 2 for top in out["logprobs"]["top_logprobs"][1:])
    check_prompt_logprobs(out["prompt_logprobs"], PROMPTS[2], 3)
