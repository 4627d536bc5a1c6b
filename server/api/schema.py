"""OpenAI's published request schemas, compiled once, and their verdicts turned into errors a client can act on.

The schemas are vendored in `server/openapi/openai-requests.json` (source repository and commit inside it;
`server/openapi/vendor.py` cuts them from OpenAI's OpenAPI document). A body passes exactly when the schema
accepts it: values and cross-field rules the schema does not state are the upstream's to judge.

Accepting costs one call into the compiled validator (jsonschema-rs, about a microsecond or two for a typical
chat body). Only a refused body pays for the explanation: the validator's errors are walked to the one that
names what the client got wrong, e.g. `messages[0].role` rather than "messages[0] matches none of six forms".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson

from server.errors import InvalidRequestError

SCHEMA_FILE = Path(__file__).parents[1] / "openapi" / "openai-requests.json"
# The request component each endpoint's body must satisfy.
COMPONENTS = {
    "chat/completions": "CreateChatCompletionRequest",
    "completions": "CreateCompletionRequest",
    "embeddings": "CreateEmbeddingRequest",
    "responses": "CreateResponse",
}
# Properties whose single-value enum tells which branch of a oneOf/anyOf a client meant (OpenAI's discriminators).
_DISCRIMINATORS = ("role", "type")
# Error messages quote at most this much of a client's value.
_QUOTE_CHARS = 40


class RequestSchema:
    """One endpoint's request schema: `check(body)` returns when the body is valid and raises an
    `InvalidRequestError` naming the parameter otherwise."""

    def __init__(self, validator: jsonschema_rs.Validator) -> None:
        self._validator = validator

    def check(self, body: dict[str, Any]) -> None:
        if self._validator.is_valid(body):
            return
        error = next(iter(self._validator.iter_errors(body)), None)
        if error is not None:
            raise explain(error)

    @classmethod
    def load(cls, endpoint: str) -> RequestSchema:
        return _schemas()[endpoint]


@functools.cache
def source() -> dict[str, Any]:
    """Where the vendored schemas come from (repository, commit, path)."""
    return _document()["x-source"]  # type: ignore[no-any-return]


@functools.cache
def _document() -> dict[str, Any]:
    return orjson.loads(SCHEMA_FILE.read_bytes())  # type: ignore[no-any-return]


@functools.cache
def _schemas() -> dict[str, RequestSchema]:
    components = _document()["components"]
    return {
        endpoint: RequestSchema(
            jsonschema_rs.Draft202012Validator({"$ref": f"#/components/schemas/{name}", "components": components})
        )
        for endpoint, name in COMPONENTS.items()
    }


# -- explaining a refusal ------------------------------------------------------------------------------


def explain(error: jsonschema_rs.ValidationError) -> InvalidRequestError:
    """The error a client sees: the most specific thing the schema refused, with its parameter."""
    return _describe(_specific(error))


Branches = list[list[jsonschema_rs.ValidationError]]
_UNION_KINDS = (jsonschema_rs.ValidationErrorKind.AnyOf, jsonschema_rs.ValidationErrorKind.OneOfNotValid)


def _branches(error: jsonschema_rs.ValidationError) -> Branches | None:
    """Each branch's errors, when the error is that no branch of an anyOf/oneOf fits."""
    kind = error.kind
    return kind.context if isinstance(kind, _UNION_KINDS) else None


def _specific(error: jsonschema_rs.ValidationError) -> jsonschema_rs.ValidationError:
    """Descend through anyOf/oneOf to the branch the client evidently meant, as far as that is clear."""
    while (branches := _branches(error)) is not None:
        plausible = [branch for branch in branches if not _mismatched(branch, error.instance_path)]
        if len(plausible) != 1 or not plausible[0]:
            return error
        error = plausible[0][0]
    return error


def _mismatched(branch: Sequence[jsonschema_rs.ValidationError], path: Sequence[str | int]) -> bool:
    """Whether a branch was plainly not what the client meant: the value is of another type, or its
    discriminator (`role`, `type`) names another branch."""
    return any(_wrong_type(e, path) or _wrong_discriminator(e, path) for e in branch)


def _wrong_type(error: jsonschema_rs.ValidationError, path: Sequence[str | int]) -> bool:
    if list(error.instance_path) != list(path):
        return False
    if error.kind.name == "type":
        return True
    branches = _branches(error)
    return branches is not None and all(_mismatched(b, path) for b in branches)


def _wrong_discriminator(error: jsonschema_rs.ValidationError, path: Sequence[str | int]) -> bool:
    error_path = list(error.instance_path)
    return (
        error.kind.name in ("enum", "const")
        and len(error_path) == len(path) + 1
        and error_path[:-1] == list(path)
        and error_path[-1] in _DISCRIMINATORS
    )


def _describe(error: jsonschema_rs.ValidationError) -> InvalidRequestError:
    path = list(error.instance_path)
    kind, facts = error.kind.name, error.kind.as_dict()
    param = param_name(path)
    value = error.instance
    if kind == "required":
        param = param_name([*path, facts["property"]])
        return InvalidRequestError(f"'{param}' is required", param=param)
    if kind == "additionalProperties":
        names = [str(n) for n in facts["unexpected"]]
        shown = ", ".join(_quote(n) for n in names[:5]) + (", ..." if len(names) > 5 else "")
        return InvalidRequestError(
            f"Unrecognized request argument supplied: {shown}", param=param_name([*path, names[0]])
        )
    if kind == "type":
        return InvalidRequestError(f"'{param}' must be {_types(facts['types'])}, got {kind_of(value)}", param=param)
    if kind in ("enum", "const"):
        options = facts.get("options") or [facts.get("expected_value")]
        return InvalidRequestError(f"'{param}' must be {_one_of(options)}, got {_quote(value)}", param=param)
    branches = _branches(error)
    if branches is not None:
        return _no_branch(error, branches, param)
    bounds = {
        "minimum": "at least {}",
        "maximum": "at most {}",
        "exclusiveMinimum": "greater than {}",
        "exclusiveMaximum": "less than {}",
        "minItems": "an array of at least {} items",
        "maxItems": "an array of at most {} items",
        "minLength": "at least {} characters long",
        "maxLength": "at most {} characters long",
    }
    if kind in bounds:
        got = f"{len(value)}" if isinstance(value, list | str) else _quote(value)
        return InvalidRequestError(f"'{param}' must be {bounds[kind].format(facts['limit'])}, got {got}", param=param)
    return InvalidRequestError(f"'{param}' is invalid: {clip(error.message, 200)}", param=param)


def _no_branch(error: jsonschema_rs.ValidationError, branches: Branches, param: str) -> InvalidRequestError:
    """No branch of an anyOf/oneOf fits and none is evidently the one meant: say what the accepted forms want."""
    path = list(error.instance_path)
    # Every branch refused the discriminator: name it and the values it takes.
    tags: list[Any] = []
    for branch in branches:
        tags += [o for e in branch if _wrong_discriminator(e, path) for o in (e.kind.as_dict().get("options") or [])]
    if tags and all(any(_wrong_discriminator(e, path) for e in b) or _is_null_branch(b, path) for b in branches):
        name = str(next(e.instance_path[-1] for b in branches for e in b if _wrong_discriminator(e, path)))
        tag_param = param_name([*path, name])
        got = error.instance.get(name) if isinstance(error.instance, dict) else None
        return InvalidRequestError(f"'{tag_param}' must be {_one_of(tags)}, got {_quote(got)}", param=tag_param)
    # Every branch wants another type: list the types.
    if all(_wrong_type_branch(b, path) for b in branches):
        types = _branch_types(branches, path)
        return InvalidRequestError(f"'{param}' must be {_types(types)}, got {kind_of(error.instance)}", param=param)
    # Several forms of the right type, none satisfied: name the first problem of each.
    reasons: dict[str, InvalidRequestError] = {}
    for branch in branches:
        if branch and not _wrong_type_branch(branch, path):
            reason = _describe(_specific(branch[0]))
            reasons.setdefault(reason.message, reason)
    if len(reasons) == 1:
        return next(iter(reasons.values()))
    return InvalidRequestError(
        f"'{param}' matches none of its accepted forms: {clip('; or '.join(reasons), 400)}", param=param
    )


def _is_null_branch(branch: Sequence[jsonschema_rs.ValidationError], path: Sequence[str | int]) -> bool:
    return all(
        e.kind.name == "type" and e.kind.as_dict()["types"] == ["null"] and list(e.instance_path) == list(path)
        for e in branch
    )


def _wrong_type_branch(branch: Sequence[jsonschema_rs.ValidationError], path: Sequence[str | int]) -> bool:
    return any(_wrong_type(e, path) for e in branch)


def _branch_types(branches: Branches, path: Sequence[str | int]) -> list[str]:
    types: list[str] = []
    for branch in branches:
        for e in branch:
            if list(e.instance_path) != list(path):
                continue
            nested = _branches(e)
            if e.kind.name == "type":
                types += e.kind.as_dict()["types"]
            elif nested is not None:
                types += _branch_types(nested, path)
    return list(dict.fromkeys(types))


# -- wording -------------------------------------------------------------------------------------------


def param_name(path: Sequence[str | int]) -> str:
    """`["messages", 0, "role"]` -> `messages[0].role`, the form OpenAI's own errors use."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = clip(str(part), 64)
            out += f".{name}" if out else name
    return out


_ARTICLES = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "null": "null",
}


def _types(types: Sequence[str]) -> str:
    ordered = sorted(dict.fromkeys(types), key=lambda t: t == "null")  # "an integer or null", not the reverse
    return " or ".join(_ARTICLES.get(t, t) for t in ordered)


def kind_of(value: Any) -> str:
    """How an error message names a JSON value's type: "an integer", "an object", "null"."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(type(value), "a value")


def _one_of(options: Sequence[Any]) -> str:
    unique = list(dict.fromkeys(_quote(o) for o in options))
    shown = ", ".join(unique[:12]) + (", ..." if len(unique) > 12 else "")
    return f"one of {shown}" if len(unique) > 1 else shown


def _quote(value: Any) -> str:
    """A client's value, short enough to echo: strings quoted, containers described rather than dumped."""
    if isinstance(value, str):
        return repr(clip(value, _QUOTE_CHARS))
    if isinstance(value, dict | list):
        return kind_of(value)
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return clip(repr(value), _QUOTE_CHARS)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters of a client's text, for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
