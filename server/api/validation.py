"""Request-body checks, before anything is sent anywhere.

    content type  application/json (any parameters), or none at all    else 415
    JSON          UTF-8, an object, nested at most MAX_JSON_DEPTH deep   else 400
    schema        OpenAI's published request schema for the endpoint    else 400 naming the param (server.api.schema)
    plane rules   only what the plane itself relies on                  else 400 naming the param

A body the schema accepts goes to the upstream as it came: values and cross-field rules the schema does not
state (a legacy completion with `max_tokens: 0, echo: true`, the prompt-scoring request of evaluation
harnesses) are the upstream's to judge, and its 4xx reaches the client. The plane's own rules: `model` is a
non-empty string (it routes on it), `tool_choice` needs `tools`, and embeddings are not streamed (checked
where streaming is decided, server.api.openai_api). Every failure is an `InvalidRequestError` naming the parameter.

Also here, for the admin API: the fields a body may hold, names (orgs) and bounded numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from server.api.schema import RequestSchema, clip, kind_of
from server.errors import InvalidRequestError, UnsupportedMediaTypeError

Validator = Callable[[dict[str, Any]], None]

# Deep enough for any request the API describes (a tool's JSON Schema nests a few levels per property), and far
# below what the plane's own recursive steps take: orjson's encoder stops at 254 levels, Python at ~1000.
MAX_JSON_DEPTH = 64


def check_content_type(header: str | None) -> None:
    """415 unless the body is declared as JSON. No Content-Type at all is accepted: the body must still parse
    as JSON, and every OpenAI SDK sends the header anyway; what a form post or text/plain says is refused."""
    if not header or not header.strip():
        return
    media_type = header.partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = header if len(header) <= 80 and header.isprintable() else "(unreadable)"
        raise UnsupportedMediaTypeError(
            f"Unsupported content type {shown!r}: this endpoint only accepts 'application/json' bodies."
        )


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise InvalidRequestError("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson stops at 1024 levels; say which limit was passed, ours, as for any body nested too deep.
        field = _too_deep_field(raw) if "depth" in str(exc) or "recursion" in str(exc) else None
        if field is not None:
            raise _too_deep(field) from exc
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError(f"request body must be a JSON object, not {kind_of(body)}")
    # Fewer brackets than the limit cannot nest deeper than it, so most bodies skip the walk. Counting costs
    # about what walking does on a large body, so a large one is walked straight away.
    if len(raw) > 4096 or raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        _check_depth(body)
    return body


def _check_depth(body: dict[str, Any]) -> None:
    """Level by level, without recursion: the point is to refuse what would exhaust recursion elsewhere."""
    for field, value in body.items():
        if _depth_exceeds(value, MAX_JSON_DEPTH - 1):
            raise _too_deep(field)


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests more than `limit` containers deep (itself counted)."""
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        # Exact types: orjson makes only dict and list, and this is the cost of every body with many brackets.
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) in _CONTAINERS
        ]
    return False


_CONTAINERS = (dict, list)


def _too_deep(field: str) -> InvalidRequestError:
    param = clip(field, 64) or None
    where = f"'{param}'" if param else "request body"
    return InvalidRequestError(
        f"{where} nests JSON deeper than {MAX_JSON_DEPTH} levels, the most this API accepts", param=param
    )


_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}:]')


def _too_deep_field(raw: bytes) -> str | None:
    """The top-level field of a body that nests deeper than the limit, read from the raw text (a body orjson
    refused for its depth never became objects). "" when the body is too deep outside any field."""
    depth, key, last = 0, "", b""
    for match in _JSON_TOKEN.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return key
        elif token in (b"]", b"}"):
            depth -= 1
        elif token == b":" and depth == 1:
            key = _json_string(last)
        last = token
    return None


def _json_string(token: bytes) -> str:
    try:
        value = orjson.loads(token)
    except orjson.JSONDecodeError:
        return ""
    return value if isinstance(value, str) else ""


# -- the OpenAI endpoints ------------------------------------------------------------------------------

_CHAT = RequestSchema.load("chat/completions")
_COMPLETIONS = RequestSchema.load("completions")
_EMBEDDINGS = RequestSchema.load("embeddings")


def _model_named(body: dict[str, Any]) -> None:
    # The schema takes any string; the plane routes on it, so an empty one is refused here.
    if not body["model"].strip():
        raise InvalidRequestError("'model' must be a non-empty string", param="model")


def _tool_choice_needs_tools(body: dict[str, Any]) -> None:
    if body.get("tool_choice") is not None and not body.get("tools"):
        raise InvalidRequestError("'tool_choice' is only allowed when 'tools' are specified", param="tool_choice")


def validate_chat(body: dict[str, Any]) -> None:
    _CHAT.check(body)
    _model_named(body)
    _tool_choice_needs_tools(body)


def validate_completion(body: dict[str, Any]) -> None:
    _COMPLETIONS.check(body)
    _model_named(body)


def validate_embedding(body: dict[str, Any]) -> None:
    _EMBEDDINGS.check(body)
    _model_named(body)


# -- the admin API -------------------------------------------------------------------------------------

NAME_MAX_CHARS = 64
_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{NAME_MAX_CHARS}}}")


def check_name(value: str, param: str = "name", what: str = "name") -> str:
    """A name that is safe to show, log and put in a URL: 1-64 of A-Z a-z 0-9 . _ -"""
    if not _NAME.fullmatch(value):
        raise InvalidRequestError(
            f"{what} must be 1-{NAME_MAX_CHARS} characters of A-Z, a-z, 0-9, '.', '_' and '-'", param=param
        )
    return value


def bounded_int(body: dict[str, Any], param: str, low: int, high: int, default: int) -> int:
    value = body.get(param, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"'{param}' must be an integer", param=param)
    if not low <= value <= high:
        raise InvalidRequestError(f"'{param}' must be between {low} and {high}", param=param)
    return value


def only_fields(body: Mapping[str, Any], fields: tuple[str, ...]) -> None:
    """Refuses `body` unless it holds nothing but `fields`: a misspelt setting (`ttl` for `ttl_s`) is an error,
    never taken as if the setting had been left out."""
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidRequestError(
            f"unknown fields: {', '.join(unknown)} (known: {', '.join(fields)})", param=unknown[0]
        )


def bounded_number(body: dict[str, Any], param: str, low: float, high: float) -> float | None:
    """An optional number within [low, high]; None when absent."""
    value = body.get(param)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"'{param}' must be a number", param=param)
    if not low <= value <= high:
        raise InvalidRequestError(f"'{param}' must be between {low:g} and {high:g}", param=param)
    return value
