"""Structured output on nodes: llama.cpp grammars (GBNF) from JSON schemas, and the request's `response_format`.

    response_grammar(body)        the GBNF a chat request's response_format asks for, or None (text)
    schema_grammar(schema)        the GBNF of one JSON schema, cached by the schema's JSON (bounded LRU)
    Grammar                       builds one GBNF from several schemas plus rules of its own (agent.tools)
    GrammarChain                  a sampler chain held to a grammar, the grammar applied only when needed
    check_prefix, PrimedGrammar   a grammar that continues a prefilled answer: checked, then fed to the sampler

Schemas are converted by llama-cpp-python's `SchemaConverter` (llama.cpp's json-schema-to-grammar), with three fixes:
a string may hold no raw control character (the stock rule allows a newline, which is not JSON), literals escape
backslashes (an enum value or property name with one came out wrong), and repetition bounds are capped (a
`maxLength` of a million would nest a million rules, and llama.cpp's parser recurses on them).

The converter silently drops what it cannot express, and an answer built from a grammar that dropped a constraint
need not validate. So every schema is checked first against what the converter enforces; anything else is refused
with `UnsupportedSchema`, naming each feature and where it is (a 400 to the client):

    supported   type (one or a list), properties, required, additionalProperties (false, true or a schema), items,
                prefixItems, minItems, maxItems, minLength, maxLength, enum, const, anyOf, oneOf (alternatives of
                distinct types, or objects told apart by a const property), allOf with one schema, $ref within the
                document ($defs, definitions), format date / time / date-time / uuid; annotations (title,
                description, default, examples, ...) are ignored
    refused     pattern, patternProperties, propertyNames, minimum, maximum, exclusiveMinimum, exclusiveMaximum,
                multipleOf, uniqueItems, contains, min/maxProperties, dependentRequired, dependentSchemas,
                dependencies, not, if/then/else, unevaluated*, additionalItems, $ref to another document, other
                formats (email, uri, ...), and required names that properties does not list

A grammar never ends an answer early: a generation cut by `max_tokens` (finish_reason "length") is cut JSON, as
OpenAI's is.
"""

from __future__ import annotations

import ctypes
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, cast

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import Llama
from llama_cpp.llama_grammar import BuiltinRule, LlamaGrammar, SchemaConverter

# Distinct schemas whose grammar is kept; a client sends the same few schemas again and again.
CACHE_SIZE = 256
# The largest repetition bound a schema may set (maxLength, maxItems, ...): the converter nests one rule per unit.
MAX_REPEAT = 1000
# A schema nests at most this deep (the converter recurses on it, and so does the check).
MAX_DEPTH = 64

# The stock `char` rule lets a string hold raw control characters (a newline), which JSON forbids.
_CHAR = BuiltinRule(
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', []
)
_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
# The keywords that apply to values of one type only.
_TYPE_KEYWORDS: dict[str, set[str]] = {
    "string": {"minLength", "maxLength", "format", "pattern"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains", "additionalItems"},
    "object": {"properties", "required", "additionalProperties", "patternProperties", "propertyNames"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}
_TYPE_KEYWORDS["integer"] = _TYPE_KEYWORDS["number"]
# Keywords that constrain a value and that the converter does not enforce.
_REFUSED = (
    "pattern",
    "patternProperties",
    "propertyNames",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "uniqueItems",
    "contains",
    "minContains",
    "maxContains",
    "minProperties",
    "maxProperties",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "not",
    "if",
    "then",
    "else",
    "unevaluatedProperties",
    "unevaluatedItems",
    "additionalItems",
    "$dynamicRef",
    "$recursiveRef",
)
# Keywords that say nothing about validity: allowed anywhere, beside $ref and anyOf too.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "$anchor",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
        "contentEncoding",
        "contentMediaType",
        "discriminator",
        "nullable",
    }
)


class UnsupportedSchema(ValueError):
    """A schema with features no grammar here enforces; `features` names each, with where it is."""

    def __init__(self, features: Sequence[str]) -> None:
        self.features = list(features)
        super().__init__("the schema uses what nodes cannot enforce: " + "; ".join(self.features))


class ResponseFormatError(ValueError):
    """A response_format that is malformed or unsupported."""


class PrefillRejected(ValueError):
    """A prefilled answer that the answer's grammar does not allow."""


def response_grammar(body: Mapping[str, Any]) -> str | None:
    """The GBNF the body's response_format asks for: None for text, any JSON object for json_object, the schema's
    grammar for json_schema. Raises ResponseFormatError (or UnsupportedSchema, a ValueError too)."""
    response_format = body.get("response_format")
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ResponseFormatError("'response_format' must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar({"type": "object"})
    if kind != "json_schema":
        raise ResponseFormatError(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ResponseFormatError("'response_format.json_schema' must be an object with a 'name'")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ResponseFormatError("'response_format.json_schema.schema' must be an object")
    return schema_grammar(schema)


def schema_grammar(schema: Mapping[str, Any]) -> str:
    """The GBNF whose every sentence is JSON that validates against `schema`; raises UnsupportedSchema."""
    # Keyed by the schema as sent: property order is kept, since it is the order the answer is written in.
    return _cached_grammar(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))


@functools.lru_cache(maxsize=CACHE_SIZE)
def _cached_grammar(key: str) -> str:
    grammar = Grammar()
    grammar.rule("root", grammar.schema(json.loads(key), "json"))
    return grammar.gbnf()


def cache_info() -> Any:
    """The schema cache's hits, misses and size (functools' CacheInfo)."""
    return _cached_grammar.cache_info()


class Grammar:
    """One GBNF, built from JSON schemas (`schema`) and rules of its own (`rule`).

    grammar = Grammar()
    args = grammar.schema({"type": "object", ...}, "weather")   # a rule name; raises UnsupportedSchema
    grammar.rule("root", f'"<call>" {args} "</call>"')
    grammar.gbnf()
    """

    def __init__(self) -> None:
        # llama-cpp-python's converter is untyped.
        self._converter: Any = cast(Any, _Converter)(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self._schemas = 0

    def schema(self, schema: Mapping[str, Any], name: str) -> str:
        """Add the rules of a JSON schema; returns the name of the rule for the whole value."""
        checked = normalize(schema)
        self._schemas += 1
        converter = self._converter
        try:
            # Each schema's own `#/...` references resolve within it: prefix them with a document name of its own.
            resolved = converter.resolve_refs(checked, f"doc{self._schemas}")
            return cast(str, converter.visit(resolved, name))
        except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
            # What the check let through and the converter still refuses.
            raise UnsupportedSchema([f"a schema the grammar converter refuses: {exc}"]) from exc

    def rule(self, name: str, body: str) -> None:
        self._converter._rules[name] = body

    @staticmethod
    def literal(text: str) -> str:
        """`text` as a GBNF string literal."""
        return _literal(text)

    def gbnf(self) -> str:
        return cast(str, self._converter.format_grammar())


class _Converter(SchemaConverter):
    def _format_literal(self, literal: str) -> str:
        return _literal(literal)

    def _add_primitive(self, name: str, rule: BuiltinRule) -> str:
        return cast(str, super()._add_primitive(name, _CHAR if name == "char" else rule))


def _literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


# --- what the converter enforces ------------------------------------------------------------------------------


def normalize(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `schema` in the forms the converter reads correctly; raises UnsupportedSchema listing every
    feature it would drop."""
    problems: list[str] = []
    root = dict(schema)
    result = _Normalizer(root, problems).visit(root, "#", 0)
    if problems:
        raise UnsupportedSchema(problems)
    return cast(dict[str, Any], result)


class _Normalizer:
    def __init__(self, root: dict[str, Any], problems: list[str]) -> None:
        self.root = root
        self.problems = problems

    def visit(self, node: Any, path: str, depth: int) -> Any:
        if depth > MAX_DEPTH:
            self.problems.append(f"nesting deeper than {MAX_DEPTH} at {path}")
            return {}
        if node is True:
            return {}
        if node is False or not isinstance(node, dict):
            self.problems.append(f"a schema that is not an object ({json.dumps(node)[:40]}) at {path}")
            return {}
        out = dict(node)
        for keyword in _REFUSED:
            if keyword in out:
                self.problems.append(f"'{keyword}' at {path}")
        for container in ("$defs", "definitions"):
            if isinstance(out.get(container), dict):
                out[container] = {
                    key: self.visit(value, f"{path}/{container}/{key}", depth + 1)
                    for key, value in out[container].items()
                }
        if "$ref" in out:
            reference = self._ref(out, path)
            kept = {k: out[k] for k in ("$defs", "definitions") if k in out}
            # The definitions stay where the references point; the converter reads no definitions beside a
            # $ref (pydantic's recursive models put them there), but does beside an anyOf of one.
            return {**kept, "anyOf": [reference]} if kept else reference
        types = out.get("type")
        if isinstance(types, list):
            return self._type_list(out, types, path, depth)
        if types is not None and types not in _TYPES:
            self.problems.append(f"type {json.dumps(types)[:40]} at {path}")
        if "allOf" in out:
            out = self._all_of(out, path)
        for keyword in ("anyOf", "oneOf"):
            if keyword in out:
                return self._union(out, keyword, path, depth)
        if "enum" in out and not (isinstance(out["enum"], list) and out["enum"]):
            self.problems.append(f"'enum' that is not a non-empty list at {path}")
        self._strings(out, path)
        self._bounds(out, path)
        if isinstance(out.get("properties"), dict):
            out["properties"] = {
                key: self.visit(value, f"{path}/properties/{key}", depth + 1)
                for key, value in out["properties"].items()
            }
        elif "properties" in out:
            self.problems.append(f"'properties' that is not an object at {path}")
        self._required(out, path)
        extra = out.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = self.visit(extra, f"{path}/additionalProperties", depth + 1)
        elif extra is not None and not isinstance(extra, bool):
            self.problems.append(f"'additionalProperties' that is not a schema at {path}")
        self._items(out, path, depth)
        return out

    def _ref(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        ref = node["$ref"]
        others = sorted(set(node) - _ANNOTATIONS - {"$ref"})
        if others:
            self.problems.append(f"{', '.join(repr(k) for k in others)} beside '$ref' at {path}")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            self.problems.append(f"'$ref' other than '#/...' within the schema ({str(ref)[:60]}) at {path}")
        elif self._resolve(ref) is None:
            self.problems.append(f"'$ref' {ref[:60]} that does not resolve at {path}")
        # The target itself is checked where it is defined ($defs), once, whatever refers to it.
        return {"$ref": ref}

    def _resolve(self, ref: str) -> Any:
        target: Any = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                return None
            target = target[part]
        return target

    def _type_list(self, node: dict[str, Any], types: list[Any], path: str, depth: int) -> Any:
        # The converter turns a type list into bare types and drops every other keyword: spell it as anyOf instead.
        if not types or any(t not in _TYPES for t in types) or len(set(map(str, types))) != len(types):
            self.problems.append(f"type {json.dumps(types)[:60]} at {path}")
            return {}
        if any(k in node for k in ("anyOf", "oneOf", "allOf")):
            self.problems.append(f"a list of types beside anyOf/oneOf/allOf at {path}")
            return {}
        alternatives = []
        for kind in types:
            # Keywords of the other types do not apply to this one (JSON Schema reads them per type).
            foreign = set().union(*(words for other, words in _TYPE_KEYWORDS.items() if other != kind))
            own = _TYPE_KEYWORDS.get(kind, set())
            alternatives.append({k: v for k, v in node.items() if k != "type" and (k in own or k not in foreign)})
            alternatives[-1]["type"] = kind
        kept = {k: v for k, v in node.items() if k in _ANNOTATIONS}
        return self.visit({**kept, "anyOf": alternatives}, path, depth)

    def _all_of(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        parts = node["allOf"]
        if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict):
            self.problems.append(f"'allOf' with other than one schema at {path}")
            return node
        rest = {k: v for k, v in node.items() if k != "allOf"}
        clash = sorted(set(rest) - _ANNOTATIONS)
        if clash:
            self.problems.append(f"'allOf' beside {', '.join(repr(k) for k in clash)} at {path}")
        return {**rest, **parts[0]}

    def _union(self, node: dict[str, Any], keyword: str, path: str, depth: int) -> dict[str, Any]:
        alternatives = node[keyword]
        others = sorted(set(node) - _ANNOTATIONS - {keyword})
        if others:
            self.problems.append(f"{', '.join(repr(k) for k in others)} beside '{keyword}' at {path}")
        if not isinstance(alternatives, list) or not alternatives:
            self.problems.append(f"'{keyword}' that is not a non-empty list at {path}")
            return node
        visited = [self.visit(alt, f"{path}/{keyword}/{i}", depth + 1) for i, alt in enumerate(alternatives)]
        if keyword == "oneOf" and not self._exclusive(visited):
            self.problems.append(f"'oneOf' whose alternatives may overlap (anyOf is enforced) at {path}")
        kept = {k: v for k, v in node.items() if k in _ANNOTATIONS}
        # The converter reads both the same way; exclusive alternatives make anyOf mean oneOf.
        return {**kept, "anyOf": visited}

    def _exclusive(self, alternatives: list[Any]) -> bool:
        """Whether no value can match two of the alternatives: each of its own type, or objects that a required
        property with a const (or one-value enum) tells apart."""
        resolved = [self._resolve(a["$ref"]) if "$ref" in a else a for a in alternatives]
        if not all(isinstance(a, dict) for a in resolved):
            return False
        types = [a.get("type") for a in resolved]
        if all(isinstance(t, str) for t in types) and len(set(types)) == len(types):
            # integer values are numbers too
            return not ("integer" in types and "number" in types)
        if not all(t == "object" for t in types):
            return False
        common: set[str] | None = None
        for alt in resolved:
            required = alt.get("required")
            names = set(required) if isinstance(required, list) else set()
            common = names if common is None else common & names
        for name in sorted(common or ()):
            values = [_single_value(alt.get("properties", {}).get(name)) for alt in resolved]
            if all(v is not None for v in values) and len({json.dumps(v[0]) for v in values if v}) == len(values):
                return True
        return False

    def _strings(self, node: dict[str, Any], path: str) -> None:
        fmt = node.get("format")
        if fmt is not None and (fmt not in _FORMATS and not re.fullmatch(r"uuid[1-5]?", str(fmt))):
            self.problems.append(f"format {json.dumps(fmt)[:40]} at {path}")
        lengths = [k for k in ("minLength", "maxLength") if k in node]
        if lengths and node.get("type") != "string":
            self.problems.append(f"{'/'.join(lengths)} without type string at {path}")
        if lengths and fmt is not None:
            self.problems.append(f"{'/'.join(lengths)} beside format at {path}")

    def _bounds(self, node: dict[str, Any], path: str) -> None:
        for keyword in ("minLength", "maxLength", "minItems", "maxItems"):
            value = node.get(keyword)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self.problems.append(f"'{keyword}' that is not a non-negative integer at {path}")
            elif value > MAX_REPEAT:
                self.problems.append(f"'{keyword}' above {MAX_REPEAT} at {path}")
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
            if isinstance(node.get(low), int) and isinstance(node.get(high), int) and node[low] > node[high]:
                self.problems.append(f"'{low}' above '{high}' at {path}")

    def _required(self, node: dict[str, Any], path: str) -> None:
        required = node.get("required")
        if required is None:
            return
        if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
            self.problems.append(f"'required' that is not a list of names at {path}")
            return
        properties = node.get("properties")
        listed: dict[str, Any] = properties if isinstance(properties, dict) else {}
        missing = [name for name in required if name not in listed]
        if missing:
            self.problems.append(f"required {', '.join(map(repr, missing))} not listed in 'properties' at {path}")

    def _items(self, node: dict[str, Any], path: str, depth: int) -> None:
        items, prefix = node.get("items"), node.get("prefixItems")
        if isinstance(prefix, list):
            if isinstance(items, dict) and items:
                self.problems.append(f"'items' beside 'prefixItems' at {path}")
            count = len(prefix)
            if node.get("minItems", 0) > count or node.get("maxItems", count) < count:
                self.problems.append(f"'minItems'/'maxItems' that 'prefixItems' does not meet at {path}")
            node["prefixItems"] = [self.visit(v, f"{path}/prefixItems/{i}", depth + 1) for i, v in enumerate(prefix)]
            node.pop("items", None)  # the converter writes exactly the prefix: no more items
            if not prefix:
                self.problems.append(f"an empty 'prefixItems' at {path}")
        elif prefix is not None:
            self.problems.append(f"'prefixItems' that is not a list at {path}")
        elif items is True or (items is None and ("minItems" in node or "maxItems" in node)):
            node["items"] = {}  # the converter reads the item bounds only beside items
        elif isinstance(items, dict):
            node["items"] = self.visit(items, f"{path}/items", depth + 1)
        elif items is not None:
            self.problems.append(f"'items' that is not a schema at {path}")


def _single_value(schema: Any) -> tuple[Any] | None:
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return (schema["const"],)
    enum = schema.get("enum")
    if isinstance(enum, list) and len(enum) == 1:
        return (enum[0],)
    return None


# --- running a grammar from the middle: a prefilled answer -----------------------------------------------------


def compiles(llama: Llama, gbnf: str) -> bool:
    """Whether llama.cpp parses the grammar: one it refuses would leave a null sampler in the chain."""
    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


class PrimedGrammar(LlamaGrammar):
    """A grammar to run from the middle of an answer: `prefix` (its tokens so far) is fed to it before the first
    token is sampled (`prime`)."""

    def __init__(self, gbnf: str, prefix: Sequence[int] = ()) -> None:
        super().__init__(_grammar=gbnf)
        self.prefix = tuple(prefix)


def check_prefix(llama: Llama, gbnf: str, text: str) -> tuple[int, ...]:
    """The tokens of `text`, a prefilled answer, once checked to be a start the grammar allows; raises
    PrefillRejected. Run before the job takes a slot: `prime` then feeds them without checking again."""
    tokens = tuple(llama.tokenize(text.encode("utf-8"), add_bos=False, special=False))
    sampler = llama_cpp.llama_sampler_init_grammar(llama._model.vocab, gbnf.encode("utf-8"), b"root")
    if not sampler:
        raise PrefillRejected("the grammar does not compile")
    try:
        _advance(llama, sampler, tokens)
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return tokens


class GrammarChain:
    """A sampler chain held to a grammar, sampled as llama.cpp's own common sampler does it: the chain picks a
    token from the logits as they are, and only when the grammar refuses that token is the grammar applied to the
    whole vocabulary and the token picked again. Applying a grammar means matching every token of the vocabulary
    against it (tens of milliseconds a token for 49k tokens inside a JSON string), and most picks are allowed.

    The result is the distribution the grammar-first chain samples from: a token the grammar allows is kept with
    its own probability, plus its renormalised share of the picks it refused. Parameters: the slot's `llama`, the
    `chain` (a LlamaSampler without the grammar, which this owns), and the `grammar` (a PrimedGrammar's prefix is
    fed to it first).
    """

    def __init__(self, llama: Llama, chain: Any, grammar: LlamaGrammar) -> None:
        self._chain = chain
        self._n_vocab = llama.n_vocab()
        self._grammar = llama_cpp.llama_sampler_init_grammar(
            llama._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not self._grammar:
            raise ValueError("llama.cpp refused the grammar")
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._data = np.zeros(self._n_vocab, dtype=_TOKEN_DATA)
        self._candidates = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(llama_cpp.llama_token_data_p), size=0, selected=-1, sorted=False
        )
        if isinstance(grammar, PrimedGrammar) and grammar.prefix:
            _advance(llama, self._grammar, grammar.prefix)

    def sample(self, ctx: Any, idx: int = -1) -> int:
        logits = np.ctypeslib.as_array(ctx.get_logits_ith(idx), shape=(self._n_vocab,))
        token = self._pick(logits, grammar_first=False)
        if not _allows(self._grammar, token):
            token = self._pick(logits, grammar_first=True)
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain.sampler, token)
        return token

    def _pick(self, logits: npt.NDArray[np.float32], *, grammar_first: bool) -> int:
        data = self._data
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        candidates = self._candidates
        candidates.size, candidates.selected, candidates.sorted = self._n_vocab, -1, False
        if grammar_first:
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(candidates))
        llama_cpp.llama_sampler_apply(self._chain.sampler, ctypes.byref(candidates))
        return int(data["id"][candidates.selected])

    def close(self) -> None:
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        self._chain.close()


# llama.cpp's llama_token_data: id, logit, p.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


def _allows(grammar: Any, token: int) -> bool:
    data: Any = (llama_cpp.llama_token_data * 1)()
    data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
    candidates = llama_cpp.llama_token_data_array(data=data, size=1, selected=-1, sorted=False)
    llama_cpp.llama_sampler_apply(grammar, ctypes.byref(candidates))
    return bool(data[0].logit != float("-inf"))


def _advance(llama: Llama, grammar: Any, tokens: Sequence[int]) -> None:
    """Accept each token into the grammar sampler, checking it first: llama.cpp aborts the process on a token
    the grammar refuses."""
    for position, token in enumerate(tokens):
        if not _allows(grammar, token):
            text = llama.detokenize(list(tokens[: position + 1])).decode("utf-8", "replace")
            raise PrefillRejected(f"the answer so far does not fit the grammar at {text[-40:]!r}")
        llama_cpp.llama_sampler_accept(grammar, token)
