"""Tool calls (OpenAI's `tools` and `tool_choice` on chat completions), Hermes style: the tools
are rendered by the chat template, the model writes each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` (the format SmolLM2's and Qwen's
templates teach), and the parser (`--tool-call-parser hermes`, vLLM's flag) takes the calls out
of the text, also while it streams. `required` and a named function are enforced with a
structural tag grammar (engine/structured.py), so every call parses and its arguments follow the
function's schema.

Templates: `--chat-template` if given; else the model's own when it renders `tools`; else, for a
ChatML model (SmolLM2, Qwen), templates/hermes_tools.jinja. A conversation with tools on a model
whose template is neither is refused (400) rather than rendered without its tools."""

import contextlib
import functools
import json
import uuid
from pathlib import Path
from typing import Any

from goat_runtime.engine.sampling import Constraint
from server.errors import APIError
from server.protocol import ChatCompletionRequest, FunctionCall, ToolCall

HERMES_TEMPLATE = Path(__file__).parent / "templates" / "hermes_tools.jinja"
_PROBE_NAME = "goat_serve_probe_tool"


@functools.cache
def _renders_tools(template: str) -> bool:
    """Whether a chat template shows the tools it is given (SmolLM2's ignores them)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    probe: list[Any] = [
        {"type": "function", "function": {"name": _PROBE_NAME, "parameters": {}}}]
    try:
        # transformers annotates the result as str; it is (rendered chats, generation indices)
        rendered, _ = render_jinja_template(  # type: ignore[str-unpack]
            conversations=[[{"role": "user", "content": "hi"}]], tools=probe,
            chat_template=template, add_generation_prompt=True)
    except Exception:
        return False
    return _PROBE_NAME in rendered[0]


def tools_template(model_template: str | None, given: str | None) -> str:
    """The chat template for a conversation with tools (see the module's docstring)."""
    if given is not None:
        return given
    if model_template and _renders_tools(model_template):
        return model_template
    if model_template and "<|im_start|>" in model_template:
        return HERMES_TEMPLATE.read_text()
    raise APIError(400, "This model's chat template does not render tools; start goat-serve "
                   "with --chat-template (a template that renders them)", param="tools")


def uses_tools(body: ChatCompletionRequest) -> bool:
    """Whether the conversation needs a template that renders tools and tool calls."""
    return bool(body.tools) or any(m.role == "tool" or m.tool_calls for m in body.messages)


def tool_constraint(body: ChatCompletionRequest) -> Constraint | None:
    """The grammar of `tool_choice` required (one or more calls of the tools, nothing else) or
    a named function (one call of it); None for auto and none."""
    choice = body.tool_choice
    if not body.tools or choice in (None, "auto", "none"):
        return None
    functions = [t.function for t in body.tools]
    if not isinstance(choice, str):
        functions = [f for f in functions if f.name == choice.function.name]
        if not functions:
            raise APIError(400, f"tool_choice names the function '{choice.function.name}', "
                           "which is not among the tools", param="tool_choice")
    tags = [{"type": "tag", "begin": f'<tool_call>\n{{"name": {json.dumps(f.name)}, '
                                     '"arguments": ',
             "content": {"type": "json_schema",
                         "json_schema": f.parameters or {"type": "object"},
                         "max_whitespace_cnt": 1},  # a small model pads with whitespace
             "end": "}\n</tool_call>"} for f in functions]
    one = choice != "required" or body.parallel_tool_calls is False
    tag = {"type": "structural_tag", "format": (
        tags[0] if len(tags) == 1 and one else
        {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
         "stop_after_first": one})}
    return Constraint("structural_tag", json.dumps(tag), param="tool_choice")


def history_message(message: Any) -> dict[str, Any]:
    """A request message as the chat template sees it, tool calls' arguments as objects."""
    out: dict[str, Any] = {"role": message.role, "content": message.content or ""}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            entry = call.model_dump(exclude_none=True)
            if isinstance(call.function.arguments, str):
                with contextlib.suppress(ValueError):  # else the template writes it as is
                    entry["function"]["arguments"] = json.loads(call.function.arguments)
            calls.append(entry)
        out["tool_calls"] = calls
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


class HermesToolParser:
    """Takes `<tool_call>{...}</tool_call>` blocks out of a completion's text as it arrives:
    `feed` returns the text that is content and the calls completed so far; text that may be
    the start of a tag is held back. A block that is no valid call stays in the content."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self.num_calls = 0

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_call:
                i = self._buffer.find(self.START)
                if i < 0:
                    keep = _partial_suffix(self._buffer, self.START)
                    self._emit(content, self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                self._emit(content, self._buffer[:i])
                self._buffer = self._buffer[i + len(self.START):]
                self._in_call = True
            else:
                j = self._buffer.find(self.END)
                if j < 0:
                    break
                self._take(self._buffer[:j], content, calls)
                self._buffer = self._buffer[j + len(self.END):]
                self._in_call = False
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the text: a call cut short (no closing tag) counts if it parses."""
        content: list[str] = []
        calls: list[ToolCall] = []
        if self._in_call:
            self._take(self._buffer, content, calls)
        else:
            self._emit(content, self._buffer)
        self._buffer, self._in_call = "", False
        return "".join(content), calls

    def _take(self, body: str, content: list[str], calls: list[ToolCall]) -> None:
        call = _parse_call(body)
        if call is None:
            content.append(self.START + body + self.END)
        else:
            calls.append(call)
            self.num_calls += 1

    def _emit(self, content: list[str], text: str) -> None:
        if not (self.num_calls and text.isspace()):  # no newlines between or after calls
            content.append(text)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of `text` that starts `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def _parse_call(body: str) -> ToolCall | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(
        name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False)))


TOOL_CALL_PARSERS = {"hermes": HermesToolParser}  # --tool-call-parser
