"""Assembling an API response from the engine's outputs: the choices of one request (n per
prompt) as one JSON body or as stream chunks, with usage, logprobs and the timings the metrics
need. `serving.py` drives an assembler; the route handler picks which."""

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from goat_runtime.engine.outputs import CompletionDelta, RequestOutput
from server.protocol import (
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatMessageOut,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamChoice,
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    PromptLogprob,
    PromptLogprobs,
    ToolCall,
    TopLogprob,
    UsageInfo,
)


def _clamp(logprob: float | None) -> float:
    """JSON has no -inf or NaN; clamp as vLLM does."""
    if logprob is None or logprob != logprob:
        return -9999.0
    return max(logprob, -9999.0)


def prompt_logprobs_out(entries: list[dict[int, float] | None], ranks: list[int | None],
                        top: int, decode: Callable[[int], str]) -> PromptLogprobs:
    """The engine's prompt logprobs as vLLM's `prompt_logprobs`: per position the prompt's own
    token (with its rank over the vocabulary) and then the `top` most likely tokens, ranked 1
    to `top` (the prompt's token keeps its place in that list when it is one of them)."""
    result: PromptLogprobs = []
    for entry, rank in zip(entries, ranks, strict=True):
        if entry is None or rank is None:
            result.append(None)
            continue
        own, *others = entry
        in_top = rank <= top
        top_ranks = iter([r for r in range(1, top + 1) if not (in_top and r == rank)])
        result.append({token: PromptLogprob(
            logprob=_clamp(entry[token]), rank=rank if token == own else next(top_ranks),
            decoded_token=decode(token)) for token in (own, *others)})
    return result


class _Choice:
    """One completion being assembled: its text, token count and how it ended."""

    def __init__(self) -> None:
        self.started = False
        self.text: list[str] = []
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text_offset = 0
        self.completion_logprobs = CompletionLogprobs()
        self.chat_logprobs: list[ChatTokenLogprob] = []
        self.parser: Any = None  # tool calls: a tools.HermesToolParser over the text
        self.tool_calls: list[ToolCall] = []


class Assembler(ABC):
    """Shared bookkeeping of the engine requests behind one API request (one per prompt), whose
    n completions each become choice `prompt_index * n + index`."""

    def __init__(self, response_id: str, model: str, n: int, prompt_ids: list[list[int]],
                 decode: Callable[[int], str]):
        self.id = response_id
        self.model = model
        self.n = n
        self.prompt_ids = prompt_ids
        self.decode = decode  # token id -> text
        self.choices = [_Choice() for _ in range(len(prompt_ids) * n)]
        self.prompt_tokens = 0
        self.timings: list[dict[str, float]] = []
        self._seen_jobs: set[int] = set()
        self.prompt_top = 0  # the top alternatives asked for per prompt position
        self.prompt_logprobs: dict[int, PromptLogprobs] = {}  # per job, when asked for

    def _observe(self, job: int, output: RequestOutput) -> None:
        if job not in self._seen_jobs:
            self._seen_jobs.add(job)
            self.prompt_tokens += output.num_prompt_tokens
        if output.prompt_logprobs is not None and output.prompt_logprob_ranks is not None:
            self.prompt_logprobs[job] = prompt_logprobs_out(
                output.prompt_logprobs, output.prompt_logprob_ranks, self.prompt_top,
                self.decode)
        if output.finished and output.metrics:
            self.timings.append(dict(output.metrics))

    def _update(self, choice: _Choice, delta: CompletionDelta) -> None:
        choice.num_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason

    def initial_chunks(self) -> Sequence[BaseModel]:
        """What a stream opens with, before any engine output."""
        return []

    @abstractmethod
    def add(self, job: int, output: RequestOutput) -> Sequence[BaseModel]:
        """Fold in one engine output of job `job`; returns the stream chunks it makes."""

    @abstractmethod
    def usage_chunk(self) -> BaseModel:
        """The stream's closing usage chunk (stream_options.include_usage)."""

    @abstractmethod
    def response(self) -> BaseModel:
        """The whole answer, once every job finished."""

    @property
    def aborted(self) -> bool:
        return any(c.finish_reason == "abort" for c in self.choices)

    def usage(self) -> UsageInfo:
        completion = sum(c.num_tokens for c in self.choices)
        return UsageInfo(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                         total_tokens=self.prompt_tokens + completion)

    def totals(self) -> dict[str, Any]:
        """What the request metrics need."""
        return {"prompt_tokens": self.prompt_tokens,
                "generation_tokens": sum(c.num_tokens for c in self.choices),
                "timings": self.timings,
                "longest_completion": max((c.num_tokens for c in self.choices), default=0)}


class CompletionAssembler(Assembler):
    def __init__(self, response_id: str, model: str, n: int, prompt_ids: list[list[int]],
                 decode: Callable[[int], str], echo_texts: list[str] | None, logprobs: int | None,
                prompt_top: int | None = None):
        super().__init__(response_id, model, n, prompt_ids, decode)
        self.echo_texts = echo_texts  # the prompts' texts, when echo is on
        self.logprobs = logprobs
        self.prompt_top = prompt_top or 0

    def add(self, job: int, output: RequestOutput) -> list[CompletionChunk]:
        """Fold in one engine output; returns the stream chunks it makes."""
        self._observe(job, output)
        chunks = []
        for delta in output.outputs:
            index = job * self.n + delta.index
            choice = self.choices[index]
            text, logprobs = delta.text, None
            if self.logprobs is not None:
                logprobs = CompletionLogprobs()
            if not choice.started:
                choice.started = True
                if self.echo_texts is not None:
                    text = self.echo_texts[job] + text
                    if logprobs is not None:
                        self._add_logprobs(choice, logprobs, self.prompt_ids[job],
                                           output.prompt_logprobs)
            if logprobs is not None:
                self._add_logprobs(choice, logprobs, delta.token_ids, delta.logprobs)
            choice.text.append(text)
            self._update(choice, delta)
            if text or logprobs or delta.finish_reason:
                chunks.append(CompletionChunk(id=self.id, model=self.model, choices=[
                    CompletionStreamChoice(index=index, text=text, logprobs=logprobs,
                                     finish_reason=delta.finish_reason,
                                     stop_reason=delta.stop_reason)]))
        return chunks

    def _add_logprobs(self, choice: _Choice, chunk: CompletionLogprobs, token_ids: list[int],
                      entries: list[Any] | None) -> None:
        """Append the tokens' logprobs to the chunk's and to the choice's running total."""
        entries = entries or []
        for i, token_id in enumerate(token_ids):
            entry = entries[i] if i < len(entries) else None
            if entry is not None:  # the token, then the top `logprobs` (prompt_logprobs may
                entry = dict(list(entry.items())[: (self.logprobs or 0) + 1])  # ask for more)
            token = self.decode(token_id)
            offset = choice.text_offset
            choice.text_offset += len(token)
            if entry is None:  # the first prompt token has none
                logprob, top = None, None
            else:
                ranked = sorted(entry.items(), key=lambda kv: -_clamp(kv[1]))
                logprob = _clamp(entry.get(token_id))
                top = {self.decode(t): _clamp(lp) for t, lp in ranked}
            for into in (chunk, choice.completion_logprobs):
                into.tokens.append(token)
                into.text_offset.append(offset)
                into.token_logprobs.append(logprob)
                into.top_logprobs.append(top)

    def usage_chunk(self) -> CompletionChunk:
        return CompletionChunk(id=self.id, model=self.model, choices=[], usage=self.usage())

    def response(self) -> CompletionResponse:
        return CompletionResponse(id=self.id, model=self.model, usage=self.usage(), choices=[
            CompletionChoice(index=i, text="".join(c.text),
                             logprobs=c.completion_logprobs if self.logprobs is not None
                             else None,
                             finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                             prompt_logprobs=self.prompt_logprobs.get(i // self.n))
            for i, c in enumerate(self.choices)])


class ChatAssembler(Assembler):
    def __init__(self, response_id: str, model: str, n: int, prompt_ids: list[int],
                 decode: Callable[[int], str], top_logprobs: int | None,
                 prompt_top: int | None = None, *,
                 tool_parser: Callable[[], Any] | None = None):
        super().__init__(response_id, model, n, [prompt_ids], decode)
        self.top_logprobs = top_logprobs  # None: no logprobs
        self.prompt_top = prompt_top or 0
        for choice in self.choices:  # tool calls are parsed out of the text
            choice.parser = tool_parser() if tool_parser is not None else None

    def initial_chunks(self) -> list[ChatCompletionChunk]:
        """The role announcement that opens each choice's stream."""
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[
            ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            for i in range(self.n)]

    def add(self, job: int, output: RequestOutput) -> list[ChatCompletionChunk]:
        self._observe(job, output)
        chunks = []
        for delta in output.outputs:
            choice = self.choices[delta.index]
            logprobs = None
            if self.top_logprobs is not None:
                logprobs = ChatChoiceLogprobs(content=[
                    self._token_logprob(t, delta.logprobs[i] if delta.logprobs
                                        and i < len(delta.logprobs) else None)
                    for i, t in enumerate(delta.token_ids)])
                choice.chat_logprobs.extend(logprobs.content or [])
            text, calls = self._parse(choice, delta)
            choice.text.append(text)
            self._update(choice, delta)
            for call in calls:  # OpenAI streams the id and name first, then the arguments
                k = len(choice.tool_calls)
                choice.tool_calls.append(call)
                for part in (DeltaToolCall(index=k, id=call.id, type="function",
                                           function=DeltaFunctionCall(name=call.function.name,
                                                                      arguments="")),
                             DeltaToolCall(index=k, function=DeltaFunctionCall(
                                 arguments=call.function.arguments))):
                    chunks.append(ChatCompletionChunk(id=self.id, model=self.model, choices=[
                        ChatStreamChoice(index=delta.index,
                                         delta=DeltaMessage(tool_calls=[part]))]))
            if text or logprobs or delta.finish_reason:
                chunks.append(ChatCompletionChunk(id=self.id, model=self.model, choices=[
                    ChatStreamChoice(index=delta.index, delta=DeltaMessage(
                        content=text or (None if delta.finish_reason else "")),
                        logprobs=logprobs, finish_reason=self._finish_reason(choice),
                        stop_reason=delta.stop_reason)]))
        return chunks

    @staticmethod
    def _parse(choice: _Choice, delta: CompletionDelta) -> tuple[str, list[ToolCall]]:
        """The delta's content, and the tool calls it completes."""
        if choice.parser is None:
            return delta.text, []
        text, calls = choice.parser.feed(delta.text)
        if delta.finish_reason is not None:
            rest, more = choice.parser.finish()
            text, calls = text + rest, calls + more
        return text, calls

    @staticmethod
    def _finish_reason(choice: _Choice) -> str | None:
        if choice.tool_calls and choice.finish_reason == "stop":
            return "tool_calls"
        return choice.finish_reason

    def _token_logprob(self, token_id: int, entry: dict[int, float] | None) -> ChatTokenLogprob:
        token = self.decode(token_id)
        entry = entry or {}
        ranked = sorted(entry.items(), key=lambda kv: -_clamp(kv[1]))[:self.top_logprobs or 0]
        return ChatTokenLogprob(
            token=token, logprob=_clamp(entry.get(token_id)), bytes=list(token.encode()),
            top_logprobs=[TopLogprob(token=self.decode(t), logprob=_clamp(lp),
                                     bytes=list(self.decode(t).encode())) for t, lp in ranked])

    def usage_chunk(self) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=self.usage())

    def response(self) -> ChatCompletionResponse:
        return ChatCompletionResponse(id=self.id, model=self.model, usage=self.usage(), choices=[
            ChatChoice(index=i, message=ChatMessageOut(
                content=("".join(c.text).strip() or None) if c.tool_calls else "".join(c.text),
                tool_calls=c.tool_calls),
                       logprobs=ChatChoiceLogprobs(content=c.chat_logprobs)
                       if self.top_logprobs is not None else None,
                       finish_reason=self._finish_reason(c), stop_reason=c.stop_reason)
            for i, c in enumerate(self.choices)], prompt_logprobs=self.prompt_logprobs.get(0))
