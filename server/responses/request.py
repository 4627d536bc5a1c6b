"""A /v1/responses request: checked, and turned into the chat completions request that serves it.

    schema      OpenAI's published `CreateResponse` (server.api.schema)                        else 400 naming the param
    stateless   no previous_response_id, store: true, conversation, background, prompt or item_reference
                (the plane stores no responses: server.responses)                          else 400 naming the param
    served      what a chat completion can carry: function tools, text/json_object/json_schema formats, input
                messages (text, images by URL, files by data or id), function calls and their outputs
                                                                                           else 400 naming the param

Every request is held to all three, whichever target serves it: a request that a responses-capable provider
could take but a node could not is refused up front, so failover never changes the verdict.

Input items are read by the plane's own rules (`to_chat`: what each item needs to be served), not the schema's:
OpenAI's published schema wants `id`, `status`, `annotations` and `logprobs` on an assistant message given back as
input, which clients send without (Codex CLI, hand-written conversations), and its API accepts without.

The chat form (`to_chat`), field by field:

    instructions                        a first system message
    input (string)                      one user message
    message items                       messages of their role; a content list of text parts becomes a string
    function_call items                 `tool_calls` of the assistant message they follow (or a new one)
    function_call_output items          `tool` messages
    reasoning items                     dropped: a chat target has no way to take them back
    tools, tool_choice                  chat tools and tool_choice; `allowed_tools` narrows the tools list
    text.format                         response_format (json_schema, json_object; text is the default)
    text.verbosity                      verbosity
    max_output_tokens                   max_tokens (which every chat server takes)
    temperature, top_p, user, parallel_tool_calls, service_tier, prompt_cache_key, safety_identifier: as they are
    reasoning.effort                    reasoning_effort
    include message.output_text.logprobs, top_logprobs: logprobs, top_logprobs
    metadata, truncation, include (the rest), stream_options, max_tool_calls, prompt_cache_*: not sent (they
                                        describe a stored response, hosted tools or OpenAI's own context handling)
"""

from __future__ import annotations

from typing import Any

from server.api.schema import RequestSchema, kind_of
from server.errors import InvalidRequestError

_SCHEMA = RequestSchema.load("responses")

# Parameters that need the response stored (or a stored object), with what a client can do instead.
_STATEFUL = {
    "previous_response_id": "send the whole conversation in 'input' instead",
    "conversation": "send the whole conversation in 'input' instead",
    "prompt": "send the prompt's text as 'instructions' and 'input' instead",
}
# Chat parameters a Responses parameter of the same name maps onto unchanged.
_SAME = ("temperature", "top_p", "user", "service_tier", "prompt_cache_key", "safety_identifier")
_ROLES = ("user", "assistant", "system", "developer")
LOGPROBS_INCLUDE = "message.output_text.logprobs"


def validate_responses(body: dict[str, Any]) -> None:
    """400 unless the schema accepts `body` (its input items aside) and it asks nothing stateful. The items are
    checked by `to_chat`, which the request's dialect runs next."""
    items = body.get("input")
    _SCHEMA.check({**body, "input": ""} if isinstance(items, list) else body)
    # OpenAI's schema leaves `model` optional (a stored prompt may name it); the plane routes on it.
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("'model' must be a non-empty string", param="model")
    _check_stateless(body)


def _check_stateless(body: dict[str, Any]) -> None:
    for name, instead in _STATEFUL.items():
        if body.get(name) is not None:
            raise InvalidRequestError(f"'{name}' is not supported: Hatchway stores no responses; {instead}", param=name)
    if body.get("store") is True:
        raise InvalidRequestError(
            "'store: true' is not supported: Hatchway stores no responses; send 'store: false' or leave it out",
            param="store",
        )
    if body.get("background") is True:
        raise InvalidRequestError(
            "'background: true' is not supported: Hatchway stores no responses to poll", param="background"
        )


# -- the chat completions form -------------------------------------------------------------------------------


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat completions request that serves `body` on a target without the Responses API (module doc)."""
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    tools, tool_choice = _tools(body)
    if tools:
        chat["tools"] = tools
        if tool_choice is not None:
            chat["tool_choice"] = tool_choice
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    text = body.get("text")
    if isinstance(text, dict):
        response_format = _response_format(text.get("format"))
        if response_format is not None:
            chat["response_format"] = response_format
        if text.get("verbosity") is not None:
            chat["verbosity"] = text["verbosity"]
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    for name in _SAME:
        if body.get(name) is not None:
            chat[name] = body[name]
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if wants_logprobs(body):
        chat["logprobs"] = True
        if body.get("top_logprobs"):
            chat["top_logprobs"] = body["top_logprobs"]
    if body.get("stream"):
        chat["stream"] = True
    return chat


def wants_logprobs(body: dict[str, Any]) -> bool:
    include = body.get("include")
    return isinstance(include, list) and LOGPROBS_INCLUDE in include


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.get("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
        return messages
    if raw is None:
        if not messages:
            raise InvalidRequestError("'input' is required (the plane stores no earlier responses)", param="input")
        return messages
    if not isinstance(raw, list):
        raise InvalidRequestError(f"'input' must be a string or an array, got {kind_of(raw)}", param="input")
    # The assistant message that function calls join: the one just before them, in the same model turn.
    turn: dict[str, Any] | None = None
    for index, item in enumerate(raw):
        where = f"input[{index}]"
        if not isinstance(item, dict):
            raise InvalidRequestError(f"'{where}' must be an object, got {kind_of(item)}", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            message = _message(item, where)
            messages.append(message)
            turn = message if message["role"] == "assistant" else None
        elif kind == "function_call":
            call = _function_call(item, where)
            if turn is None:
                turn = {"role": "assistant", "content": None, "tool_calls": []}
                messages.append(turn)
            turn.setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append(_function_output(item, where))
            turn = None
        elif kind == "reasoning":
            continue  # the model's own notes: a chat target has no way to take them back
        elif kind == "item_reference":
            raise InvalidRequestError(
                f"'{where}': item references are not supported: Hatchway stores no responses; send the item itself",
                param=f"{where}.type",
            )
        else:
            shown = f"'{kind}'" if isinstance(kind, str) else "untyped"
            raise InvalidRequestError(
                f"'{where}': {shown} items are not supported: Hatchway serves messages, function calls and their "
                "outputs",
                param=f"{where}.type",
            )
    if not messages:
        raise InvalidRequestError("'input' must hold at least one message", param="input")
    return messages


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _ROLES:
        raise InvalidRequestError(
            f"'{where}.role' must be one of {', '.join(map(repr, _ROLES))}, got {_shown(role)}", param=f"{where}.role"
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise InvalidRequestError(
            f"'{where}.content' must be a string or an array, got {kind_of(content)}", param=f"{where}.content"
        )
    parts = [_part(part, f"{where}.content[{i}]") for i, part in enumerate(content)]
    if all(part["type"] == "text" for part in parts):
        # One string: what every chat server and template takes, for every role.
        return {"role": role, "content": "".join(part["text"] for part in parts)}
    if role != "user":
        raise InvalidRequestError(
            f"'{where}.content': only user messages may carry images or files", param=f"{where}.content"
        )
    return {"role": role, "content": parts}


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
        return {"type": "text", "text": part["text"]}
    if kind == "refusal" and isinstance(part.get("refusal"), str):
        return {"type": "text", "text": part["refusal"]}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        image: dict[str, Any] = {"url": part["image_url"]}
        if part.get("detail") is not None:
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    if kind == "input_file" and (part.get("file_data") is not None or part.get("file_id") is not None):
        file = {name: part[name] for name in ("file_data", "file_id", "filename") if part.get(name) is not None}
        return {"type": "file", "file": file}
    if kind == "input_image":
        problem = "an image by file id is not supported: send its image_url (a URL or a data URL)"
    elif kind == "input_file":
        problem = "a file by URL is not supported: send its file_data"
    elif isinstance(kind, str):
        problem = f"'{kind}' content is not supported: use input_text, input_image or input_file"
    else:
        problem = "each content part must be an object with a 'type'"
    raise InvalidRequestError(f"'{where}': {problem}", param=where)


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments")
    if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
        raise InvalidRequestError(
            f"'{where}': a function_call needs string 'call_id', 'name' and 'arguments'", param=where
        )
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise InvalidRequestError(f"'{where}.call_id' must be a string", param=f"{where}.call_id")
    if isinstance(output, list):
        parts = [_part(part, f"{where}.output[{i}]") for i, part in enumerate(output)]
        if not all(part["type"] == "text" for part in parts):
            raise InvalidRequestError(
                f"'{where}.output': only text is supported in a function call's output", param=f"{where}.output"
            )
        output = "".join(part["text"] for part in parts)
    if not isinstance(output, str):
        raise InvalidRequestError(
            f"'{where}.output' must be a string or an array of text parts", param=f"{where}.output"
        )
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]], Any]:
    """The chat tools and tool_choice; None for a tool_choice that is not sent."""
    raw = body.get("tools") or []
    if not isinstance(raw, list):
        raise InvalidRequestError(f"'tools' must be an array, got {kind_of(raw)}", param="tools")
    tools: list[dict[str, Any]] = []
    for index, tool in enumerate(raw):
        where = f"tools[{index}]"
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            shown = f"'{kind}'" if isinstance(kind, str) else "untyped"
            raise InvalidRequestError(
                f"'{where}': {shown} tools are not supported: Hatchway serves function tools only",
                param=f"{where}.type",
            )
        tools.append(_function_tool(tool, where))
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return tools, None
    if choice in ("none", "required"):
        if choice == "required" and not tools:
            raise InvalidRequestError("'tool_choice' is 'required' but no tools are given", param="tool_choice")
        return tools, choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        name = choice["name"]
        if not any(t["function"]["name"] == name for t in tools):
            raise InvalidRequestError(
                f"'tool_choice' names '{name}', which is not among the tools", param="tool_choice"
            )
        return tools, {"type": "function", "function": {"name": name}}
    if kind == "allowed_tools" and isinstance(choice.get("tools"), list):
        allowed = {t.get("name") for t in choice["tools"] if isinstance(t, dict) and t.get("type") == "function"}
        if len(allowed) != len(choice["tools"]):
            raise InvalidRequestError("'tool_choice.tools' may list function tools only", param="tool_choice.tools")
        narrowed = [t for t in tools if t["function"]["name"] in allowed]
        mode = choice.get("mode", "auto")
        if mode == "required" and not narrowed:
            raise InvalidRequestError("'tool_choice' allows none of the tools given", param="tool_choice.tools")
        return narrowed, mode if narrowed else None
    shown = f"'{kind}'" if isinstance(kind, str) else _shown(choice)
    raise InvalidRequestError(
        f"'tool_choice' {shown} is not supported: use none, auto, required, a function or allowed_tools",
        param="tool_choice",
    )


def _function_tool(tool: dict[str, Any], where: str) -> dict[str, Any]:
    name = tool.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"'{where}.name' must be a non-empty string", param=f"{where}.name")
    function: dict[str, Any] = {"name": name}
    for field in ("description", "parameters", "strict"):
        if tool.get(field) is not None:
            function[field] = tool[field]
    return {"type": "function", "function": function}


def _response_format(fmt: Any) -> dict[str, Any] | None:
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema = {name: fmt[name] for name in ("name", "schema", "description", "strict") if fmt.get(name) is not None}
        return {"type": "json_schema", "json_schema": schema}
    raise InvalidRequestError(
        f"'text.format.type' must be 'text', 'json_object' or 'json_schema', got {_shown(kind)}",
        param="text.format.type",
    )


def _shown(value: Any) -> str:
    return repr(value[:40]) if isinstance(value, str) else kind_of(value)


def relay_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body a provider that speaks the Responses API is sent: the client's, storing nothing upstream."""
    return {**body, "store": False}
