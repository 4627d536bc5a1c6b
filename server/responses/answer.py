"""A whole chat completion as a Response object, and the parts a Response and its event stream share: the
response's frame (what it echoes of its request), its output items, its status and its usage.

    chat choice                          Response
    message.reasoning_content/reasoning  a `reasoning` item (reasoning_text content)
    message.content, message.refusal     a `message` item: output_text (with logprobs when asked) and refusal parts
    message.tool_calls, function_call    `function_call` items: call_id, name, arguments
    finish_reason length                 status incomplete, incomplete_details.reason max_output_tokens
    finish_reason content_filter         status incomplete, incomplete_details.reason content_filter
    anything else                        status completed
    usage                                input_tokens, output_tokens, total_tokens (+ cached and reasoning details)

Usage figures are carried over as the target claimed them, whatever they are: the relay holds the claim to the
plane's bounds (server.usage.metering) and rewrites what the client sees when it had to clamp it.
"""

from __future__ import annotations

import time
from typing import Any

from server.ids import id_sequence

_ids = id_sequence()


def mapping(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one: what a peer sent is read without trusting its shape."""
    return value if isinstance(value, dict) else {}


def string(value: Any) -> str:
    """`value` when it is a string, else an empty one."""
    return value if isinstance(value, str) else ""


def new_id(prefix: str) -> str:
    """`resp_...`, `msg_...`, `fc_...`, `rs_...`: unique, in OpenAI's style."""
    return f"{prefix}_{_ids()}"


def shell(body: dict[str, Any], response_id: str, model: Any, created_at: Any = None) -> dict[str, Any]:
    """A Response with no output yet (status in_progress), echoing what the request set as OpenAI's does."""
    text = mapping(body.get("text"))
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at if isinstance(created_at, int) else int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model if isinstance(model, str) and model else body.get("model"),
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": None,
        "reasoning": body.get("reasoning"),
        "store": False,
        "temperature": body.get("temperature", 1.0),
        "text": {**text, "format": text.get("format") or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation") or "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def status_of(finish_reason: Any) -> tuple[str, dict[str, str] | None]:
    """(status, incomplete_details) for a chat finish_reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish_reason == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def usage(chat: Any) -> dict[str, Any] | None:
    """A chat `usage` as a Response's."""
    if not isinstance(chat, dict):
        return None
    prompt, completion = chat.get("prompt_tokens"), chat.get("completion_tokens")
    details_in = mapping(chat.get("prompt_tokens_details"))
    details_out = mapping(chat.get("completion_tokens_details"))
    total = prompt + completion if isinstance(prompt, int) and isinstance(completion, int) else chat.get("total_tokens")
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": details_in.get("cached_tokens") or 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": details_out.get("reasoning_tokens") or 0},
        "total_tokens": total,
    }


# -- output items ------------------------------------------------------------------------------------------


def message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def refusal_part(refusal: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": refusal}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if text else []
    return {"id": item_id, "type": "reasoning", "status": status, "summary": [], "content": content}


def logprobs(chat_logprobs: Any) -> list[dict[str, Any]]:
    """A chat choice's `logprobs.content` (or a chunk's) as output_text logprobs: the same fields, bytes always a
    list."""
    content = chat_logprobs.get("content") if isinstance(chat_logprobs, dict) else None
    if not isinstance(content, list):
        return []
    return [_logprob(entry, top=True) for entry in content if isinstance(entry, dict)]


def _logprob(entry: dict[str, Any], *, top: bool) -> dict[str, Any]:
    out = {"token": entry.get("token", ""), "bytes": entry.get("bytes") or [], "logprob": entry.get("logprob", 0.0)}
    if top:
        alternatives = entry.get("top_logprobs")
        listed = alternatives if isinstance(alternatives, list) else []
        out["top_logprobs"] = [_logprob(alt, top=False) for alt in listed if isinstance(alt, dict)]
    return out


def reasoning_text(message: dict[str, Any]) -> str:
    """The reasoning a chat server sends beside the answer (vLLM's and DeepSeek's `reasoning_content`, or
    `reasoning`)."""
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


# -- a whole answer ------------------------------------------------------------------------------------


def from_chat(doc: dict[str, Any], body: dict[str, Any], response_id: str) -> dict[str, Any]:
    """The Response for a whole chat completion answering `body`'s chat form."""
    choices = doc.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = mapping(choice.get("message"))
    status, incomplete = status_of(choice.get("finish_reason"))
    item_status = "incomplete" if status == "incomplete" else "completed"
    output: list[dict[str, Any]] = []
    reasoning = reasoning_text(message)
    if reasoning:
        output.append(reasoning_item(new_id("rs"), reasoning, item_status))
    calls = [c for c in message.get("tool_calls") or () if isinstance(c, dict)]
    legacy = message.get("function_call")
    if isinstance(legacy, dict):
        calls.append({"id": None, "function": legacy})
    content, refusal = message.get("content"), message.get("refusal")
    parts: list[dict[str, Any]] = []
    if isinstance(content, str) and (content or not calls):
        parts.append(text_part(content, logprobs(choice.get("logprobs"))))
    if isinstance(refusal, str) and refusal:
        parts.append(refusal_part(refusal))
    if parts:
        output.append(message_item(new_id("msg"), parts, item_status))
    for call in calls:
        function = mapping(call.get("function"))
        call_id = string(call.get("id")) or new_id("call")
        name, arguments = string(function.get("name")), string(function.get("arguments"))
        output.append(function_call_item(new_id("fc"), call_id, name, arguments, item_status))
    response = shell(body, response_id, doc.get("model"), doc.get("created"))
    response.update(status=status, incomplete_details=incomplete, output=output, usage=usage(doc.get("usage")))
    return response
