"""A request and its sequences: what the scheduler moves between the waiting and running queues.

A request with n completions is n sequences sharing its prompt, adapter and parameters, each
with its own generator, output and KV blocks (vLLM V1 fans n out the same way).
"""

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from goat_runtime.engine.detokenizer import IncrementalDetokenizer
from goat_runtime.engine.outputs import TokenLogprobs
from goat_runtime.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None  # None: the base model
    tenant: str = ""  # who sent it (the server's API key id), for the fair share (fairness.py)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    sequences: list["Sequence"] = field(default_factory=list)
    # Set once the whole prompt has been computed.
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # Prompt logprobs so far (None for the first token), filled chunk by chunk.
    prompt_entries: list[TokenLogprobs | None] = field(default_factory=lambda: [None])
    # Each prompt token's rank (None for the first).
    prompt_ranks: list[int | None] = field(default_factory=lambda: [None])
    prompt_logprobs_sent: bool = False
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return all(s.status is SequenceStatus.FINISHED for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    """One completion: its tokens (prompt, then output), cache blocks and progress."""

    request: Request
    index: int
    generator: torch.Generator
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    blocks: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_hashes: list[bytes] = field(default_factory=list)  # of its full, computed blocks
    num_cached_hits: int = 0  # prompt tokens served from the prefix cache (last admission)
    passed_over: int = 0  # times a later sequence was admitted while this one waited for a slot
    cache_key: str | None = None  # its adapter load's prefix-cache key, fixed at admission
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    detokenizer: IncrementalDetokenizer | None = None  # attached by the engine
    matcher: "GrammarMatcher | None" = None  # of a structured output (structured.py)
    _token_ids: list[int] = field(init=False, repr=False)  # prompt + output, see token_ids

    def __post_init__(self) -> None:
        self._token_ids = self.request.prompt_token_ids + self.output_token_ids

    @property
    def token_ids(self) -> list[int]:
        """The prompt, then the output. One list kept per sequence and extended with the tokens
        appended to `output_token_ids` since the last call (read it, do not modify it)."""
        tokens, output = self._token_ids, self.output_token_ids
        new = len(output) - (len(tokens) - len(self.request.prompt_token_ids))
        if new > 0:
            tokens += output[-new:]
        elif new < 0:  # output_token_ids was shortened: start again
            tokens = self._token_ids = self.request.prompt_token_ids + output
        return tokens

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_token_ids) + len(self.output_token_ids)

    @property
    def adapter(self) -> str | None:
        return self.request.adapter

    @property
    def is_prefill(self) -> bool:
        """More than one token still to compute (the prompt, or a recompute after preemption)."""
        return self.num_tokens - self.num_computed_tokens > 1
