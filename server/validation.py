"""Request-body checks for the OpenAI endpoints, before anything is sent anywhere.

Only what the plane must rely on, or what a client would rather hear about from us than from an upstream's
opaque 400, is checked; unknown fields pass through untouched so new OpenAI parameters keep working.
Every failure is an `InvalidRequestError` naming the offending parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from server.errors import InvalidRequestError

Validator = Callable[[dict[str, Any]], None]


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, not {_kind(body)}")
    return body


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _fail(param: str, expected: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' must be {expected}, got {_kind(value)}", param=param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require_model(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is None:
        raise InvalidRequestError("'model' is required", param="model")
    if not isinstance(model, str) or not model.strip():
        raise _fail("model", "a non-empty string", model)


def _optional_number(body: dict[str, Any], param: str, low: float, high: float) -> None:
    value = body.get(param)
    if value is None:
        return
    if not _is_number(value):
        raise _fail(param, "a number", value)
    if not low <= value <= high:
        raise InvalidRequestError(f"'{param}' must be between {low:g} and {high:g}, got {value}", param=param)


def _optional_int(body: dict[str, Any], param: str, low: int, high: int | None = None) -> None:
    value = body.get(param)
    if value is None:
        return
    if not _is_int(value):
        raise _fail(param, "an integer", value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise InvalidRequestError(f"'{param}' must be {bound}, got {value}", param=param)


def _optional_bool(body: dict[str, Any], param: str) -> None:
    value = body.get(param)
    if value is not None and not isinstance(value, bool):
        raise _fail(param, "a boolean", value)


def _stop(body: dict[str, Any]) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _fail("stop", "a string or an array of strings", stop)
    if len(stop) > 4:
        raise InvalidRequestError("'stop' takes at most 4 sequences", param="stop")


def _stream_options(body: dict[str, Any]) -> None:
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise _fail("stream_options", "an object", options)
    if not body.get("stream"):
        raise InvalidRequestError("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    if "include_usage" in options and not isinstance(options["include_usage"], bool):
        raise _fail("stream_options.include_usage", "a boolean", options["include_usage"])


def _sampling(body: dict[str, Any]) -> None:
    _optional_number(body, "temperature", 0, 2)
    _optional_number(body, "top_p", 0, 1)
    _optional_number(body, "presence_penalty", -2, 2)
    _optional_number(body, "frequency_penalty", -2, 2)
    _optional_int(body, "n", 1, 128)
    _optional_int(body, "max_tokens", 1)
    _optional_int(body, "max_completion_tokens", 1)
    _optional_int(body, "seed", -(2**63), 2**63 - 1)
    _optional_bool(body, "stream")
    _stop(body)
    _stream_options(body)


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequestError("'messages' is required", param="messages")
    if not isinstance(messages, list):
        raise _fail("messages", "an array", messages)
    if not messages:
        raise InvalidRequestError("'messages' must not be empty", param="messages")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(param, "an object", message)
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidRequestError(
                f"'{param}.role' must be one of {', '.join(sorted(_ROLES))}, got {role!r}",
                param=f"{param}.role",
            )
        content = message.get("content")
        if content is None:
            # Assistant turns that only call tools carry no content; every other turn must say something.
            if role != "assistant" or not message.get("tool_calls"):
                raise InvalidRequestError(f"'{param}.content' is required", param=f"{param}.content")
        elif not isinstance(content, str | list):
            raise _fail(f"{param}.content", "a string or an array of content parts", content)
        elif isinstance(content, list) and not all(isinstance(p, dict) and "type" in p for p in content):
            raise InvalidRequestError(
                f"'{param}.content' parts must be objects with a 'type'", param=f"{param}.content"
            )


def _tools(body: dict[str, Any]) -> None:
    tools = body.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _fail("tools", "an array", tools)
    for i, tool in enumerate(tools):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _fail(param, "an object", tool)
        if tool.get("type") != "function":
            raise InvalidRequestError(f"'{param}.type' must be 'function'", param=f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise InvalidRequestError(f"'{param}.function.name' is required", param=f"{param}.function.name")
    choice = body.get("tool_choice")
    if choice is not None and not isinstance(choice, str | dict):
        raise _fail("tool_choice", "a string or an object", choice)


def validate_chat(body: dict[str, Any]) -> None:
    _require_model(body)
    _messages(body)
    _sampling(body)
    _optional_int(body, "max_completion_tokens", 1)
    _tools(body)


def validate_completion(body: dict[str, Any]) -> None:
    _require_model(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequestError("'prompt' is required", param="prompt")
    if not isinstance(prompt, str | list):
        raise _fail("prompt", "a string or an array", prompt)
    _sampling(body)
    _optional_int(body, "logprobs", 0, 5)
    _optional_bool(body, "echo")


def validate_embedding(body: dict[str, Any]) -> None:
    _require_model(body)
    data = body.get("input")
    if data is None:
        raise InvalidRequestError("'input' is required", param="input")
    if isinstance(data, str):
        if not data:
            raise InvalidRequestError("'input' must not be empty", param="input")
    elif isinstance(data, list):
        if not data:
            raise InvalidRequestError("'input' must not be empty", param="input")
        if not (
            all(isinstance(x, str) for x in data)
            or all(_is_int(x) for x in data)
            or all(isinstance(x, list) and all(_is_int(t) for t in x) for x in data)
        ):
            raise _fail("input", "a string, an array of strings, or token arrays", data)
    else:
        raise _fail("input", "a string or an array", data)
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise InvalidRequestError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    _optional_int(body, "dimensions", 1)
    if body.get("stream"):
        raise InvalidRequestError("embeddings cannot be streamed", param="stream")
