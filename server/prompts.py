"""Requests' prompts as token ids: /v1/completions' prompt forms (text, token ids, lists of
either) and /v1/chat/completions' messages through the chat template."""

import asyncio
from typing import Any

from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, check_unicode
from server.tools import history_message, tools_template, uses_tools

MAX_PROMPTS = 64  # prompts in one /v1/completions request


async def completion_prompts(tokenizer: Any, body: CompletionRequest,
                             ) -> tuple[list[list[int]], list[str] | None]:
    """The prompts as token ids, and as text when `echo` asks for it (None otherwise: token-id
    prompts are then not decoded, and take no hop through a thread)."""
    prompt = body.prompt
    items: list[Any] = [prompt] if isinstance(prompt, str) or (
        prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items or any(len(item) == 0 for item in items):
        raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
    if len(items) > MAX_PROMPTS:
        raise APIError(400, f"At most {MAX_PROMPTS} prompts per request", param="prompt")
    if isinstance(items[0], str):
        check_unicode("prompt", *items)
        encoded = await asyncio.to_thread(lambda: tokenizer(items)["input_ids"])
        if any(len(ids) == 0 for ids in encoded):
            raise APIError(400, "prompt must not be empty", param="prompt", code="empty_prompt")
        return [list(ids) for ids in encoded], items if body.echo else None
    vocab = len(tokenizer)
    if any(not 0 <= t < vocab for ids in items for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
    prompt_ids = [list(ids) for ids in items]
    if not body.echo:
        return prompt_ids, None
    return prompt_ids, await asyncio.to_thread(lambda: [tokenizer.decode(ids) for ids in items])


def render_chat(tokenizer: Any, body: ChatCompletionRequest,
                chat_template: str | None = None) -> list[int]:
    """The messages through the chat template (`chat_template`, --chat-template, or the
    tokenizer's; with tools, server/tools.py picks one that renders them), as token ids."""
    messages = []
    for i, message in enumerate(body.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str)
                   for part in content):
                raise APIError(400, "Only text content parts are supported",
                               param=f"messages[{i}].content")
            content = "\n".join(part["text"] for part in content)
        entry = history_message(message)
        entry["role"] = "system" if message.role == "developer" else message.role
        entry["content"] = content or ""
        messages.append(entry)
    model_template = getattr(tokenizer, "chat_template", None)
    if uses_tools(body):
        chat_template = tools_template(model_template, chat_template)
    if not (chat_template or model_template):
        raise APIError(400, "This model has no chat template; use /v1/completions",
                       param="messages")
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=chat_template, tokenize=False,
            continue_final_message=body.continue_final_message,
            add_generation_prompt=body.add_generation_prompt
            and not body.continue_final_message)
    except Exception as exc:  # the template rejected the conversation (roles, order, ...)
        raise APIError(400, f"The chat template rejected the messages: {exc}",
                       param="messages") from exc
    check_unicode("messages", text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise APIError(400, "The rendered conversation is empty", param="messages")
    return list(ids)
