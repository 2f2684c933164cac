"""Which request fields goat-serve takes without a declared meaning, and the check that refuses
every other undeclared one by name (400, `param` = the field, code `unsupported_parameter`), so
that no field is ever silently dropped.

The request models (protocol.py) declare the fields goat-serve serves; a field they do not
declare is accepted only if it is listed here: OpenAI's bookkeeping fields that never change an
answer, and fields accepted only at the value that means "off" (vLLM's extras that would
change the answer otherwise). Anything else is refused, also a misspelt field.
"""

import json
from typing import Any

from pydantic import BaseModel

from server.errors import APIError

# Accepted with any value and ignored on purpose: they route, store or label a request at
# OpenAI and never change the answer. (`user` is declared: it is a string, checked as such.)
IGNORED = frozenset({
    "store",  # keep the completion for OpenAI's evals and distillation: nothing is kept here
    "metadata",  # labels for stored completions
    "service_tier",  # OpenAI's processing tier
    "safety_identifier",  # an end user's id for abuse detection
    "prompt_cache_key",  # a routing hint for OpenAI's prompt cache
    "prompt_cache_retention",  # how long OpenAI keeps a cached prompt
})

# Accepted only at the value that turns them off (their default), since any other value would
# change the answer in a way goat-serve does not implement. The value must match in type too:
# 0 is no false.
_SHARED_OFF: dict[str, Any] = {
    "use_beam_search": False,  # vLLM
    "include_stop_str_in_output": False,  # vLLM
    "return_tokens_as_token_ids": False,  # vLLM
    "return_token_ids": False,  # vLLM
    "truncate_prompt_tokens": None,  # vLLM
    "logprob_token_ids": None,  # vLLM
    "priority": 0,  # vLLM (only with its priority scheduling)
}
OFF: dict[str, dict[str, Any]] = {
    "completions": {**_SHARED_OFF, "add_special_tokens": True},
    "chat": {**_SHARED_OFF, "add_special_tokens": False, "echo": False,
             "modalities": ["text"]},  # OpenAI's default output modality
    "tokenize": {},
    "detokenize": {},
}
STREAM_OPTIONS_OFF: dict[str, Any] = {"continuous_usage_stats": False}  # vLLM
STREAM_OPTIONS_IGNORED = frozenset({
    "include_obfuscation",  # OpenAI's random padding of stream events against side channels
})

# ---- known, but handled elsewhere (structured outputs and tool calls, issue 19 items 1-2) ----
# Fields whose serving is another part of goat-serve's work: protocol.py declares (or will
# declare) them and the routes check them, so this check lets them through, never refusing
# them as unknown while that work lands. OpenAI's structured outputs and tool calls, and vLLM
# 0.32's structured-output extra `structured_outputs` (json, regex, choice, grammar,
# json_object, structural_tag, ...); `parallel_tool_calls` means nothing, and is ignored,
# without tools. vLLM 0.32 removed its older `guided_*` fields (guided_json, guided_regex,
# guided_choice, guided_grammar, guided_decoding_backend, guided_whitespace_pattern) and
# ignores them; goat-serve refuses them by name, pointing to `structured_outputs`.
HANDLED_ELSEWHERE: dict[str, frozenset[str]] = {
    "completions": frozenset({"response_format", "structured_outputs"}),
    "chat": frozenset({"response_format", "structured_outputs", "tools", "tool_choice",
                       "parallel_tool_calls"}),
    "tokenize": frozenset(),
    "detokenize": frozenset(),
}


def _check(extra: dict[str, Any], accepted: frozenset[str], off: dict[str, Any],
           prefix: str = "") -> None:
    for name, value in extra.items():
        param = prefix + name
        if name in accepted:
            continue
        if name in off:
            if type(value) is not type(off[name]) or value != off[name]:
                raise APIError(400, f"'{param}' is not supported: goat-serve accepts it only "
                               f"as {json.dumps(off[name])}", param=param,
                               code="unsupported_parameter")
            continue
        hint = (" (vLLM 0.32 replaced the guided_* fields with structured_outputs)"
                if name.startswith("guided_") else "")
        raise APIError(400, f"Unsupported parameter: '{param}' is not supported by "
                       f"goat-serve{hint}.", param=param, code="unsupported_parameter")


def check_fields(body: BaseModel, endpoint: str) -> None:
    """Refuse the first field of `body` (a request to `endpoint`: "completions", "chat",
    "tokenize" or "detokenize") that its model does not declare and that is neither ignored
    on purpose, nor at its "off" value, nor handled elsewhere; the same inside
    `stream_options`."""
    generation = endpoint in ("completions", "chat")
    _check(body.model_extra or {},
           (IGNORED if generation else frozenset()) | HANDLED_ELSEWHERE[endpoint],
           OFF[endpoint])
    options = getattr(body, "stream_options", None)
    if isinstance(options, BaseModel):
        _check(options.model_extra or {}, STREAM_OPTIONS_IGNORED, STREAM_OPTIONS_OFF,
               "stream_options.")
