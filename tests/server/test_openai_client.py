"""The official openai client against the real server: models, completions, chat, streaming
with usage, n with seed, stop, and each error as the right openai exception class."""

import openai
import pytest

from tests.server.conftest import ADAPTERS, BASE, PROMPTS, greedy, token_ids

MODELS = [BASE, *ADAPTERS]


def test_models_list_base_and_every_adapter(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, *ADAPTERS}
    assert models[BASE].parent is None
    for name in ADAPTERS:
        assert models[name].parent == BASE
        assert models[name].owned_by == "goat-serve"
    assert "/" not in str([m.model_dump() for m in models.values()])  # no filesystem paths
    assert client.models.retrieve("goat1").id == "goat1"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


@pytest.mark.parametrize("model", MODELS)
def test_completion_greedy_matches_reference(client: openai.OpenAI, model: str) -> None:
    for i in (0, 2):
        out = client.completions.create(model=model, prompt=PROMPTS[i], max_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True})
        choice = out.choices[0]
        assert token_ids(choice.text) == greedy(model, i)
        assert choice.finish_reason == "length"
        assert out.model == model
        assert out.usage.prompt_tokens == len(PROMPTS[i])
        assert out.usage.completion_tokens == 12
        assert out.usage.total_tokens == len(PROMPTS[i]) + 12


def test_completion_prompt_forms(client: openai.OpenAI) -> None:
    text = " ".join(f"w{t}" for t in PROMPTS[0])
    one = client.completions.create(model="goat1", prompt=text, max_tokens=4, temperature=0)
    assert token_ids(one.choices[0].text) == greedy("goat1", 0)[:4]
    many = client.completions.create(model="goat1", prompt=[text, text], max_tokens=4,
                                     temperature=0)
    lists = client.completions.create(model="goat1", prompt=[PROMPTS[0], PROMPTS[1]],
                                      max_tokens=4, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1]
    assert {c.text for c in many.choices} == {one.choices[0].text}
    assert [c.index for c in lists.choices] == [0, 1, 2, 3]
    assert [token_ids(c.text) for c in lists.choices] == [
        greedy("goat1", 0)[:4], greedy("goat1", 0)[:4],
        greedy("goat1", 1)[:4], greedy("goat1", 1)[:4]]
    assert lists.usage.prompt_tokens == len(PROMPTS[0]) + len(PROMPTS[1])
    assert lists.usage.completion_tokens == 16


def test_completion_echo_and_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model="lora0", prompt=PROMPTS[0], max_tokens=3,
                                    temperature=0, echo=True, logprobs=2)
    choice = out.choices[0]
    assert token_ids(choice.text) == PROMPTS[0] + greedy("lora0", 0)[:3]
    lp = choice.logprobs
    assert lp is not None
    assert lp.tokens == [f"w{t}" for t in PROMPTS[0] + greedy("lora0", 0)[:3]]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    generated = lp.top_logprobs[len(PROMPTS[0]):]
    for token, top in zip(lp.tokens[len(PROMPTS[0]):], generated, strict=True):
        assert token in top and 2 <= len(top) <= 3  # the chosen token and the top 2
        assert max(top.values()) == top[token]  # greedy: the chosen one is the best
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_completion(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w5 w6"}]
    out = client.chat.completions.create(model="goat0", messages=messages, temperature=0,
                                         max_completion_tokens=5, logprobs=True,
                                         top_logprobs=3)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert len(token_ids(choice.message.content)) == 5
    assert choice.finish_reason == "length"
    # The template renders 'system w7 user w5 w6 assistant ': role words are <unk>.
    assert out.usage.prompt_tokens == 6
    content = choice.logprobs.content
    assert [c.token for c in content] == choice.message.content.split()
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.bytes == list(c.token.encode())
    parts = client.chat.completions.create(
        model="goat0", temperature=0, max_tokens=5,
        messages=[messages[0], {"role": "user", "content": [{"type": "text", "text": "w5 w6"}]}])
    assert parts.choices[0].message.content == choice.message.content


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="goat1", prompt=PROMPTS[1], max_tokens=12,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True},
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert token_ids(text) == greedy("goat1", 1)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])

    chat = list(client.chat.completions.create(
        model="lora0", messages=[{"role": "user", "content": "w9"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage.completion_tokens == 4 and chat[-1].usage.prompt_tokens == 3
    assert [c.choices[0].finish_reason for c in chat[:-1]][-1] == "length"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat[:-1])
    whole = client.chat.completions.create(
        model="lora0", messages=[{"role": "user", "content": "w9"}], max_tokens=4,
        temperature=0)
    assert streamed == whole.choices[0].message.content


def test_n_with_seed_is_reproducible(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        out = client.completions.create(model="goat0", prompt=PROMPTS[0], max_tokens=8,
                                        temperature=1.0, n=3, seed=1234)
        assert [c.index for c in out.choices] == [0, 1, 2]
        return [c.text for c in out.choices]

    first = sample()
    assert sample() == first
    chat = [client.chat.completions.create(
        model="goat0", messages=[{"role": "user", "content": "w5"}], max_tokens=6, n=2,
        seed=99, temperature=0.9) for _ in range(2)]
    assert [c.message.content for c in chat[0].choices] == [
        c.message.content for c in chat[1].choices]


def test_stop_strings_and_token_ids(client: openai.OpenAI) -> None:
    reference = greedy("goat0", 0)  # 295 314 314 99 ...
    out = client.completions.create(model="goat0", prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0, stop=["w99"])
    assert token_ids(out.choices[0].text) == reference[:3]
    assert out.choices[0].finish_reason == "stop"
    by_id = client.completions.create(model="goat0", prompt=PROMPTS[0], max_tokens=12,
                                      temperature=0, extra_body={"stop_token_ids": [99]})
    assert by_id.choices[0].finish_reason == "stop"
    assert token_ids(by_id.choices[0].text) == reference[:3]  # the stop token is not text
    assert by_id.usage.completion_tokens == 4


def test_vllm_sampling_extras_are_accepted(client: openai.OpenAI) -> None:
    out = client.completions.create(
        model="lora0", prompt=PROMPTS[1], max_tokens=5, temperature=0.7, seed=3,
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 5,
                    "ignore_eos": True})
    assert out.usage.completion_tokens == 5


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 600}, "max_tokens"),  # over the 512-token context
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[5], []]}, "prompt"),
    ({"prompt": [5, 99999]}, "prompt"),
    ({"suffix": "w5"}, "suffix"),
    ({"logprobs": 50}, "logprobs"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"min_tokens": 20}}, "min_tokens"),
])
def test_invalid_parameters_raise_bad_request(client: openai.OpenAI, kwargs: dict,
                                              param: str) -> None:
    args = {"model": "goat0", "prompt": "w5 w6", "max_tokens": 4} | kwargs
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**args)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param
    assert info.value.body["message"]


def test_chat_errors(client: openai.OpenAI) -> None:
    def chat(**kwargs: object) -> None:
        args = {"model": BASE, "messages": [{"role": "user", "content": "w5"}]} | kwargs
        client.chat.completions.create(**args)

    for kwargs, param in [({"max_completion_tokens": 0}, "max_completion_tokens"),
                          ({"max_tokens": 0}, "max_tokens"),
                          ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
                          ({"messages": []}, "messages"),
                          ({"messages": [{"role": "wizard", "content": "w5"}]},
                           "messages[0].role"),
                          ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                           "tools")]:
        with pytest.raises(openai.BadRequestError) as info:
            chat(**kwargs)
        assert info.value.body["param"] == param, kwargs
    long_message = " ".join(["w5"] * 600)
    with pytest.raises(openai.BadRequestError) as info:
        chat(messages=[{"role": "user", "content": long_message}])
    assert info.value.body["param"] == "messages"
    assert info.value.body["code"] == "context_length_exceeded"


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    for name in ("no-such-adapter", "../goat0", "x" * 300):
        with pytest.raises(openai.NotFoundError) as info:
            client.completions.create(model=name, prompt="w5", max_tokens=2)
        assert info.value.body["code"] == "model_not_found"
        assert info.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "w5"}],
                                       stream=True)


def test_streaming_n_and_echo(client: openai.OpenAI) -> None:
    kwargs = {"model": "goat1", "messages": [{"role": "user", "content": "w8 w9"}],
              "max_tokens": 5, "n": 2, "seed": 7, "temperature": 1.0}
    whole = client.chat.completions.create(**kwargs)
    texts = ["", ""]
    roles = set()
    finished = set()
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        [choice] = chunk.choices
        if choice.delta.role:
            roles.add((choice.index, choice.delta.role))
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finished.add(choice.index)
    assert roles == {(0, "assistant"), (1, "assistant")} and finished == {0, 1}
    assert texts == [c.message.content for c in whole.choices]

    chunks = list(client.completions.create(model="lora0", prompt=PROMPTS[2], max_tokens=2,
                                            temperature=0, echo=True, stream=True))
    assert token_ids(chunks[0].choices[0].text)[:len(PROMPTS[2])] == PROMPTS[2]
    assert token_ids("".join(c.choices[0].text for c in chunks)) == (
        PROMPTS[2] + greedy("lora0", 2)[:2])
