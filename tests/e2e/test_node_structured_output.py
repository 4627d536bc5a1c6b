"""Structured output on a node, through a real plane and a real agent (SmolLM2-135M), with the official openai SDK
and PydanticAI: json_schema and json_object answers always parse and validate, streamed or not; what a grammar
cannot enforce is a 400 naming it.

The model is tiny: these check what is enforced (the answer's shape), not what it says.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import jsonschema_rs
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from pydantic import BaseModel, Field
from pydantic_ai import Agent, NativeOutput
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.profiles.openai import OpenAIModelProfile
from pydantic_ai.providers.openai import OpenAIProvider

from tests.server.usage.test_bounds import clamped
from tests.support.agent_process import DEMO_MODEL
from tests.support.served_nodes import Nodes

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "country": {"type": "string", "maxLength": 12},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "capital"],
    "additionalProperties": False,
}
QUESTION = [{"role": "user", "content": "Describe Paris as JSON."}]
CITY_FORMAT: Any = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}


class City(BaseModel):
    name: str = Field(max_length=12)
    kind: Literal["city", "village"]


def test_json_schema_answer_validates_whole_and_streamed(served: Nodes, client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, response_format=CITY_FORMAT, max_tokens=60, temperature=1.0, seed=1
    )
    assert whole.choices[0].finish_reason == "stop"
    jsonschema_rs.validate(json.loads(whole.choices[0].message.content or ""), CITY)
    stream = client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, response_format=CITY_FORMAT, max_tokens=60, temperature=1.0, stream=True
    )
    chunks = [chunk for chunk in stream if isinstance(chunk, ChatCompletionChunk) and chunk.choices]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    jsonschema_rs.validate(json.loads(text), CITY)
    assert clamped(served.plane, "node") == 0  # the node's usage stayed within the plane's bounds


def test_parse_with_a_pydantic_model_returns_the_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model=DEMO_MODEL, messages=QUESTION, response_format=City, max_tokens=40, temperature=0
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, City)


def test_json_object_answer_is_an_object(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=DEMO_MODEL, messages=QUESTION, response_format={"type": "json_object"}, max_tokens=40, temperature=0
    )
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


def test_a_schema_the_grammar_cannot_enforce_is_a_400_naming_the_feature(served: Nodes, client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}, "patternProperties": {}}
    response_format: Any = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=DEMO_MODEL, messages=QUESTION, response_format=response_format, max_tokens=8
        )
    message = str(caught.value)
    assert "'patternProperties' at #" in message and "'minimum' at #/properties/n" in message
    assert served.registry.busy_slots() == 0


def test_pydantic_ai_agent_returns_a_validated_object_in_native_output_mode(served: Nodes) -> None:

    async def run() -> object:
        # Native mode: PydanticAI asks for the output with response_format json_schema (its default, tool output,
        # goes through a tool call instead: tests/e2e/test_node_tools.py covers those).
        profile = OpenAIModelProfile(supports_json_schema_output=True, supports_json_object_output=True)
        async with openai.AsyncOpenAI(base_url=served.plane.v1, api_key=served.key, max_retries=0) as client:
            model = OpenAIChatModel(DEMO_MODEL, provider=OpenAIProvider(openai_client=client), profile=profile)
            agent = Agent(model, output_type=NativeOutput(City), model_settings={"max_tokens": 40, "temperature": 0})
            result = await agent.run("Describe Paris.")
            return result.output

    assert isinstance(asyncio.run(run()), City)
