"""Tool calls without a model: the Hermes parser over text split at every point, the chat
assembler's OpenAI-shaped stream and body, the structural tag that enforces `required` and a
named function (compiled and matched on the fixture's tokenizer), and which chat template a
conversation with tools gets. Live calls on SmolLM2 are in tests/e2e/test_structured_e2e.py."""

import json

import pytest
import xgrammar as xgr

from goat_runtime.engine.outputs import CompletionDelta, RequestOutput
from server.assemblers import ChatAssembler
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.tools import HERMES_TEMPLATE, HermesToolParser, tool_constraint, tools_template

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
             "required": ["zone"]}}}]


def parse_in_pieces(text: str, cut: int) -> tuple[str, list]:
    parser = HermesToolParser()
    content, calls = parser.feed(text[:cut])
    more, more_calls = parser.feed(text[cut:])
    rest, last = parser.finish()
    return content + more + rest, calls + more_calls + last


@pytest.mark.parametrize("text, content, names", [
    (CALL, "", ["get_weather"]),
    ("Let me check. " + CALL + "\n" + CALL.replace("Paris", "Rome"), "Let me check. ",
     ["get_weather", "get_weather"]),
    ("no call here, only a < sign and <tool", "no call here, only a < sign and <tool", []),
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    (CALL[: -len("</tool_call>")], "", ["get_weather"]),  # cut short before its closing tag
])
def test_parser_at_every_split(text, content, names):
    for cut in range(len(text) + 1):
        got_content, calls = parse_in_pieces(text, cut)
        assert got_content == content, cut
        assert [c.function.name for c in calls] == names, cut
        for call in calls:
            assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
            assert call.id.startswith("call_") and call.type == "function"


def test_parser_holds_back_what_may_start_a_tag():
    parser = HermesToolParser()
    assert parser.feed("Sure <tool_")[0] == "Sure "
    assert parser.feed("call>\n{\"name\": \"f\", \"arguments\": {}}")[0] == ""
    content, calls = parser.feed("</tool_call>")
    assert content == "" and calls[0].function.name == "f"
    assert calls[0].function.arguments == "{}"


def _outputs(pieces: list[str], finish: str) -> list[RequestOutput]:
    return [RequestOutput("r", [CompletionDelta(0, piece, [7], None,
                                                finish if i == len(pieces) - 1 else None)],
                          finished=i == len(pieces) - 1, num_prompt_tokens=3)
            for i, piece in enumerate(pieces)]


def _assembler() -> ChatAssembler:
    return ChatAssembler("chatcmpl-x", "m", 1, [1, 2, 3], str, None, tool_parser=HermesToolParser)


def test_stream_deltas_as_openai_streams_them():
    pieces = ["Checking", ". <tool", "_call>\n{\"name\": \"get_weather\", \"arg",
              "uments\": {\"city\": \"Paris\"}}\n</tool_call>", ""]
    assembler = _assembler()
    chunks = [c.model_dump() for out in _outputs(pieces, "stop")
              for c in assembler.add(0, out)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert content == "Checking. "  # streamed as it came (the body strips it)
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert calls[1] == {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_body_carries_tool_calls_and_no_content():
    assembler = _assembler()
    for out in _outputs([CALL[:20], CALL[20:]], "stop"):
        assembler.add(0, out)
    choice = assembler.response().model_dump()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Paris"}
    # without a call the answer is plain content, finish_reason as the engine said
    plain = _assembler()
    for out in _outputs(["It is ", "sunny."], "length"):
        plain.add(0, out)
    choice = plain.response().model_dump()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny.",
                                 "tool_calls": []}
    assert choice["finish_reason"] == "length"


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": TOOLS,
         **fields})


def _matches(constraint, text: str, tokenizer) -> bool:
    info = xgr.TokenizerInfo.from_huggingface(tokenizer)
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_structural_tag(
        constraint.spec))
    return matcher.accept_string(text) and matcher.is_completed()


def test_required_and_named_choices_are_grammars(tokenizer):
    assert tool_constraint(_request(tool_choice="auto")) is None
    assert tool_constraint(_request(tool_choice="none")) is None
    required = tool_constraint(_request(tool_choice="required"))
    named = tool_constraint(_request(tool_choice={"type": "function",
                                                  "function": {"name": "get_time"}}))
    time_call = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert required.param == "tool_choice"
    assert _matches(required, CALL, tokenizer)
    assert _matches(required, CALL + "\n" + time_call, tokenizer)
    assert not _matches(required, "It is sunny.", tokenizer)
    assert not _matches(required, CALL.replace('"Paris"', "3"), tokenizer)  # the schema holds
    assert _matches(named, time_call, tokenizer)
    assert not _matches(named, CALL, tokenizer)
    assert not _matches(named, time_call.replace("UTC", "PST"), tokenizer)
    with pytest.raises(APIError, match="not among the tools"):
        tool_constraint(_request(tool_choice={"type": "function",
                                              "function": {"name": "nope"}}))


def test_template_for_tools():
    renders = "{% for t in tools %}{{ t.function.name }}{% endfor %}{{ messages[0].content }}"
    chatml = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"
    assert tools_template(renders, None) == renders  # the model's own renders them
    assert tools_template(chatml, None) == HERMES_TEMPLATE.read_text()
    assert tools_template(chatml, "given") == "given"  # --chat-template wins
    with pytest.raises(APIError, match="--chat-template") as info:
        tools_template("{{ messages[0].content }}", None)
    assert info.value.param == "tools"
