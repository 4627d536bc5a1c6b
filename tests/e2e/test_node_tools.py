"""Tool calls on a node, through a real plane and a real agent (SmolLM2-135M, whose template renders no tools: the
agent's fallback format), with the official openai SDK and PydanticAI: calls in OpenAI's shape, whole and streamed
as OpenAI streams them, arguments that always parse and validate against the function's parameters.

The model is tiny: these check what is enforced (the calls' shape), not whether calling was wise.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Literal

import jsonschema_rs
import openai
from pydantic import BaseModel, Field
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from proto.hatchway.node.v1 import node_pb2 as pb
from server.routing.continuation import StreamProgress, can_rescue
from server.targets.node import tool_call_delta
from tests.server.usage.test_bounds import clamped
from tests.support.agent_process import DEMO_MODEL
from tests.support.served_nodes import Nodes

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER: Any = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMETERS},
}
TIME: Any = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
QUESTION: Any = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_required_call_whole_and_streamed_alike_in_openai_shape(served: Nodes, client: openai.OpenAI) -> None:
    ask: dict[str, Any] = {
        "model": DEMO_MODEL,
        "messages": QUESTION,
        "tools": [WEATHER],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 60,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**ask)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    jsonschema_rs.validate(json.loads(call.function.arguments), PARAMETERS)

    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    fragments = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    first, rest = fragments[0], fragments[1:]
    assert first.index == 0 and first.id and first.type == "function" and first.function
    assert first.function.name == "get_weather"
    assert rest and all(f.index == 0 and f.id is None and f.function and f.function.name is None for f in rest)
    arguments = "".join((f.function.arguments or "") if f.function else "" for f in fragments)
    assert arguments == call.function.arguments  # temperature 0: the same call, streamed
    assert chunks[0].choices[0].delta.content is None
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert clamped(served.plane, "node") == 0  # the calls' bytes bound the node's usage claim


def test_named_choice_calls_that_function(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=QUESTION,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=40,
        temperature=0,
    )
    [call] = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {}


def test_legacy_functions_answer_with_a_function_call(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=QUESTION,
        functions=[WEATHER["function"]],
        function_call={"name": "get_weather"},
        max_tokens=60,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.function_call is not None
    jsonschema_rs.validate(json.loads(choice.message.function_call.arguments), PARAMETERS)


def test_tool_result_fed_back_gets_an_answer(client: openai.OpenAI) -> None:
    arguments = json.dumps({"city": "Paris", "unit": "celsius"})
    messages: Any = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 25 degrees"},
    ]
    completion = client.chat.completions.create(
        model=DEMO_MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0
    )
    assert completion.choices[0].message.content
    assert completion.choices[0].message.tool_calls is None


def test_none_choice_answers_in_plain_text(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=DEMO_MODEL,
        messages=QUESTION,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks)
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


class Weather(BaseModel):
    city: str = Field(max_length=12)
    sky: Literal["sunny", "cloudy", "rainy"]


def test_pydantic_ai_agent_gets_its_output_through_a_tool_call(served: Nodes) -> None:

    async def run() -> object:
        # PydanticAI's default output mode: a `final_result` tool the model must call (tool_choice required).
        async with openai.AsyncOpenAI(base_url=served.plane.v1, api_key=served.key, max_retries=0) as client:
            model = OpenAIChatModel(DEMO_MODEL, provider=OpenAIProvider(openai_client=client))
            agent = Agent(model, output_type=Weather, model_settings={"max_tokens": 60, "temperature": 0})
            result = await agent.run("What is the weather in Paris?")
            return result.output

    assert isinstance(asyncio.run(run()), Weather)


def test_a_stream_that_sent_call_fragments_is_not_rescued_but_one_of_text_is() -> None:
    # server.routing.continuation continues text exactly (prefill); a call's fragments cannot be continued that way.
    first = pb.ToolCallDelta(index=0, id="call_x", name="get_time", arguments="")
    calling, texting = StreamProgress(chat=True), StreamProgress(chat=True)
    assert calling.observe({"choices": [{"index": 0, "delta": tool_call_delta(first, legacy=False)}]})
    assert texting.observe({"choices": [{"index": 0, "delta": {"content": "Let me"}}]})
    body = {"model": DEMO_MODEL, "messages": QUESTION, "tools": [TIME]}
    assert not can_rescue(body, calling)
    assert can_rescue(body, texting)
