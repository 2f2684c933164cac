"""Structured outputs over HTTP with the official client, on the fixture server: vLLM 0.32's
`structured_outputs` extras on completions and chat, streamed and not, n > 1 with a seed, and
the 400s (invalid constraints, conflicting fields). The fixture's words hold no JSON characters:
`response_format` JSON on SmolLM2 is in tests/e2e/test_structured_e2e.py."""

import openai
import pytest

from tests.server.conftest import BASE, token_ids

CHAT = [{"role": "user", "content": "w5 w6"}]


def test_choice_on_chat_and_completions(client: openai.OpenAI) -> None:
    extra = {"structured_outputs": {"choice": ["w7w8", "w9"]}}
    chat = client.chat.completions.create(model="goat0", messages=CHAT, max_tokens=6, n=3,
                                          seed=5, extra_body=extra)
    completion = client.completions.create(model="lora0", prompt="w5 w6", max_tokens=6,
                                           extra_body=extra)
    texts = [c.message.content for c in chat.choices] + [completion.choices[0].text]
    assert all(token_ids(t) in ([7, 8], [9]) for t in texts), texts
    assert {c.finish_reason for c in chat.choices + completion.choices} == {"stop"}
    again = client.chat.completions.create(model="goat0", messages=CHAT, max_tokens=6, n=3,
                                           seed=5, extra_body=extra)
    assert [c.message.content for c in again.choices] == [c.message.content
                                                           for c in chat.choices]


def test_regex_streams_and_ends_with_length(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="goat1", prompt="w5 w6", max_tokens=4, stream=True,
        # six words to match, four tokens allowed: the grammar cannot end before the length
        # does (with "+" it may end after any word, and sampling sometimes ends it there)
        extra_body={"structured_outputs": {"regex": "(w1[0-9] ?){6}"}})
    chunks = list(stream)
    tokens = token_ids("".join(c.choices[0].text for c in chunks))
    assert len(tokens) == 4 and all(10 <= t <= 19 for t in tokens)
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param, message", [
    ({"structured_outputs": {"regex": "(w1"}}, "structured_outputs", "Invalid regex"),
    ({"structured_outputs": {"regex": "w5", "choice": ["w6"]}}, "structured_outputs",
     "exactly one"),
    ({"structured_outputs": {"json": {"type": "object"}, "disable_additional_properties": True}},
     "structured_outputs.disable_additional_properties", "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format", "Invalid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}},
      "response_format": {"type": "json_object"}}, "tool_choice", "cannot be combined"),
])
def test_bad_constraints_are_400s_naming_the_field(client: openai.OpenAI, body: dict,
                                                   param: str, message: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4,
                                       extra_body=body)
    assert info.value.body["param"] == param
    assert message in info.value.body["message"]


def test_a_grammar_the_vocabulary_cannot_write_fails_alone(client: openai.OpenAI) -> None:
    """JSON needs a "{" that no fixture word starts with: that request fails (400), naming
    why, and the server goes on."""
    with pytest.raises(openai.BadRequestError, match="No token of the model's vocabulary"):
        client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=4,
                                       response_format={"type": "json_object"})
    ok = client.chat.completions.create(model=BASE, messages=CHAT, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"
