"""Structured output on nodes (agent.grammar): JSON schemas as llama.cpp grammars, checked against what they
enforce, and answers generated under them by the real model (SmolLM2-135M)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema_rs
import pytest
from llama_cpp import Llama
from pydantic import BaseModel, Field

from agent import grammar
from agent.engine import CHAT, End, Engine, EngineError, Job, Text
from agent.grammar import PrefillRejected, UnsupportedSchema, check_prefix, response_grammar, schema_grammar
from agent.models import ModelConfig
from tests.agent.conftest import SMOLLM2 as MODEL
from tests.agent.conftest import started

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 16},
        "country": {"type": "string", "maxLength": 16},
        "population": {"type": "integer"},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "population", "capital"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "Describe Paris as JSON."}]


class Town(BaseModel):
    name: str = Field(max_length=16)
    kind: Literal["city", "village"]
    rivers: list[str] = Field(max_length=2)
    mayor: Town | None = None  # a recursive reference, through $defs


@pytest.fixture(scope="module")
def vocab() -> Iterator[Llama]:
    llama = Llama(model_path=str(MODEL), vocab_only=True, verbose=False)
    yield llama
    llama.close()


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    with started(ModelConfig(MODEL, name="smol", slots=1, context=1024, threads=2)) as engine:
        yield engine


def answer(engine: Engine, **body: Any) -> tuple[str, End]:
    async def run() -> tuple[str, End]:
        pieces, end = [], None
        async for event in engine.generate(Job(CHAT, {"model": "smol", "messages": QUESTION, **body})):
            if isinstance(event, Text):
                pieces.append(event.text)
            else:
                end = event
        assert isinstance(end, End)
        return "".join(pieces), end

    return asyncio.run(run())


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


def test_answer_under_a_schema_parses_and_validates(engine: Engine) -> None:
    text, end = answer(engine, response_format=json_schema(CITY), max_tokens=80, temperature=1.0, seed=7)
    assert end.finish_reason == "stop"
    jsonschema_rs.validate(json.loads(text), CITY)


def test_answer_under_a_pydantic_schema_with_refs_validates(engine: Engine) -> None:
    schema = Town.model_json_schema()
    text, end = answer(engine, response_format=json_schema(schema), max_tokens=120, temperature=0)
    assert end.finish_reason == "stop"
    Town.model_validate_json(text)


def test_json_object_answer_is_an_object(engine: Engine) -> None:
    text, end = answer(engine, response_format={"type": "json_object"}, max_tokens=60, temperature=0)
    assert end.finish_reason == "stop"
    assert isinstance(json.loads(text), dict)


def test_prefilled_answer_continues_under_the_grammar(engine: Engine) -> None:
    messages = [*QUESTION, {"role": "assistant", "content": '{"city": "Par'}]
    text, _ = answer(engine, messages=messages, response_format=json_schema(CITY), max_tokens=80, temperature=0)
    jsonschema_rs.validate(json.loads('{"city": "Par' + text), CITY)


def test_prefill_the_grammar_refuses_is_an_invalid_request(engine: Engine) -> None:
    messages = [*QUESTION, {"role": "assistant", "content": "Paris is"}]
    with pytest.raises(EngineError) as caught:
        answer(engine, messages=messages, response_format=json_schema(CITY), max_tokens=8)
    assert caught.value.code == "invalid_request"
    assert "does not fit the response_format" in caught.value.message


def test_unsupported_schema_is_an_invalid_request_naming_the_feature(engine: Engine) -> None:
    schema = {"type": "object", "patternProperties": {"^x": {"type": "string"}}}
    with pytest.raises(EngineError) as caught:
        answer(engine, response_format=json_schema(schema), max_tokens=8)
    assert caught.value.code == "invalid_request"
    assert "'patternProperties' at #" in caught.value.message


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "string", "pattern": "^a+$"}, "'pattern' at #"),
        ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0}}}, "'minimum' at #/properties/n"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems' at #"),
        ({"not": {"type": "string"}}, "'not' at #"),
        ({"type": "string", "format": "email"}, 'format "email" at #'),
        ({"$ref": "https://example.com/schema.json"}, "'$ref' other than '#/...'"),
        ({"type": "object", "required": ["a"]}, "required 'a' not listed in 'properties'"),
        ({"type": "string", "maxLength": grammar.MAX_REPEAT + 1}, f"'maxLength' above {grammar.MAX_REPEAT}"),
        ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}, "'oneOf' whose alternatives may overlap"),
        ({"allOf": [{"type": "object"}, {"required": []}]}, "'allOf' with other than one schema"),
        ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "'if' at #"),
    ],
)
def test_features_the_grammar_cannot_enforce_are_refused_by_name(schema: dict[str, Any], named: str) -> None:
    with pytest.raises(UnsupportedSchema) as caught:
        schema_grammar(schema)
    assert named in str(caught.value)


def test_every_refused_feature_is_listed_at_once() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "number", "multipleOf": 2}}, "minProperties": 1}
    with pytest.raises(UnsupportedSchema) as caught:
        schema_grammar(schema)
    assert caught.value.features == ["'minProperties' at #", "'multipleOf' at #/properties/a"]


def test_discriminated_one_of_and_type_lists_are_accepted(vocab: Llama) -> None:
    cat = {"type": "object", "properties": {"kind": {"const": "cat"}}, "required": ["kind"]}
    dog = {"type": "object", "properties": {"kind": {"const": "dog"}}, "required": ["kind"]}
    gbnf = schema_grammar({"oneOf": [cat, dog]})
    check_prefix(vocab, gbnf, '{"kind": "dog"}')
    # maxLength applies to the string alternative only, as JSON Schema reads a type list.
    nullable = schema_grammar({"type": ["string", "null"], "maxLength": 2})
    check_prefix(vocab, nullable, "null")
    with pytest.raises(PrefillRejected):
        check_prefix(vocab, nullable, '"abc')


def test_strings_hold_no_raw_control_character(vocab: Llama) -> None:
    gbnf = schema_grammar({"type": "string"})
    check_prefix(vocab, gbnf, '"a\\nb')  # an escaped newline is JSON
    with pytest.raises(PrefillRejected):
        check_prefix(vocab, gbnf, '"a\nb')  # a raw one is not


def test_enum_values_are_written_as_json(vocab: Llama) -> None:
    values = ["back\\slash", 'quo"te', "line\nbreak"]
    gbnf = schema_grammar({"enum": values})
    for value in values:
        check_prefix(vocab, gbnf, json.dumps(value))
    with pytest.raises(PrefillRejected):
        check_prefix(vocab, gbnf, '"back\\s')  # the JSON escape of a backslash is two of them


def test_grammars_are_cached_by_schema() -> None:
    schema = {"type": "object", "properties": {"cached": {"type": "boolean"}}, "required": ["cached"]}
    schema_grammar(schema)
    before = grammar.cache_info().hits
    assert schema_grammar(dict(schema)) == schema_grammar(schema)
    assert grammar.cache_info().hits == before + 2
    assert grammar.cache_info().maxsize == grammar.CACHE_SIZE


def test_response_format_text_needs_no_grammar_and_others_are_refused() -> None:
    assert response_grammar({"response_format": {"type": "text"}}) is None
    assert response_grammar({}) is None
    with pytest.raises(ValueError, match="json_schema"):
        response_grammar({"response_format": {"type": "xml"}})
    with pytest.raises(ValueError, match="'name'"):
        response_grammar({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}})
