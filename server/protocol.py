"""OpenAI-compatible request and response bodies (plus vLLM's extras), and their mapping to
`SamplingParams`.

Requests tolerate unknown fields (`extra="allow"`; they are ignored) so newer OpenAI clients keep
working; fields whose meaning goat-serve cannot honour are refused by the routes, never ignored.
Known fields are typed strictly: a number given as a string, or a boolean given for a number (or
the reverse), is a 400 naming the field, as OpenAI answers.
"""

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from goat_runtime.engine.sampling import SamplingParams, SamplingParamsError

# Adapter (and served model) names: safe as URL segments, folder names and metric labels.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def valid_name(name: str) -> bool:
    return NAME_PATTERN.fullmatch(name) is not None


def check_unicode(param: str, *texts: str) -> None:
    """JSON may spell lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    for text in texts:
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise SamplingParamsError(param, f"{param} is not valid Unicode text (it holds a "
                                      "lone surrogate)") from exc


class _Body(BaseModel):
    # strict: "4" and true are no numbers, 1 and "yes" no booleans (pydantic would convert them)
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True

    def _sampling_params(self, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=given(self.temperature, 1.0), top_p=given(self.top_p, 1.0),
            top_k=given(self.top_k, 0), min_p=given(self.min_p, 0.0), seed=self.seed,
            presence_penalty=given(self.presence_penalty, 0.0),
            frequency_penalty=given(self.frequency_penalty, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            stop=tuple(stop), stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None  # None: 16, clipped to the context left
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def to_sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        max_tokens = check_context(prompt_len, self.max_tokens, max_model_len, "prompt",
                                   "max_tokens", default=16)
        prompt_logprobs = self.logprobs if self.echo else None
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None  # only with tools, which are refused
    response_format: dict[str, Any] | None = None
    # vLLM's extras for the chat template
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self, prompt_len: int, max_model_len: int) -> SamplingParams:
        requested = (self.max_completion_tokens if self.max_completion_tokens is not None
                     else self.max_tokens)
        max_tokens = check_context(prompt_len, requested, max_model_len, "messages",
                                   self.max_tokens_param, default=None)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs, None)
        except SamplingParamsError as exc:
            rename = {"max_tokens": self.max_tokens_param, "logprobs": "top_logprobs"}
            raise SamplingParamsError(rename.get(exc.param, exc.param), str(exc)) from exc


class ContextLengthError(SamplingParamsError):
    """The prompt, or the prompt plus the tokens asked for, does not fit the context."""


def check_context(prompt_len: int, requested: int | None, max_model_len: int,
                  prompt_param: str, max_param: str, default: int | None) -> int:
    """The number of tokens to generate: `requested`, or the default clipped to the context
    left (None: all of it). Raises when the request cannot fit the model's context length."""
    room = max_model_len - prompt_len
    if room < 1:
        raise ContextLengthError(
            prompt_param, f"This model's maximum context length is {max_model_len} tokens, and "
            f"the prompt has {prompt_len}; no room is left to generate. Shorten the prompt.")
    if requested is None:
        return room if default is None else min(default, room)
    if isinstance(requested, int) and requested >= 1 and requested > room:
        raise ContextLengthError(
            max_param, f"This model's maximum context length is {max_model_len} tokens. "
            f"However, you requested {prompt_len + requested} tokens ({prompt_len} in the "
            f"prompt, {requested} in the completion). Reduce the prompt or {max_param}.")
    return requested


# ---- responses -----------------------------------------------------------------------------

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UsageInfo(_Out):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionLogprobs(_Out):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _now() -> int:
    return int(time.time())


class CompletionResponse(_Out):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Out):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(_Out):
    role: str = "assistant"
    content: str = ""


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None


class DeltaMessage(_Out):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        # OpenAI's deltas carry only what changed: {"role": ...} first, then {"content": ...}.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatStreamChoice(_Out):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: str = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class CompletionChunk(_Out):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(_Out):
    id: str
    object: str = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "goat-serve"
    root: str
    parent: str | None = None
    max_model_len: int | None = None
    kind: str = "base"  # "base", "goat" or "lora"
    loaded: bool = True
    location: str | None = None  # adapters: "device", "host", "disk" or "remote"


class ModelList(_Out):
    object: str = "list"
    data: list[ModelCard]


class LoadLoRAAdapterRequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(_Body):
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; unused


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Out):
    error: ErrorInfo


# ---- assembling engine outputs into responses and stream chunks ----------------------------

def _clamp(logprob: float | None) -> float:
    """JSON has no -inf or NaN; clamp as vLLM does."""
    if logprob is None or logprob != logprob:
        return -9999.0
    return max(logprob, -9999.0)


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


class _Assembler:
    """Shared bookkeeping of the engine requests behind one API request (one per prompt), whose
    n completions each become choice `prompt_index * n + index`."""

    def __init__(self, response_id: str, model: str, n: int, prompt_ids: list[list[int]],
                 decode: Any):
        self.id = response_id
        self.model = model
        self.n = n
        self.prompt_ids = prompt_ids
        self.decode = decode  # token id -> text
        self.choices = [_Choice() for _ in range(len(prompt_ids) * n)]
        self.prompt_tokens = 0
        self.timings: list[dict[str, float]] = []
        self._seen_jobs: set[int] = set()

    def _observe(self, job: int, output: Any) -> None:
        if job not in self._seen_jobs:
            self._seen_jobs.add(job)
            self.prompt_tokens += output.num_prompt_tokens
        if output.finished and output.metrics:
            self.timings.append(dict(output.metrics))

    def _update(self, choice: _Choice, delta: Any) -> None:
        choice.num_tokens += len(delta.token_ids)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.stop_reason = delta.stop_reason

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


class CompletionAssembler(_Assembler):
    def __init__(self, response_id: str, model: str, n: int, prompt_ids: list[list[int]],
                 decode: Any, echo_texts: list[str] | None, logprobs: int | None):
        super().__init__(response_id, model, n, prompt_ids, decode)
        self.echo_texts = echo_texts  # the prompts' texts, when echo is on
        self.logprobs = logprobs

    def add(self, job: int, output: Any) -> list[CompletionChunk]:
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
                    CompletionChoice(index=index, text=text, logprobs=logprobs,
                                     finish_reason=delta.finish_reason,
                                     stop_reason=delta.stop_reason)]))
        return chunks

    def _add_logprobs(self, choice: _Choice, chunk: CompletionLogprobs, token_ids: list[int],
                      entries: list[Any] | None) -> None:
        """Append the tokens' logprobs to the chunk's and to the choice's running total."""
        entries = entries or []
        for i, token_id in enumerate(token_ids):
            entry = entries[i] if i < len(entries) else None
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
                             finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in enumerate(self.choices)])


class ChatAssembler(_Assembler):
    def __init__(self, response_id: str, model: str, n: int, prompt_ids: list[int],
                 decode: Any, top_logprobs: int | None):
        super().__init__(response_id, model, n, [prompt_ids], decode)
        self.top_logprobs = top_logprobs  # None: no logprobs

    def initial_chunks(self) -> list[ChatCompletionChunk]:
        """The role announcement that opens each choice's stream."""
        return [ChatCompletionChunk(id=self.id, model=self.model, choices=[
            ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
            for i in range(self.n)]

    def add(self, job: int, output: Any) -> list[ChatCompletionChunk]:
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
            choice.text.append(delta.text)
            self._update(choice, delta)
            if delta.text or logprobs or delta.finish_reason:
                chunks.append(ChatCompletionChunk(id=self.id, model=self.model, choices=[
                    ChatStreamChoice(index=delta.index, delta=DeltaMessage(
                        content=delta.text or (None if delta.finish_reason else "")),
                        logprobs=logprobs, finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason)]))
        return chunks

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
            ChatChoice(index=i, message=ChatMessageOut(content="".join(c.text)),
                       logprobs=ChatChoiceLogprobs(content=c.chat_logprobs)
                       if self.top_logprobs is not None else None,
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for i, c in enumerate(self.choices)])
