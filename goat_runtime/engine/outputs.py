"""What the engine streams back for a request: one RequestOutput per step that produced tokens.

Text and tokens are deltas (what is new since the previous output of the same request), so a
streaming server forwards them as they are and a non-streaming one concatenates them.
"""

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

# token id -> logprob of the chosen token and the top alternatives at one position
TokenLogprobs = dict[int, float]


@dataclass
class CompletionDelta:
    index: int  # which of the request's n completions
    text: str  # new text (stop strings excluded; held back while a stop string may be forming)
    token_ids: list[int]  # new tokens
    logprobs: list[TokenLogprobs] | None  # one dict per new token, when asked for
    finish_reason: str | None = None  # "stop" or "length" once finished, "abort" if aborted
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionDelta]
    finished: bool  # every completion has finished; the stream ends after this output
    num_prompt_tokens: int
    # First output only, when prompt_logprobs was asked for: None for the first prompt token.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # With prompt_logprobs: each prompt token's rank (vLLM's `rank`), None for the first.
    prompt_logprob_ranks: list[int | None] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # filled in the last output
    error: Exception | None = None  # the request failed (finished is True); streams raise it


# What an engine front puts in a request's asyncio queue: its outputs, or the error that ends it.
StreamItem = RequestOutput | BaseException


async def stream_outputs(stream: "asyncio.Queue[StreamItem]", start: Callable[[], None],
                         close: Callable[[bool], None]) -> AsyncGenerator[RequestOutput, None]:
    """An engine front's side of a request: `start()` sends it to the engine, then its outputs
    are yielded from `stream` until the finished one, and the error that ends it (put in the
    queue, or an output's `error`) is raised. `close(finished)` runs however it ends: with
    False when the consumer closed it early, so that the front aborts the request."""
    finished = False
    try:
        start()
        while True:
            item = await stream.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            if item.error is not None:
                finished = True
                raise item.error
            finished = item.finished
            yield item
            if finished:
                return
    finally:
        close(finished)


class EngineError(RuntimeError):
    """A request failed inside the engine (for example its adapter could not be loaded); the
    stream raises it. `status` is the HTTP status a server should answer with."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


def check_prompt(prompt_token_ids: Sequence[int], max_tokens: int, vocab_size: int,
                 max_model_len: int) -> None:
    """Raise EngineError (400) for a prompt no engine can serve: empty, a token outside the
    vocabulary, or prompt + max_tokens over the model's context length."""
    if not prompt_token_ids:
        raise EngineError("The prompt is empty.", status=400)
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise EngineError(f"Token id {bad} is out of vocabulary (size {vocab_size}).",
                          status=400)
    total = len(prompt_token_ids) + max_tokens
    if total > max_model_len:
        raise EngineError(
            f"This model's maximum context length is {max_model_len} tokens. However, "
            f"you requested {total} tokens ({len(prompt_token_ids)} in the prompt, "
            f"{max_tokens} for the completion).", status=400)


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: str  # "goat" or "lora"
    loaded: bool
    location: str  # "device", "host" or "disk"


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use, 0..1


class EngineListener(Protocol):
    """Engine-side events for metrics; called from the engine thread."""

    def on_step(self, num_seqs: int, num_tokens: int, adapters: list[str]) -> None: ...

    def on_step_time(self, seconds: float) -> None:
        """Wall time of a step that ran sequences (scheduling, forward, sampling): its longest
        against its median shows a stall, e.g. an adapter load holding the GIL."""

    def on_adapter_loaded(self, name: str, seconds: float) -> None: ...

    def on_adapter_evicted(self, name: str, tier: str) -> None: ...

    def on_adapter_location(self, name: str, location: str | None) -> None: ...

    def on_expert_selections(self, adapter: str, counts: list[int]) -> None: ...

    def on_adapter_memory(self, tier: str, adapters: int, nbytes: int) -> None:
        """Adapters resident in a tier ("host" or "device") and the bytes they take."""

    def on_adapter_slots(self, slots: int, slot_bytes: int, bounded: bool) -> None:
        """The device slot pool's size: its slots (the base's own not counted) and one slot's
        bytes; bounded: whether the slots bound a step's distinct adapters (an accelerator)."""

    # Remote adapters (adapters/store.py's StoreEvents; called from a download thread): store
    # is "s3" or "hf"; reason one of FetchError's.
    def on_adapter_download(self, store: str, nbytes: int, seconds: float) -> None: ...

    def on_adapter_download_failed(self, store: str, reason: str) -> None: ...
