"""/v1/responses through the plane, with the real clients: the official openai SDK (strict response validation) and
the OpenAI Agents SDK, against a chat-only provider (translated), a provider that speaks the Responses API
(relayed as is) and a real node (translated), streamed and not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
from click.testing import CliRunner
from openai.types.responses import FunctionToolParam, Response
from pydantic import BaseModel
from sqlmodel import Session, col, select

from server.cli import cli
from server.cli.client import AdminAPIError
from server.config import Config
from server.errors import UpstreamProtocolError
from server.policy.declarative import apply_declared
from server.responses import answer
from server.responses.request import to_chat
from server.responses.stream import Translator, replay
from server.storage.audit import AuditLog
from server.storage.models import UsageRecord
from tests.conftest import ADMIN_KEY, MODEL, RunningPlane, eventually
from tests.support.agent_process import DEMO_MODEL
from tests.support.mock_upstream import Fault, MockUpstream, split_reply
from tests.support.served_nodes import Nodes, enrolling, for_agents

REPLY = "Hello from mock"
WEATHER_TOOL: FunctionToolParam = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
ARGUMENTS = '{"city": "Paris"}'


@dataclass
class Served:
    """A plane with org `acme`, provider `mock-a` serving MODEL (chat-only, or speaking the Responses API), and a
    key."""

    plane: RunningPlane
    upstream: MockUpstream
    api_key: str
    relayed: bool
    clients: list[openai.OpenAI] = field(default_factory=list)

    def client(self, *, strict: bool = True) -> openai.OpenAI:
        client = openai.OpenAI(
            base_url=self.plane.v1, api_key=self.api_key, max_retries=0, _strict_response_validation=strict
        )
        self.clients.append(client)
        return client

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.plane.v1, api_key=self.api_key, max_retries=0, _strict_response_validation=True
        )

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.api_key}", **headers}
        return httpx.post(f"{self.plane.v1}/responses", json=body, headers=auth, timeout=30)

    @property
    def sent(self) -> dict[str, Any]:
        """What the upstream was last sent."""
        request = self.upstream.requests[-1]
        assert request.path == ("/v1/responses" if self.relayed else "/v1/chat/completions"), request.path
        assert request.json is not None
        return request.json

    def final_rows(self) -> list[UsageRecord]:
        engine = self.plane.server.plane.engine

        def rows() -> list[UsageRecord]:
            with Session(engine) as session:
                return list(session.exec(select(UsageRecord).where(col(UsageRecord.final))))

        eventually(lambda: bool(rows()))
        return rows()


@pytest.fixture(params=["translated", "relayed"])
def served(request: pytest.FixtureRequest, plane: RunningPlane, upstream: MockUpstream) -> Iterator[Served]:
    relayed = request.param == "relayed"
    plane.create_org("acme")
    plane.add_provider("mock-a", upstream, price_in=1.0, price_out=2.0, responses=relayed)
    setup = Served(plane, upstream, plane.create_key("acme"), relayed)
    yield setup
    setup.close()


def events_of(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """A Responses stream's (event line, data) pairs; asserts the framing: every data has its event line."""
    events = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        events.append((lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))))
    return events


# -- responses.create ---------------------------------------------------------------------------------------


def test_string_input_gets_a_response_with_the_answer_and_usage(served: Served) -> None:
    response = served.client().responses.create(model=MODEL, input="Say hello")
    assert response.object == "response" and response.id.startswith("resp")
    assert response.status == "completed"
    assert response.output_text == REPLY
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (2, 3, 5)
    if served.relayed:
        assert served.sent["input"] == "Say hello" and served.sent["store"] is False
        assert response.id.startswith("resp_mock_"), "a relayed answer is the provider's own"
    else:
        assert served.sent["messages"] == [{"role": "user", "content": "Say hello"}]


def test_items_and_instructions_become_a_system_message_and_the_conversation(served: Served) -> None:
    items: Any = [
        {"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]},
        # As Codex CLI sends an earlier answer back: no id, status, annotations or logprobs.
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi!"}]},
        {"type": "message", "role": "user", "content": "Say hello"},
    ]
    response = served.client().responses.create(
        model=MODEL, instructions="Be brief.", input=items, max_output_tokens=50, temperature=0.5
    )
    assert response.output_text == REPLY
    assert response.instructions == "Be brief."
    if served.relayed:
        assert served.sent["input"] == items and served.sent["instructions"] == "Be brief."
    else:
        assert served.sent["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Say hello"},
        ]
        assert (served.sent["max_tokens"], served.sent["temperature"]) == (50, 0.5)


def test_a_function_tool_round_trip_calls_the_tool_then_answers_with_its_output(served: Served) -> None:
    served.upstream.tool_arguments = {"get_weather": ARGUMENTS}
    client = served.client()
    first = client.responses.create(model=MODEL, input="Weather in Paris?", tools=[WEATHER_TOOL])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].arguments == ARGUMENTS
    assert calls[0].call_id
    if not served.relayed:
        tool = served.sent["tools"][0]
        assert tool == {"type": "function", "function": {k: v for k, v in WEATHER_TOOL.items() if k != "type"}}
    turn: Any = [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": ARGUMENTS},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "22C and sunny"},
    ]
    second = client.responses.create(model=MODEL, input=turn, tools=[WEATHER_TOOL])
    assert second.output_text == "The tool said: 22C and sunny"
    if not served.relayed:
        assert served.sent["messages"][1:] == [
            {"role": "assistant", "content": None, "tool_calls": [_chat_call(calls[0].call_id)]},
            {"role": "tool", "tool_call_id": calls[0].call_id, "content": "22C and sunny"},
        ]


def _chat_call(call_id: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}


class Answer(BaseModel):
    answer: int


def test_text_format_json_schema_parses_into_the_model(served: Served) -> None:
    served.upstream.reply = '{"answer": 42}'
    parsed = served.client().responses.parse(model=MODEL, input="The answer?", text_format=Answer)
    assert parsed.output_parsed == Answer(answer=42)
    if not served.relayed:
        response_format = served.sent["response_format"]
        assert response_format["type"] == "json_schema"
        assert response_format["json_schema"]["name"] == "Answer"
        assert response_format["json_schema"]["strict"] is True
        assert response_format["json_schema"]["schema"]["properties"] == {
            "answer": {"title": "Answer", "type": "integer"}
        }


def test_text_format_json_object_becomes_the_chat_response_format(served: Served) -> None:
    served.upstream.reply = '{"ok": true}'
    response = served.client().responses.create(
        model=MODEL, input="JSON please", text={"format": {"type": "json_object"}}
    )
    assert json.loads(response.output_text) == {"ok": True}
    if not served.relayed:
        assert served.sent["response_format"] == {"type": "json_object"}


async def test_async_client_gets_the_same_answer(served: Served) -> None:
    async with served.async_client() as client:
        response = await client.responses.create(model=MODEL, input="Say hello")
    assert response.output_text == REPLY


# -- responses.stream --------------------------------------------------------------------------------------


def test_stream_delivers_text_deltas_and_a_completed_response(served: Served) -> None:
    with served.client().responses.stream(model=MODEL, input="Say hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == REPLY and len(deltas) == len(split_reply(REPLY))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert final.output_text == REPLY and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == 3


def test_stream_of_a_tool_call_delivers_argument_deltas(served: Served) -> None:
    served.upstream.tool_arguments = {"get_weather": ARGUMENTS}
    with served.client().responses.stream(model=MODEL, input="Weather?", tools=[WEATHER_TOOL]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(deltas) == ARGUMENTS
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == ARGUMENTS
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather" and call.arguments == ARGUMENTS


def test_stream_has_openais_event_order_framing_and_numbering(served: Served) -> None:
    response = served.post({"model": MODEL, "input": "Say hello", "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = events_of(response)
    assert all(name == data["type"] for name, data in events)
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    pieces = len(split_reply(REPLY))
    assert [name for name, _ in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * pieces,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert "[DONE]" not in response.text


# -- accounting, limits, cache ----------------------------------------------------------------------------


def test_usage_rows_record_the_responses_endpoint_tokens_and_cost(served: Served) -> None:
    served.client().responses.create(model=MODEL, input="Say hello")
    (row,) = served.final_rows()
    assert (row.endpoint, row.status, row.target) == ("responses", 200, "mock-a")
    assert (row.prompt_tokens, row.completion_tokens) == (2, 3)
    assert row.cost_usd == pytest.approx((2 * 1.0 + 3 * 2.0) / 1e6)


def test_a_streamed_responses_request_is_recorded_as_one(served: Served) -> None:
    with served.client().responses.stream(model=MODEL, input="Say hello") as stream:
        stream.get_final_response()
    (row,) = served.final_rows()
    assert (row.endpoint, row.stream, row.completion_tokens) == ("responses", True, 3)


def test_rate_limits_apply_to_responses_as_to_chat(served: Served) -> None:
    served.plane.admin.put("/limits", {"org": "acme", "rpm": 1})
    client = served.client()
    client.responses.create(model=MODEL, input="Say hello")
    with pytest.raises(openai.RateLimitError) as refused:
        client.responses.create(model=MODEL, input="Say hello")
    assert refused.value.body["code"] == "rate_limit_exceeded"


def test_a_clamped_usage_claim_is_what_the_response_shows(served: Served) -> None:
    served.upstream.forged_usage = (
        {"input_tokens": 5, "output_tokens": 1_000_000, "total_tokens": 1_000_005}
        if served.relayed
        else {"prompt_tokens": 5, "completion_tokens": 1_000_000, "total_tokens": 1_000_005}
    )
    response = served.client(strict=False).responses.create(model=MODEL, input="Say hello")
    assert response.usage is not None
    assert response.usage.output_tokens < 100
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    (row,) = served.final_rows()
    assert row.completion_tokens == response.usage.output_tokens


def test_a_deterministic_response_is_cached_and_replayed_as_a_stream(served: Served) -> None:
    client = served.client()
    first = client.responses.with_raw_response.create(model=MODEL, input="Say hello", temperature=0)
    assert first.headers["x-hatchway-cache"] == "miss"
    second = client.responses.with_raw_response.create(model=MODEL, input="Say hello", temperature=0)
    assert second.headers["x-hatchway-cache"] == "hit"
    assert second.parse().output_text == REPLY and second.parse().id == first.parse().id
    with client.responses.stream(model=MODEL, input="Say hello", temperature=0) as stream:
        replayed = stream.get_final_response()
    assert replayed.output_text == REPLY
    assert len(served.upstream.requests) == 1


def test_a_streamed_answer_is_cached_from_its_completed_event(served: Served) -> None:
    client = served.client()
    with client.responses.stream(model=MODEL, input="Say hello", temperature=0) as stream:
        streamed = stream.get_final_response()
    cached = client.responses.with_raw_response.create(model=MODEL, input="Say hello", temperature=0)
    assert cached.headers["x-hatchway-cache"] == "hit"
    assert cached.parse().output_text == REPLY and cached.parse().id == streamed.id


# -- failures ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": 5}, "input"),
        ({"input": [{"type": "message", "role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, "input[0].type"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "text.format.schema"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "hi", "unknown_but_schema_allows": 1, "model": ""}, "model"),
    ],
    ids=["input-type", "role", "item-type", "hosted-tool", "schema", "required-without-tools", "empty-model"],
)
def test_a_bad_request_is_a_400_in_openais_envelope_naming_the_param(
    served: Served, body: dict[str, Any], param: str
) -> None:
    response = served.post({"model": MODEL, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert served.upstream.requests == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("previous_response_id", "resp_123"), ("store", True), ("conversation", "conv_1"), ("background", True)],
)
def test_stateful_parameters_are_refused_because_nothing_is_stored(served: Served, field: str, value: Any) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().responses.create(model=MODEL, input="hi", **{field: value})
    assert refused.value.param == field
    assert "stores no responses" in refused.value.message
    assert served.upstream.requests == []


def test_store_false_is_accepted(served: Served) -> None:
    assert served.client().responses.create(model=MODEL, input="Say hello", store=False).output_text == REPLY


def test_an_upstream_400_reaches_the_client_as_is(served: Served) -> None:
    served.upstream.faults = [Fault("context_length")]
    with pytest.raises(openai.BadRequestError) as refused:
        served.client().responses.create(model=MODEL, input="Say hello")
    assert refused.value.code == "context_length_exceeded"


def test_a_stream_cut_after_the_first_words_ends_with_response_failed(served: Served) -> None:
    served.upstream.faults = [Fault("cut", after_chunks=2)]
    response = served.post({"model": MODEL, "input": "Say hello", "stream": True})
    events = events_of(response)
    names = [name for name, _ in events]
    assert names[-1] == "response.failed" and "response.completed" not in names
    failed = events[-1][1]
    assert failed["sequence_number"] == events[-2][1]["sequence_number"] + 1
    assert failed["response"]["status"] == "failed"
    assert "stream broke" in failed["response"]["error"]["message"]
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == "".join(
        split_reply(REPLY)[:2]
    )


def test_a_provider_failing_before_the_answer_fails_over_across_kinds(plane: RunningPlane, make_upstream: Any) -> None:
    """A responses-capable provider that fails hands the request to a chat-only one (translated), and back."""
    broken, chat_only = make_upstream("broken"), make_upstream("chat-only")
    broken.fail_status = 503
    plane.create_org("acme")
    plane.add_provider("broken", broken, responses=True)
    plane.add_provider("chat-only", chat_only)
    with openai.OpenAI(base_url=plane.v1, api_key=plane.create_key("acme"), max_retries=0) as client:
        raw = client.responses.with_raw_response.create(model=MODEL, input="Say hello")
        assert raw.headers["x-hatchway-route"] == "chat-only" and raw.parse().output_text == REPLY
        with client.responses.stream(model=MODEL, input="Say hello") as stream:
            assert stream.get_final_response().output_text == REPLY
        assert broken.requests[-1].path == "/v1/responses"
        assert chat_only.requests[-1].path == "/v1/chat/completions"
        broken.fail_status, chat_only.fail_status = None, 503
        assert client.responses.create(model=MODEL, input="Say hello").output_text == REPLY


# -- the provider setting -------------------------------------------------------------------------------------


def test_the_responses_setting_is_shown_changed_and_audited(plane: RunningPlane, upstream: MockUpstream) -> None:
    plane.create_org("acme")
    assert plane.add_provider("mock-a", upstream)["responses"] is False
    flags = ["admin", "--url", plane.url, "--admin-key", ADMIN_KEY, "--json"]
    result = CliRunner().invoke(cli, [*flags, "provider", "set", "mock-a", "--responses"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["responses"] is True
    audit = plane.admin.get("/audit")["data"]
    change = next(e for e in audit if e["action"] == "provider.update")
    assert (change["before"]["responses"], change["after"]["responses"]) == (False, True)
    with openai.OpenAI(base_url=plane.v1, api_key=plane.create_key("acme"), max_retries=0) as client:
        client.responses.create(model=MODEL, input="Say hello")
    assert upstream.requests[-1].path == "/v1/responses"


def test_the_config_file_declares_responses_and_leaves_it_alone_when_silent(
    plane: RunningPlane, upstream: MockUpstream
) -> None:
    store = plane.server.plane.store
    audit = AuditLog(store.engine)
    declared = {"org": "acme", "name": "p", "base_url": upstream.url, "models": [MODEL]}
    apply_declared(store, {"providers": [declared | {"responses": True}]}, None, audit)
    assert store.list_providers("acme")[0]["responses"] is True
    apply_declared(store, {"providers": [declared]}, None, audit)
    assert store.list_providers("acme")[0]["responses"] is True


def test_a_responses_setting_that_is_not_a_boolean_is_refused(plane: RunningPlane, upstream: MockUpstream) -> None:
    plane.create_org("acme")
    with pytest.raises(AdminAPIError) as refused:
        plane.add_provider("p", upstream, responses="yes")
    assert refused.value.status == 400 and "responses" in str(refused.value)


def test_a_stored_response_cannot_be_retrieved_because_none_is_stored(served: Served) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        served.client().responses.retrieve("resp_123")
    assert "stores no responses" in missing.value.message


# -- the OpenAI Agents SDK --------------------------------------------------------------------------------------


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"22C and sunny in {city}"


def run_agent(plane: RunningPlane, api_key: str, model: str, *, stream: bool = False, node: bool = False) -> str:
    """Run an agent with one function tool to its final output, through the plane. On a node (the demo model,
    too small to choose a tool by itself) the tool is required and its output is the agent's answer."""

    async def run() -> str:
        async with openai.AsyncOpenAI(base_url=plane.v1, api_key=api_key, max_retries=0) as client:
            agent = Agent(
                name="weather",
                instructions="Answer with the weather tool.",
                tools=[get_weather],
                model=OpenAIResponsesModel(model=model, openai_client=client),
                model_settings=ModelSettings(temperature=0, tool_choice="required" if node else None),
                tool_use_behavior="stop_on_first_tool" if node else "run_llm_again",
            )
            question, config = "What is the weather in Paris?", RunConfig(tracing_disabled=True)
            if not stream:
                return str((await Runner.run(agent, question, run_config=config)).final_output)
            result = Runner.run_streamed(agent, question, run_config=config)
            async for _ in result.stream_events():
                pass
            return str(result.final_output)

    return asyncio.run(run())


@pytest.mark.parametrize("stream", [False, True], ids=["run", "run-streamed"])
def test_an_agent_with_one_function_tool_runs_to_completion(served: Served, stream: bool) -> None:
    served.upstream.tool_arguments = {"get_weather": ARGUMENTS}
    output = run_agent(served.plane, served.api_key, MODEL, stream=stream)
    assert output == "The tool said: 22C and sunny in Paris"
    assert len(served.upstream.requests) == 2


# -- a real node ----------------------------------------------------------------------------------------------


@pytest.fixture
def plane_config(plane_config: Config) -> Config:
    return for_agents(plane_config)


@pytest.fixture
def nodes(plane: RunningPlane, tmp_path: Path) -> Iterator[Nodes]:
    with enrolling(plane, tmp_path) as nodes:
        yield nodes


@pytest.fixture
def node_client(nodes: Nodes) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=nodes.plane.v1, api_key=nodes.key, max_retries=0, _strict_response_validation=True
    ) as client:
        yield client


def test_a_node_answers_plain_text_through_translation_whole_and_streamed(
    nodes: Nodes, node_client: openai.OpenAI
) -> None:
    nodes.started("node-a")
    client = node_client
    whole = client.responses.create(
        model=DEMO_MODEL, instructions="Answer the question.", input="What is the capital of France?", temperature=0
    )
    assert "Paris" in whole.output_text and whole.status == "completed"
    assert whole.usage is not None and whole.usage.output_tokens > 0
    with client.responses.stream(
        model=DEMO_MODEL, instructions="Answer the question.", input="What is the capital of France?", temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        streamed = stream.get_final_response()
    assert "".join(deltas) == streamed.output_text == whole.output_text


def test_a_node_cut_short_by_max_output_tokens_is_incomplete(nodes: Nodes, node_client: openai.OpenAI) -> None:
    nodes.started("node-a")
    response = node_client.responses.create(
        model=DEMO_MODEL, input="Count from 1 to 100, in words.", max_output_tokens=16, temperature=0
    )
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"


def test_failover_from_a_responses_provider_to_a_node(
    nodes: Nodes, node_client: openai.OpenAI, make_upstream: Any
) -> None:
    broken = make_upstream("broken")
    broken.fail_status = 503
    nodes.plane.add_provider("broken", broken, models=[DEMO_MODEL], responses=True)
    nodes.plane.admin.put("/routes", {"org": "acme", "model": DEMO_MODEL, "targets": ["broken", "nodes"]})
    nodes.started("node-a")
    raw = node_client.responses.with_raw_response.create(
        model=DEMO_MODEL, instructions="Answer the question.", input="What is the capital of France?", temperature=0
    )
    assert raw.headers["x-hatchway-route"] == nodes.node_id(nodes.agents[0])
    assert "Paris" in raw.parse().output_text
    assert broken.requests[-1].path == "/v1/responses"


def test_an_agent_with_one_function_tool_runs_to_completion_on_a_node(nodes: Nodes) -> None:
    """Needs tool calling on nodes (agent/tools.py): the demo model, held to the tool by `required` and the
    node's grammar, calls it; the SDK runs it, and its output is the agent's answer."""
    nodes.started("node-a")
    output = run_agent(nodes.plane, nodes.key, DEMO_MODEL, node=True)
    assert output.startswith("22C and sunny in")


# -- the translation itself --------------------------------------------------------------------------------------


def test_a_chat_answer_becomes_reasoning_message_and_call_items_in_that_order() -> None:
    chat = {
        "model": "up",
        "created": 1_700_000_000,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {
                    "role": "assistant",
                    "reasoning_content": "Think.",
                    "content": "Calling.",
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 7,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 2},
        },
    }
    response = answer.from_chat(chat, {"model": "alias", "input": "hi"}, "resp_1")
    assert [item["type"] for item in response["output"]] == ["reasoning", "message", "function_call"]
    assert response["output"][2]["call_id"] == "call_1"
    assert (response["status"], response["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert response["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
        "output_tokens": 5,
        "output_tokens_details": {"reasoning_tokens": 2},
        "total_tokens": 12,
    }
    assert Response.model_validate(response).output_text == "Calling."


def test_chat_logprobs_become_output_text_logprobs() -> None:
    entry = {"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}
    chat = {"choices": [{"message": {"content": "Hi"}, "logprobs": {"content": [entry]}, "finish_reason": "stop"}]}
    (part,) = answer.from_chat(chat, {"model": "m"}, "resp_1")["output"][0]["content"]
    assert part["logprobs"] == [
        {
            "token": "Hi",
            "bytes": [72, 105],
            "logprob": -0.5,
            "top_logprobs": [{"token": "Hi", "bytes": [], "logprob": -0.5}],
        }
    ]


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"model": "up", "created": 1, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def call_delta(index: int, arguments: str, name: str | None = None) -> dict[str, Any]:
    function = {"arguments": arguments, **({"name": name} if name else {})}
    return {"tool_calls": [{"index": index, **({"id": f"call_{index}"} if name else {}), "function": function}]}


def test_parallel_tool_calls_stream_one_item_after_the_other() -> None:
    translator = Translator({"model": "m"}, "resp_1")
    events = translator.feed(chunk({"role": "assistant"}))
    for piece in (call_delta(0, "", "a"), call_delta(0, "{}"), call_delta(1, "", "b"), call_delta(1, "[]")):
        events += translator.feed(chunk(piece))
    events += translator.feed(chunk({}, "tool_calls"))
    events += translator.feed({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})
    assert [(e["type"], e.get("output_index")) for e in events if "item" in e or "arguments" in e] == [
        ("response.output_item.added", 0),
        ("response.function_call_arguments.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
    ]
    final = events[-1]["response"]
    assert events[-1]["type"] == "response.completed"
    assert [(i["name"], i["arguments"], i["call_id"]) for i in final["output"]] == [
        ("a", "{}", "call_0"),
        ("b", "[]", "call_1"),
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_a_tool_call_resumed_after_the_next_began_fails_the_stream() -> None:
    translator = Translator({"model": "m"}, "resp_1")
    translator.feed(chunk(call_delta(0, "{", "a")))
    translator.feed(chunk(call_delta(1, "{", "b")))
    with pytest.raises(UpstreamProtocolError):
        translator.feed(chunk(call_delta(0, "}")))


def test_a_replayed_response_streams_to_the_same_response() -> None:
    chat = {"choices": [{"message": {"content": "Hi there", "refusal": "No."}, "finish_reason": "stop"}]}
    original = answer.from_chat(chat, {"model": "m"}, "resp_1")
    events = replay(original)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[-1]["response"] == original


def test_to_chat_joins_function_calls_to_the_answer_they_follow_and_drops_reasoning() -> None:
    body = {
        "model": "m",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Look: "},
                    {"type": "input_image", "image_url": "https://x/y.png"},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "one"}]},
            {"type": "function_call_output", "call_id": "c2", "output": "two"},
        ],
    }
    messages = to_chat(body)["messages"]
    assert messages[0]["content"][1] == {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "Checking." and [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]
    assert [m["content"] for m in messages[2:]] == ["one", "two"]


def test_allowed_tools_narrows_the_tools_sent() -> None:
    tools = [{**WEATHER_TOOL, "name": name} for name in ("a", "b")]
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "b"}]}
    chat = to_chat({"model": "m", "input": "hi", "tools": tools, "tool_choice": choice})
    assert [t["function"]["name"] for t in chat["tools"]] == ["b"] and chat["tool_choice"] == "required"


def test_logprobs_asked_through_include_are_asked_of_the_chat_target() -> None:
    body = {"model": "m", "input": "hi", "include": ["message.output_text.logprobs"], "top_logprobs": 3}
    chat = to_chat(body)
    assert (chat["logprobs"], chat["top_logprobs"]) == (True, 3)
