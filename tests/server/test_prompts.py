"""Completion prompts as token ids: a token-id prompt is decoded only when echo asks for its
text (each decode was a hop through a thread, which waits for the GIL beside a busy engine)."""

import asyncio
from typing import Any

from transformers import AutoTokenizer

from server.prompts import completion_prompts
from server.protocol import CompletionRequest
from tests.server.conftest import FIXTURE, PROMPTS


class CountingTokenizer:
    """The fixture tokenizer, counting its decodes."""

    def __init__(self) -> None:
        self.inner = AutoTokenizer.from_pretrained(str(FIXTURE / "base"))
        self.decodes = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)

    def decode(self, ids: list[int]) -> str:
        self.decodes += 1
        return self.inner.decode(ids)


def prompts(tokenizer: CountingTokenizer, **body: Any) -> tuple[list[list[int]], Any]:
    request = CompletionRequest(model="base", **body)
    return asyncio.run(completion_prompts(tokenizer, request))


def test_token_ids_are_decoded_only_for_echo() -> None:
    tokenizer = CountingTokenizer()
    assert prompts(tokenizer, prompt=PROMPTS) == (PROMPTS, None)
    assert tokenizer.decodes == 0
    ids, texts = prompts(tokenizer, prompt=PROMPTS, echo=True)
    assert ids == PROMPTS and tokenizer.decodes == len(PROMPTS)
    assert texts == [tokenizer.inner.decode(p) for p in PROMPTS]


def test_text_prompts_keep_their_text_for_echo() -> None:
    tokenizer = CountingTokenizer()
    ids, texts = prompts(tokenizer, prompt="w5 w6", echo=True)
    assert ids == [tokenizer.inner("w5 w6")["input_ids"]] and texts == ["w5 w6"]
    assert prompts(tokenizer, prompt="w5 w6")[1] is None
