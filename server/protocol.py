"""OpenAI-compatible request and response bodies (plus vLLM's extras), and their mapping to
`SamplingParams`.

Requests keep the fields they do not declare (`extra="allow"`) for request_fields.py, which
refuses each by name unless it is on its short list of fields ignored on purpose; fields whose
meaning goat-serve cannot honour are refused by the routes, never ignored.
Known fields are typed strictly: a number given as a string, or a boolean given for a number (or
the reverse), is a 400 naming the field, as OpenAI answers.
"""

import json
import re
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from goat_runtime.engine.sampling import Constraint, SamplingParams, SamplingParamsError

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


# ---- structured outputs and tools (requests) ------------------------------------------------

class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Body):
    """vLLM 0.32's `structured_outputs` request field (exactly one constraint)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    # None: compact JSON (goat-serve's default); false: any whitespace (vLLM's default)
    disable_any_whitespace: bool | None = None
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


def constraint_of(structured: StructuredOutputs | None,
                  response_format: ResponseFormat | None) -> Constraint | None:
    """The request's structured output: `response_format` (json_object, json_schema) or
    `structured_outputs`, as vLLM combines them (the former wins)."""
    compact = structured is None or structured.disable_any_whitespace is not False
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            return Constraint("json_object", any_whitespace=not compact,
                              param="response_format")
        if response_format.json_schema is None:
            raise SamplingParamsError("response_format", "response_format of type json_schema "
                                      "needs json_schema")
        return Constraint("json", json.dumps(response_format.json_schema.schema_),
                          any_whitespace=not compact, param="response_format")
    if structured is None:
        return None
    for name in ("disable_additional_properties", "whitespace_pattern"):
        if getattr(structured, name):
            raise SamplingParamsError(f"structured_outputs.{name}",
                                      f"structured_outputs.{name} is not supported")
    given = {name: value for name, value in (
        ("json", structured.json_), ("regex", structured.regex), ("choice", structured.choice),
        ("grammar", structured.grammar), ("json_object", structured.json_object),
        ("structural_tag", structured.structural_tag)) if value is not None}
    if len(given) != 1:
        raise SamplingParamsError("structured_outputs", "structured_outputs takes exactly one "
                                  "of json, regex, choice, grammar, json_object, structural_tag")
    kind, value = next(iter(given.items()))
    if kind == "json_object":
        spec = ""
    elif isinstance(value, str) and kind != "choice":
        spec = value
    else:  # a choice list, or a JSON schema given as an object
        spec = json.dumps(value)
    return Constraint(kind, spec, any_whitespace=not compact, param="structured_outputs")


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


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
    prompt_logprobs: int | None = None  # vLLM's: the prompt tokens' logprobs, top N each
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    def _sampling_params(self, max_tokens: int, logprobs: int | None,
                         prompt_logprobs: int | None,
                         constraint: Constraint | None = None) -> SamplingParams:
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
            skip_special_tokens=self.skip_special_tokens,
            constraint=constraint or constraint_of(self.structured_outputs,
                                                   self.response_format))

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
        prompt_logprobs = self.prompt_logprobs
        if prompt_logprobs is None and self.echo:  # as vLLM: echo's logprobs are the prompt's
            prompt_logprobs = self.logprobs
        return self._sampling_params(max_tokens, self.logprobs, prompt_logprobs)


class CalledFunction(_Body):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends a JSON string; an object is taken as well


class MessageToolCall(_Body):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extras for the chat template
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @property
    def max_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_sampling_params(self, prompt_len: int, max_model_len: int,
                           tool_constraint: Constraint | None = None) -> SamplingParams:
        requested = (self.max_completion_tokens if self.max_completion_tokens is not None
                     else self.max_tokens)
        max_tokens = check_context(prompt_len, requested, max_model_len, "messages",
                                   self.max_tokens_param, default=None)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs, self.prompt_logprobs,
                                         tool_constraint)
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


class PromptLogprob(_Out):
    """vLLM's `Logprob`: one token's logprob at a prompt position, its rank in the vocabulary
    (1: the most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt token, token id -> its PromptLogprob (the prompt's own
# token first, then the top N); None for the first token, which nothing predicts.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionStreamChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionChoice(CompletionStreamChoice):
    prompt_logprobs: PromptLogprobs | None = None


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


class FunctionCall(_Out):
    name: str
    arguments: str  # JSON


class ToolCall(_Out):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageOut(_Out):
    role: str = "assistant"
    content: str | None = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)


class _Sparse(_Out):
    """Serialized with only the fields set (OpenAI's stream deltas carry only what changed)."""

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    """A streamed tool call: first its id, type and name, then its arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall


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
    prompt_logprobs: PromptLogprobs | None = None


class DeltaMessage(_Sparse):
    # OpenAI's deltas carry only what changed: {"role": ...} first, then {"content": ...}.
    role: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


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
    choices: list[CompletionStreamChoice]
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


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a completion `prompt`, or chat `messages` through the chat template
    (as /v1/chat/completions renders them)."""

    model: str | None = None  # None: the base model
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages
    return_token_strs: bool | None = False
    # with messages only
    add_generation_prompt: bool = True
    continue_final_message: bool = False


class TokenizeResponse(_Out):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None  # None: the base model
    tokens: list[int]


class DetokenizeResponse(_Out):
    prompt: str


class ErrorInfo(_Out):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(_Out):
    error: ErrorInfo


# ---- assembling engine outputs into responses and stream chunks ----------------------------
