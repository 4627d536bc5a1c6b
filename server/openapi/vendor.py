"""Write `openai-requests.json`: the request schemas of the OpenAI endpoints the plane serves, cut from OpenAI's
published OpenAPI document (github.com/openai/openai-openapi, `openapi.json`).

    python -m server.openapi.vendor PATH/TO/openai-openapi/openapi.json COMMIT

What is kept: the four request components (chat completions, completions, embeddings, responses) and every
component they reference, with only the keywords that validate (type, properties, required, items, enum, bounds,
lengths, additionalProperties, allOf/anyOf/oneOf, $ref). What is dropped: descriptions, examples, defaults,
titles, `format` (an annotation in JSON Schema 2020-12), OpenAPI's `discriminator` and `x-*` extensions: none of
them changes what is valid.

One translation: OpenAI's document says `openapi: 3.1.0` yet marks optional fields with OpenAPI 3.0's
`nullable: true`, which JSON Schema ignores. The publisher's intent (and what the openai SDKs send: `null` for
a parameter set to None) is that null is allowed there, so `nullable: true` becomes `"null"` among the types
(or an `anyOf` with `{"type": "null"}` where the schema names no type).

And a second: `oneOf` becomes `anyOf`. OpenAI's document writes `oneOf` for "one of these forms" where the forms
overlap: a Responses input message `{"type": "message", "role": "user", "content": [...]}` is both an
`EasyInputMessage` and an `InputMessage`, which `oneOf` refuses for matching twice, while OpenAI's API (and every
SDK) sends and accepts it. Where the forms do not overlap (the chat schemas' roles and types), the two agree.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

REQUESTS = ("CreateChatCompletionRequest", "CreateCompletionRequest", "CreateEmbeddingRequest", "CreateResponse")
OUT = Path(__file__).with_name("openai-requests.json")
REPOSITORY = "openai/openai-openapi"
_REF_PREFIX = "#/components/schemas/"

# Keywords whose value is one schema, a list of schemas, or a map of name -> schema.
_ONE = frozenset({"items", "additionalProperties", "not", "propertyNames", "contains"})
_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_MAP = frozenset({"properties", "patternProperties"})
_ASSERTIONS = frozenset(
    {
        "$ref",
        "type",
        "enum",
        "const",
        "required",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minLength",
        "maxLength",
        "pattern",
        "minProperties",
        "maxProperties",
    }
)


def trim(schema: Any) -> Any:
    """Only the keywords that decide validity, with `nullable` and `oneOf` translated."""
    if not isinstance(schema, dict):
        return schema  # `true` / `false` schemas
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _ONE:
            out[key] = trim(value)
        elif key == "oneOf":
            # No schema of OpenAI's has both; were one to, keeping both would need an allOf.
            assert "anyOf" not in schema, "a schema with both oneOf and anyOf"
            out["anyOf"] = [trim(v) for v in value]
        elif key in _LIST:
            out[key] = [trim(v) for v in value]
        elif key in _MAP:
            out[key] = {name: trim(v) for name, v in value.items()}
        elif key in _ASSERTIONS:
            out[key] = value
    if schema.get("nullable") is True:
        out = _nullable(out)
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str) and "enum" not in schema and "const" not in schema:
        return {**schema, "type": [kind, "null"]}
    if isinstance(kind, list) and "enum" not in schema and "const" not in schema:
        return {**schema, "type": [*kind, "null"] if "null" not in kind else kind}
    return {"anyOf": [schema, {"type": "null"}]}


def references(schema: Any) -> set[str]:
    found: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(_REF_PREFIX):
                found.add(ref.removeprefix(_REF_PREFIX))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def vendor(spec: dict[str, Any], commit: str) -> dict[str, Any]:
    components = spec["components"]["schemas"]
    kept: dict[str, Any] = {}
    pending = list(REQUESTS)
    while pending:
        name = pending.pop()
        if name in kept:
            continue
        kept[name] = trim(components[name])
        pending.extend(references(kept[name]) - kept.keys())
    return {
        "x-source": {
            "repository": REPOSITORY,
            "commit": commit,
            "path": "openapi.json",
            "openapi": spec.get("openapi"),
            "info_version": spec.get("info", {}).get("version"),
            "trimmed_by": "server/openapi/vendor.py (validation keywords only; nullable -> null type; oneOf -> anyOf)",
        },
        "components": {"schemas": dict(sorted(kept.items()))},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    spec = orjson.loads(Path(argv[0]).read_bytes())
    OUT.write_bytes(orjson.dumps(vendor(spec, argv[1]), option=orjson.OPT_INDENT_2) + b"\n")
    print(f"wrote {OUT} ({len(spec['components']['schemas'])} components in, {OUT.stat().st_size} bytes out)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
