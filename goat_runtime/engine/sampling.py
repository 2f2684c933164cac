"""SamplingParams: how one request's tokens are chosen and when it stops, validated on creation.

Field names and meanings follow vLLM's (and so the OpenAI API's plus vLLM's extras). Invalid
values raise SamplingParamsError naming the parameter, so the server can answer 400 with it.
"""

from dataclasses import dataclass

MAX_N = 16
MAX_LOGPROBS = 20
# What Constraint.kind may be (engine/structured.py compiles each with xgrammar).
CONSTRAINT_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `param` names it (as the API spells it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Constraint:
    """Structured output: what the generated text must match (vLLM's StructuredOutputsParams).

    `spec` is the JSON schema (json), the regex, the choices as a JSON list (choice), the EBNF
    grammar or the xgrammar structural tag (JSON); json_object has none. `param` names the API
    field it came from, for errors (an invalid schema is a 400 naming it)."""

    kind: str
    spec: str = ""
    any_whitespace: bool = False  # JSON: compact unless asked (small models pad with spaces)
    param: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise SamplingParamsError(self.param, f"unknown constraint kind {self.kind!r}")
        if not isinstance(self.spec, str) or (not self.spec and self.kind != "json_object"):
            raise SamplingParamsError(self.param, f"the {self.kind} constraint is empty")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1  # independent completions of the prompt
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop token ids are suppressed before this many tokens
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None  # same seed -> same tokens, whatever else is in the batch
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # over prompt and output tokens, as transformers/vLLM
    stop: tuple[str, ...] = ()  # matched on the text; not included in it
    stop_token_ids: tuple[int, ...] = ()  # included in token_ids, not in the text
    ignore_eos: bool = False
    logprobs: int | None = None  # top alternatives per generated token (0: only the chosen)
    prompt_logprobs: int | None = None  # the same for every prompt token (echo)
    skip_special_tokens: bool = True
    constraint: Constraint | None = None  # structured output (engine/structured.py)

    def __post_init__(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise SamplingParamsError(param, message)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            check(isinstance(value, int | float) and not isinstance(value, bool), name,
                  f"{name} must be a number, got {value!r}")
        check(isinstance(self.stop, tuple | list), "stop",
              f"stop must be a list of strings, got {type(self.stop).__name__}")
        check(isinstance(self.stop_token_ids, tuple | list), "stop_token_ids",
              "stop_token_ids must be a list of integers")
        check(isinstance(self.n, int) and 1 <= self.n <= MAX_N, "n",
              f"n must be an integer between 1 and {MAX_N}, got {self.n!r}")
        check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
              f"max_tokens must be at least 1, got {self.max_tokens!r}")
        check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
              "min_tokens", f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), "
              f"got {self.min_tokens!r}")
        check(0.0 <= self.temperature <= 2.0, "temperature",
              f"temperature must be in [0, 2], got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.top_k, int) and self.top_k >= -1, "top_k",
              f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty",
              f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        check(self.seed is None or isinstance(self.seed, int), "seed",
              f"seed must be an integer, got {self.seed!r}")
        check(all(isinstance(s, str) and s for s in self.stop), "stop",
              "stop must be non-empty strings")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
              "stop_token_ids must be non-negative integers")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS), name,
                  f"{name} must be between 0 and {MAX_LOGPROBS}, got {value!r}")
        # The grammar decides where a constrained output ends: suppressing EOS could leave it
        # no token at all.
        check(self.constraint is None or self.min_tokens == 0, "min_tokens",
              "min_tokens cannot be combined with structured outputs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
